"""Issue 14's host-side pieces end to end: RemusLoop over a fake domain and the real
receiver (receive.driver.receive) on a socket pair, as in test_protect_loop, with
authenticated frames and generations: a protection that runs, fails over and records the
backup's new generation; a forged ACK that releases nothing; a stale primary refused."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from tests.fakes import FakeDomain, swallow
from tests.unit.test_protect_loop import PAGES, Devices, Sink, memory_at_each_epoch, primary
from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost
from xen_remus.channel.mac import MacError
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.generation import Generation, GenerationStore
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import Outcome, ReceiveError
from xen_remus.save_continuous import RemusLoop
from xen_remus.xlproto import BANNER


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XEN_REMUS_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


class AbortingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.aborted: str | None = None

    def abort(self, why: str) -> None:
        self.aborted = why


def backup(sock: socket.socket, sink: Sink, store: GenerationStore,
           result: list[Outcome | BaseException]) -> threading.Thread:
    up = Upstream(sock.fileno(), sock.fileno(), idle_timeout=20.0, io_timeout=20.0)
    chan = ReceiverChannel(Config(mac=True), time.monotonic())

    def run() -> None:
        try:
            result.append(receive(up, cast(Any, sink), True, chan=chan, generations=store))
        except BaseException as exc:  # handed to the test
            result.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_an_authenticated_protection_fails_over_into_a_new_generation(dirs: Path) -> None:
    store = GenerationStore(dirs / "b")
    dom = FakeDomain(PAGES)
    sink, result = Sink(), list[Outcome | BaseException]()
    a, b = socket.socketpair()
    th = backup(b, sink, store, result)
    engine, out, link = primary(a, dom, Config(mac=True, generation=5), 5.0)
    devs = Devices(dom, sink)
    rng = np.random.default_rng(4)

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 4:
            loop.stop()
        for pfn in rng.choice(PAGES, 8, replace=False):
            dom.write(int(pfn), st.epoch + 1)

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    loop.run()
    assert link.chan.agreed is not None and link.chan.agreed.mac == "hmac-sha256"
    assert store.get("g") == Generation(5, "received")
    a.close()
    th.join(20)
    assert isinstance(result[0], Outcome) and result[0].kind == "failover"
    assert result[0].epoch == 4 and sink.failed_over == 4
    assert store.get("g") == Generation(6, "failover")
    assert [c for c in devs.calls if c[0] == "commit"] == [("commit", e) for e in range(5)]
    seen = memory_at_each_epoch(bytes(sink.data))
    assert all(seen[e] == devs.snapshots[e] for e in range(5))


def test_a_forged_ack_is_refused_and_releases_nothing() -> None:
    """Someone who can write into the back channel but not read the stream (a plain TCP
    transport) injects an ACK of epoch 0: protect refuses it by name, no epoch is
    committed (the guest's output stays held), and the guest is left running."""
    dom = FakeDomain(PAGES)
    a, b = socket.socketpair()
    b.sendall(BANNER + ReceiverChannel(Config(mac=True), 0).offer_line())
    stop = threading.Event()
    forged: list[bool] = []

    def forge() -> None:
        if not forged:  # the stream has begun: the accept is out
            b.sendall(wire.ack(0, 0))
            forged.append(True)

    swallow(b, stop, forge)
    engine, out, link = primary(a, dom, Config(mac=True, generation=1), 5.0)
    devs = Devices(dom, Sink(), acks=False)
    loop = RemusLoop(engine, out, link, devs, 0.01)
    with pytest.raises(MacError, match=r"REMUS_ACK at offset \d+ \(epoch 0\): no MAC"):
        loop.run()
    assert not [c for c in devs.calls if c[0] == "commit"]
    assert link.chan.acked is None
    assert not dom.suspended and not dom.logdirty
    stop.set()
    a.close()
    b.close()


def test_a_stale_primary_is_refused_and_told_why(dirs: Path) -> None:
    """The backup failed over from generation 3 (its copy is generation 4); the old
    primary, which ran on, starts a new protection: its own record says 3, so it counts
    4. The backup refuses it before any epoch is committed, destroys what it began to
    build, and tells the primary in a CLOSE frame."""
    store = GenerationStore(dirs / "b")
    store.put("g", 4, "failover")
    dom = FakeDomain(PAGES)
    sink, result = AbortingSink(), list[Outcome | BaseException]()
    a, b = socket.socketpair()
    th = backup(b, sink, store, result)
    engine, out, link = primary(a, dom, Config(mac=True, generation=4), 5.0)
    loop = RemusLoop(engine, out, link, Devices(dom, sink), 0.01)
    with pytest.raises(BackupLost, match="it stopped: refused by the backup: the sender's "
                       "protection of g is generation 4, but this host failed over"):
        loop.run()
    th.join(20)
    (err,) = result
    assert isinstance(err, ReceiveError) and "generation 4" in str(err)
    assert sink.aborted is not None and sink.failed_over is None and not sink.committed_epochs
    assert store.get("g") == Generation(4, "failover")
    a.close()
    b.close()
