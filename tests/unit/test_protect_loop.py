"""The Remus epoch loop end to end on this host: RemusLoop over a fake domain, our
CheckpointEmitter and SenderLink on one end of a socket pair, the real receiver
(restore_continuous.receive with a ReceiverChannel) on the other, into a fake sink.

Checked: the sink gets a standard checkpointed stream whose epoch N is exactly the guest's
memory at the N-th suspend; devices commit N only after the sink has epoch N whole (the
output-commit rule); compression shrinks the wire; the backup fails over from the last
epoch when the primary closes; a backup that goes silent is BackupLost with the guest
running and log-dirty off.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from tests.fakes import FakeDomain, FakeGuest, swallow
from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost, SenderLink
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.cli.protect_run import Summary, _await_offer, read_banner
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import Outcome, ReceiveError
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.stream import consts as C
from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, EpochEnd
from xen_remus.stream.records import Record

CONFIG = '{"c_info": {"name": "g"}}'
PAGES = 96


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path))
    return tmp_path


class Sink:
    def __init__(self, stall_s: float = 0.0) -> None:
        self.stall_s = stall_s  # the first send blocks this long (xl building the domain)
        self.data = bytearray()
        self.committed_epochs: list[int] = []
        self.failed_over: int | None = None
        self.lock = threading.Lock()

    def send(self, bufs: Sequence[Buffer]) -> None:
        if self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0.0
        with self.lock:
            for b in bufs:
                self.data += b

    def committed(self, epoch: int) -> None:
        with self.lock:
            self.committed_epochs.append(epoch)

    def failover(self, epoch: int) -> None:
        self.failed_over = epoch

    def abort(self, why: str) -> None:
        raise AssertionError(f"sink aborted: {why}")

    def _what(self) -> str:
        return "test sink"


class Devices:
    """Records the device calls; snapshots guest memory at each postsuspend."""

    def __init__(self, dom: FakeDomain, sink: Sink, acks: bool = True) -> None:
        self.dom, self.sink, self.acks = dom, sink, acks
        self.calls: list[tuple[str, int]] = []
        self.snapshots: dict[int, bytes] = {}

    def postsuspend(self, epoch: int) -> None:
        assert self.dom.suspended
        self.snapshots[epoch] = bytes(self.dom.mem)
        self.calls.append(("postsuspend", epoch))

    def preresume(self) -> None:
        self.calls.append(("preresume", -1))

    def idle(self) -> None:
        pass

    def commit(self, epoch: int) -> None:
        with self.sink.lock:
            if self.acks:  # the backup ACKs only once its sink has the epoch whole
                assert epoch in self.sink.committed_epochs, "released before the backup had it"
        self.calls.append(("commit", epoch))


def memory_at_each_epoch(stream: bytes) -> dict[int, bytes]:
    mem = bytearray(PAGES * PAGE_SIZE)
    out: dict[int, bytes] = {}
    for ev in Decoder(checkpointed=True).feed(stream):
        if isinstance(ev, Record) and ev.layer == "libxc" and ev.rtype == C.REC_TYPE_PAGE_DATA:
            pd = ev.parse()
            data = pd.page_bytes()
            n = 0
            for pfn, t in zip(pd.pfns, pd.types, strict=True):
                if t < 0xD:
                    mem[int(pfn) * PAGE_SIZE:(int(pfn) + 1) * PAGE_SIZE] = \
                        data[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]
                    n += 1
        if isinstance(ev, EpochEnd):
            out[ev.epoch] = bytes(mem)
    return out


def start_backup(sock: socket.socket, sink: Sink, chan: ReceiverChannel | None,
                 result: list[Outcome]) -> threading.Thread:
    up = Upstream(sock.fileno(), sock.fileno(), idle_timeout=20.0, io_timeout=20.0)
    th = threading.Thread(target=lambda: result.append(
        receive(up, cast(Any, sink), True, chan=chan)), daemon=True)
    th.start()
    return th


def primary(sock: socket.socket, dom: FakeDomain, cfg: Config, wait_offer: float
            ) -> tuple[SaveEngine, CheckpointEmitter, SenderLink]:
    rest = read_banner(sock.fileno(), 10, "test backup")
    link = SenderLink(SenderChannel(cfg, time.monotonic()), sock.fileno(), sock.fileno())
    _await_offer(link, rest, wait_offer)
    out = CheckpointEmitter(link, CONFIG)
    engine = SaveEngine(dom, FakeGuest(dom), out, PrecopyPolicy(3, 4))
    return engine, out, link


@pytest.mark.parametrize("compress", [True, False])
def test_epochs_reach_the_backup_whole_and_acked(compress: bool, run_dir: Path) -> None:
    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(compression=compress), 5.0)
    devs = Devices(dom, sink)
    stats: list[EpochStats] = []
    rng = np.random.default_rng(3)

    def on_epoch(st: EpochStats) -> None:
        stats.append(st)
        if st.epoch == 6:
            loop.stop()
        for pfn in rng.choice(PAGES, 10, replace=False):  # the guest runs on: a counter
            off = int(pfn) * PAGE_SIZE + 8 * int(rng.integers(0, 512))
            dom.mem[off:off + 8] = (st.epoch + 1).to_bytes(8, "little")
            dom.dirty.add(int(pfn))

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    loop.run()
    assert link.chan.agreed is not None and link.chan.acks
    a.close()  # the primary goes away: the backup fails over from epoch 6
    th.join(20)
    assert result and result[0].kind == "failover" and result[0].epoch == 6
    assert sink.failed_over == 6
    assert [s.epoch for s in stats] == list(range(7))
    assert all(s.ack_ms is not None for s in stats)
    assert [c for c in devs.calls if c[0] == "commit"] == [("commit", e) for e in range(7)]
    seen = memory_at_each_epoch(bytes(sink.data))
    assert sorted(seen) == list(range(7))
    for e in range(7):
        assert seen[e] == devs.snapshots[e], f"epoch {e} differs from the guest at suspend"
    assert all(s.dirty_pages == 10 for s in stats[2:])  # one on_epoch's writes each
    later = stats[1:]
    raw, wire = sum(s.raw_bytes for s in later), sum(s.wire_bytes for s in later)
    if compress:
        assert wire < raw / 4
    else:
        assert wire == raw
    assert not dom.logdirty and not dom.suspended
    backup = json.loads((run_dir / "g.backup.json").read_text())
    assert backup["role"] == "backup" and backup["state"] == "failover"
    assert backup["committed"] == 6 and backup["totals"]["epochs"] >= 5  # figures via the channel
    assert Summary(None, False).text() == "no checkpoint after the initial copy"
    summ = Summary(None, False)
    for st in stats:
        summ.epoch(st)
    assert summ.text().startswith("6 checkpoints")


def test_stock_backup_gets_the_plain_stream() -> None:
    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, None, result)  # no offer: as stock xl migrate-receive -r
    engine, out, link = primary(a, dom, Config(), 0.2)
    devs = Devices(dom, sink, acks=False)  # released once sent: all a stock backup allows

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 3:
            loop.stop()
        dom.write(st.epoch, 0x5A)

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    loop.run()
    assert link.chan.agreed is None
    a.close()
    th.join(20)
    assert result[0].epoch == 3
    seen = memory_at_each_epoch(bytes(sink.data))
    assert all(seen[e] == devs.snapshots[e] for e in range(4))
    assert not any(0xF0000000 <= ev.rtype for ev in Decoder(checkpointed=True).feed(
        bytes(sink.data)) if isinstance(ev, Record))


def test_silent_backup_is_lost_and_the_guest_runs_on() -> None:
    dom = FakeDomain(PAGES)
    a, b = socket.socketpair()
    # A backup that offers, then stops answering after the initial copy (no FIN: frozen).
    b.sendall(b"xl migration receiver ready, send binary domain data.\n" +
              ReceiverChannel(Config(heartbeat_timeout_ms=200), 0).offer_line())
    drained = threading.Event()
    swallow(b, drained)  # the stream goes nowhere, so writes do not block; never answer
    engine, out, link = primary(a, dom, Config(heartbeat_timeout_ms=200), 5.0)
    loop = RemusLoop(engine, out, link, Devices(dom, Sink(), acks=False), 0.01)
    t0 = time.monotonic()
    with pytest.raises(BackupLost, match="heartbeat timeout"):
        loop.run()
    assert time.monotonic() - t0 < 5
    assert not dom.suspended and not dom.logdirty
    drained.set()
    a.close()
    b.close()


def test_a_stalled_sink_is_not_a_lost_backup() -> None:
    """As in the lab: xl builds the domain before it reads on, for longer than the
    heartbeat timeout; the backup must keep its heartbeats going meanwhile."""
    dom = FakeDomain(PAGES)
    sink, result = Sink(stall_s=2.5), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(initial_grace_ms=10_000), 5.0)

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 2:
            loop.stop()

    loop = RemusLoop(engine, out, link, Devices(dom, sink), 0.01, on_epoch=on_epoch)
    loop.run()  # BackupLost here is the bug
    a.close()
    th.join(20)
    assert result[0].epoch == 2


def test_a_failure_after_a_commit_leaves_the_guest_paused_for_the_backup() -> None:
    """The primary fails (here: the guest does not suspend) once the backup holds epoch 2:
    the guest is paused, never resumed, nothing more is committed, and the backup resumes
    from epoch 2 when the stream ends."""
    from xen_remus.xen.errors import SuspendError

    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)
    devs = Devices(dom, sink)

    def on_epoch(st: EpochStats) -> None:
        dom.fail_suspend = st.epoch == 2

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    with pytest.raises(SuspendError):
        loop.run()
    assert loop.halted and loop.epoch == 2
    assert dom.paused and dom.calls[-1] == "pause" and not dom.logdirty
    assert [c for c in devs.calls if c[0] == "commit"][-1] == ("commit", 2)
    a.close()
    th.join(20)
    assert result[0].epoch == 2 and sink.failed_over == 2


def test_a_failure_before_the_first_commit_leaves_the_guest_running() -> None:
    """Nothing on the backup to resume: the guest goes on here, not paused."""
    from xen_remus.xen.errors import SuspendError

    dom = FakeDomain(PAGES)
    dom.fail_suspend = True
    a, b = socket.socketpair()
    aborted: list[str] = []

    class Aborting(Sink):
        def abort(self, why: str) -> None:
            aborted.append(why)

    sink = Aborting()
    up = Upstream(b.fileno(), b.fileno(), idle_timeout=20.0, io_timeout=20.0)

    def backup() -> None:
        with pytest.raises(ReceiveError, match="before any complete epoch"):
            receive(up, cast(Any, sink), True, chan=ReceiverChannel(Config(), 0.0))

    th = threading.Thread(target=backup, daemon=True)
    th.start()
    engine, out, link = primary(a, dom, Config(), 5.0)
    loop = RemusLoop(engine, out, link, Devices(dom, sink), 0.005)
    with pytest.raises(SuspendError):
        loop.run()
    assert not loop.halted and loop.epoch == -1
    assert not dom.paused and not dom.suspended and not dom.logdirty
    a.close()
    th.join(20)
    assert "before any complete epoch" in aborted[0]  # the backup has nothing to resume



class SlowSink(Sink):
    """A backup whose every commit takes ``commit_s`` (xl writing a big epoch): with a
    short interval, later epochs are sent while earlier ones are being committed."""

    def __init__(self, commit_s: float) -> None:
        super().__init__()
        self.commit_s = commit_s

    def committed(self, epoch: int) -> None:
        time.sleep(self.commit_s)
        super().committed(epoch)


def test_pipelined_epochs_reach_the_backup_whole_and_in_order(run_dir: Path) -> None:
    """Depth 3 against the real receiver: it reads epoch N+1 while it commits N, ACKs in
    order, and each epoch is committed here only after the backup had it whole."""
    dom = FakeDomain(PAGES)
    sink, result = SlowSink(0.03), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)
    devs = Devices(dom, sink)
    awaiting: list[int] = []

    def on_epoch(st: EpochStats) -> None:
        awaiting.append(len(loop.awaiting))
        if st.epoch == 12:
            loop.stop()
        dom.write(st.epoch % PAGES, 0x40 + st.epoch)

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch, depth=3)
    loop.run()
    a.close()
    th.join(20)
    commits = [e for op, e in devs.calls if op == "commit"]
    sealed = [e for op, e in devs.calls if op == "postsuspend"]
    assert commits == sealed == list(range(len(commits))) and commits[-1] >= 12
    assert max(awaiting) == 2  # at an ACK: it, and up to two more awaiting theirs
    assert devs.calls.index(("postsuspend", 6)) < devs.calls.index(("commit", 5))
    assert result[0].kind == "failover" and result[0].epoch == commits[-1]
    seen = memory_at_each_epoch(bytes(sink.data))
    assert sorted(seen) == commits
    assert all(seen[e] == devs.snapshots[e] for e in commits)


@pytest.mark.parametrize("at", ["seal", "transmit"])
def test_a_failed_disk_replica_leaves_the_guest_running_unprotected(
        at: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A disk's replication fails in epoch 2 (its server gone), at the seal (the guest
    suspended) or as the epoch's last writes are sent (it runs again): protect says which
    disk, lets the guest and its output go on here and exits 3, not 1."""
    import argparse

    from xen_remus.channel.stats import StatusFile
    from xen_remus.cli.protect import EXIT_UNPROTECTED
    from xen_remus.cli.protect_run import _protect
    from xen_remus.disk.device import ReplicaLost

    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)

    lost = ReplicaLost(f"replication of disk xvda (/run/r.sock) failed ({at} epoch 2): "
                       "the server closed the replication socket")

    def fail() -> None:
        raise lost

    class FailingDisk(Devices):
        def postsuspend(self, epoch: int) -> None:
            super().postsuspend(epoch)
            if epoch == 2:
                if at == "seal":
                    raise lost
                out.later(fail)  # as protect_disks defers the epoch's last writes

        def release_all(self) -> None:
            self.calls.append(("release_all", -1))

        def __enter__(self) -> FailingDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.calls.append(("teardown", -1))

    devs = FailingDisk(dom, sink)
    args = argparse.Namespace(interval_ms=5, pipeline=1)
    status = StatusFile("g", "primary", "backup")
    rc = _protect(engine, out, link, devs, args, Summary(status, False), status, "g", None)
    assert rc == EXIT_UNPROTECTED
    assert not dom.paused and not dom.suspended, "the guest runs on here"
    assert devs.calls[-2:] == [("release_all", -1), ("teardown", -1)]
    err = capsys.readouterr().err
    assert "disk xvda" in err and "UNPROTECTED after epoch 1" in err
    assert json.loads(status.path.read_text())["state"] == "unprotected"
    a.close()
    th.join(20)
    assert result[0].epoch == 1


def test_a_handover_gives_the_backup_the_guest_exactly_as_it_stopped(run_dir: Path) -> None:
    """handover() at epoch 4: one more checkpoint (5) with the guest left suspended, its
    ACK and commit, then run() returns; the backup, once the stream ends, resumes epoch 5,
    which is the guest's memory as it stands here, suspended and paused for good."""
    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)
    devs = Devices(dom, sink)

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 4:
            loop.handover()
        if not dom.suspended:  # the guest runs on until the last suspend
            dom.write(st.epoch, 0x30 + st.epoch)

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    loop.run()
    assert loop.handed_over and loop.final == 5 and loop.epoch == 5 and not loop.halted
    assert dom.suspended and dom.paused and not dom.logdirty
    assert dom.resumed == 5  # after epochs 0-4, never after the last
    assert [c for c in devs.calls if c[0] == "commit"] == [("commit", e) for e in range(6)]
    assert devs.calls[-2:] == [("postsuspend", 5), ("commit", 5)]  # no preresume after it
    a.close()
    th.join(20)
    assert result[0].kind == "failover" and result[0].epoch == 5 and sink.failed_over == 5
    seen = memory_at_each_epoch(bytes(sink.data))
    assert seen[5] == bytes(dom.mem)


def test_a_handover_whose_last_ack_never_comes_leaves_the_guest_paused() -> None:
    """The backup may hold the last epoch (sent whole): the guest stays suspended and
    paused here, that epoch's output held, HandoverFailed says so."""
    from xen_remus.save_continuous import HandoverFailed

    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)
    devs = Devices(dom, sink)
    acks = link.next_ack

    def next_ack(until: float | None) -> Any:
        if loop.final is not None:
            raise BackupLost("backup lost: heartbeat timeout (a test)")
        return acks(until)

    link.next_ack = next_ack  # type: ignore[method-assign]

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 2:
            loop.handover()

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    with pytest.raises(HandoverFailed, match=r"the ACK of the last epoch \(3\) did not come"):
        loop.run()
    assert loop.halted and not loop.handed_over and loop.epoch == 2
    assert dom.suspended and dom.paused and not dom.logdirty
    assert [c for c in devs.calls if c[0] == "commit"][-1] == ("commit", 2)
    a.close()
    th.join(20)
    assert result[0].epoch == 3  # the backup had it whole: the copy it resumes


def test_protect_hands_over_on_sigusr1(capsys: pytest.CaptureFixture[str]) -> None:
    """protect's SIGUSR1 (`xen-remus handover`): exit 0, status handed-over, every device
    released (nothing of an epoch the backup lacks is left: the guest is suspended)."""
    import argparse
    import os
    import signal

    from xen_remus.channel.stats import StatusFile
    from xen_remus.cli.protect_run import _protect

    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)

    class Devs(Devices):
        def release_all(self) -> None:
            self.calls.append(("release_all", -1))

        def __enter__(self) -> Devs:
            return self

        def __exit__(self, *exc: object) -> None:
            self.calls.append(("teardown", -1))

    class Asking(Summary):
        def epoch(self, st: EpochStats) -> None:
            super().epoch(st)
            if st.epoch == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # as `xen-remus handover` does

    devs = Devs(dom, sink)
    status = StatusFile("g", "primary", "backup")
    before = signal.getsignal(signal.SIGUSR1)
    rc = _protect(engine, out, link, devs, argparse.Namespace(interval_ms=5, pipeline=1),
                  Asking(status, False), status, "g", None)
    assert rc == 0 and signal.getsignal(signal.SIGUSR1) == before
    doc = json.loads(status.path.read_text())
    assert doc["state"] == "handed-over" and doc["detail"] == "after epoch 4" and doc["epoch"] == 4
    assert dom.suspended and dom.paused
    assert devs.calls[-3:] == [("commit", 4), ("release_all", -1), ("teardown", -1)]
    assert "handed g over after epoch 4" in capsys.readouterr().err
    a.close()
    th.join(20)
    assert result[0].epoch == 4
