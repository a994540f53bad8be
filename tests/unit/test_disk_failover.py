"""Disk and memory together, through the real ends, the primary killed anywhere.

The primary is the production path on this host: the disk daemon (NBD server and
replication socket) written to by an NBD client (random writes, FUA writes and flushes,
also while the initial synchronisation runs), the epoch loop (RemusLoop over a fake
domain whose memory changes every epoch) with the ReplicatedDisk that streams the open
epoch's writes as REMUS_DISK records while it waits between checkpoints and seals each
epoch, with the writes since, into its checkpoint, and the real receiver (receive.driver)
as the live backup. An epoch's writes come at its very start (the guest resumed, its
previous checkpoint not yet sent: its writes then wait behind the previous epoch's in the
stream), after the previous ACK (streamed, when the loop waits long enough) and last (just
before the suspend). Everything the primary sends is recorded.

Then the primary dies at a byte of that stream: a fresh receiver, its replica reset to
what it was before the protection, reads the recording cut there (at random offsets, at
and around every epoch's end, and inside every REMUS_DISK record, streamed or in a
checkpoint: mid-frame) and fails over. Checked against a
model replayed independently of both ends: the backup ACKed exactly the epochs it had
whole (memory and disk seal), it resumes from the last one it ACKed, its disk image is
the model's disk at that epoch and the memory it resumes is the guest's at that epoch.
Before any ACK it resumes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeDomain, FakeGuest
from tests.unit.disk_helpers import ClientThread, Op
from tests.unit.test_disk_protect import Daemon
from tests.unit.test_protect_loop import PAGES, memory_at_each_epoch
from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.link import SenderLink
from xen_remus.channel.negotiate import OfferReader
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.cli.protect_disks import replicated_disk, sync_disks
from xen_remus.cli.protect_run import _await_offer, read_banner
from xen_remus.devices.base import Device, DeviceSet
from xen_remus.disk.replica import FrameDecoder, W
from xen_remus.generation import GenerationStore
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import Outcome, ReceiveError
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, EpochEnd
from xen_remus.stream.records import Record
from xen_remus.xlproto import BANNER

SIZE = 4 << 20  # four synchronisation chunks
# An epoch: the NBD ops as the guest resumes from the previous checkpoint (before that
# is sent), those after its ACK, those just before the suspend (the last writes of the
# epoch), and the memory pages the guest writes.
Epoch = tuple[Sequence[Op], Sequence[Op], Sequence[Op], Sequence[int]]
PAGES_RECORDS = (C.REC_TYPE_PAGE_DATA, wire.REC_REMUS_PAGE_DATA_LZ4XOR)
CHUNK = 1 << 20
GENERATION = 5
IO_TIMEOUT = 20.0


# -- the primary, recorded ------------------------------------------------------------------
class Tee:
    """Between the primary's socket and the live backup's: relays both ways, keeping a
    copy of every byte the primary sent; the primary's close reaches the backup as EOF."""

    def __init__(self, primary: socket.socket, backup: socket.socket) -> None:
        self.p, self.b = primary, backup
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        open_ = {self.p, self.b}
        while self.p in open_:
            ready, _, _ = select.select(list(open_), [], [], IO_TIMEOUT)
            for s in ready:
                try:
                    data = s.recv(1 << 20)
                except OSError:
                    data = b""
                other = self.b if s is self.p else self.p
                if not data:
                    open_.discard(s)
                    if s is self.p:
                        self.b.shutdown(socket.SHUT_WR)
                    continue
                if s is self.p:
                    self.sent += data
                try:
                    other.sendall(data)
                except OSError:
                    open_.discard(s)


class WritingDomain(FakeDomain):
    """A guest that writes just before it is suspended and as soon as it resumes."""

    def __init__(self, nr_pfns: int) -> None:
        super().__init__(nr_pfns)
        self.before_suspend: Callable[[], None] = lambda: None
        self.after_resume: Callable[[], None] = lambda: None

    def suspend(self) -> None:
        self.before_suspend()
        super().suspend()

    def resume(self) -> None:
        super().resume()
        self.after_resume()


class Snapshots(Device):
    """After the disk's seal (the guest suspended): the guest's memory and the primary's
    image, as the epoch ends."""

    order = 5

    def __init__(self, dom: FakeDomain, image: str) -> None:
        self.dom, self.image = dom, image
        self.memory: dict[int, bytes] = {}
        self.disk: dict[int, bytes] = {}

    @property
    def name(self) -> str:
        return "snapshots"

    def postsuspend(self, epoch: int) -> None:
        self.memory[epoch] = bytes(self.dom.mem)
        self.disk[epoch] = Path(self.image).read_bytes()

    def setup(self) -> None:
        pass

    def commit(self, epoch: int) -> None:
        pass

    def release_all(self) -> None:
        pass

    def teardown(self) -> None:
        pass


@dataclass
class Recording:
    stream: bytes  # every byte the primary sent
    replica_at_start: bytes
    replica: str  # the replica's path (in the guest's config)
    memory: dict[int, bytes]  # the guest's memory as each epoch ended
    disk: dict[int, bytes]  # the primary's image as each epoch ended
    epoch_ends: list[int] = field(default_factory=list)  # stream offset after each epoch
    disk_records: list[tuple[int, int]] = field(default_factory=list)  # REMUS_DISK spans
    # W frames per REMUS_DISK record between an epoch's end and the next checkpoint's
    # pages (told apart so only when every checkpoint has pages), and in checkpoints
    streamed: list[int] = field(default_factory=list)
    in_checkpoints: list[int] = field(default_factory=list)


def record(d: str, primary_image: bytes, replica_image: bytes, during: Sequence[Op],
           epochs: Sequence[Epoch], interval: float = 0.002) -> Recording:
    """Protect a fake guest with one replicated disk into a live receiver, a checkpoint
    every ``interval`` s; the NBD ops ``during`` run while the initial synchronisation is
    relayed, those of ``epochs[0]`` (and its memory pages' writes) after it, those of
    ``epochs[k]`` between checkpoints k-1 and k: its first ops as the guest resumes from
    k-1, then (after the ACK of k-1; the loop then waits for the interval) the next, its
    last ones just before the suspend."""
    image, replica = os.path.join(d, "a.img"), os.path.join(d, "replica.img")
    Path(image).write_bytes(primary_image)
    Path(replica).write_bytes(replica_image)
    daemon = Daemon(image, d)
    client = ClientThread(daemon.nbd)
    dom = WritingDomain(PAGES)
    sink = _Sink()
    a, a_tee = socket.socketpair()
    b_tee, b = socket.socketpair()
    tee = Tee(a_tee, b_tee)
    live: list[object] = []
    backup = threading.Thread(target=lambda: live.append(_receive(b.fileno(), b.fileno(),
                                                                  sink)), daemon=True)
    backup.start()
    try:
        rest = read_banner(a.fileno(), IO_TIMEOUT, "test backup")
        cfg = Config(disk=True, mac=True, generation=GENERATION)
        link = _sender_link(cfg, a)
        _await_offer(link, rest, 5.0)
        config = json.dumps({"c_info": {"name": "g"},
                             "disks": [{"vdev": "xvda", "pdev_path": replica}]})
        out = CheckpointEmitter(link, config)
        engine = SaveEngine(dom, FakeGuest(dom), out, PrecopyPolicy(3, 4))
        disk = replicated_disk("xvda", daemon.replica, out, GENERATION)
        snaps = Snapshots(dom, image)

        def sync() -> None:
            def write_during() -> None:
                for op in during:
                    client.do(op)
            writer = threading.Thread(target=write_during, daemon=True)
            writer.start()
            sync_disks([disk], link, out)
            writer.join(IO_TIMEOUT)  # its writes are all in epoch 0
            assert not writer.is_alive()
            run(0)  # after SYNCED, before the pre-copy: epoch 0 still

        def run(epoch: int) -> None:
            first, ops, _tail, pages = epochs[epoch]
            for op in [*first, *ops] if epoch == 0 else ops:
                client.do(op)
            for pfn in pages:
                dom.write(pfn % PAGES, (epoch * 7 + pfn) % 251 + 1)

        def tail() -> None:
            for op in epochs[loop.sent + 1][2]:  # the epoch about to be checkpointed
                client.do(op)

        def first() -> None:
            nxt = loop.sent + 2  # resumed from checkpoint sent + 1, not yet sent
            for op in epochs[nxt][0] if nxt < len(epochs) else []:
                client.do(op)

        dom.before_suspend = tail
        dom.after_resume = first

        def on_epoch(st: EpochStats) -> None:
            if st.epoch + 1 >= len(epochs):
                loop.stop()
            else:
                run(st.epoch + 1)

        with DeviceSet([disk, snaps]) as devs:
            loop = RemusLoop(engine, out, link, devs, interval, on_epoch=on_epoch,
                             before_precopy=sync)
            loop.run()
    finally:
        a.close()
        backup.join(IO_TIMEOUT)
        tee.thread.join(IO_TIMEOUT)
        for s in (a_tee, b_tee, b):
            s.close()
        client.close()
        daemon.close()
    assert live and isinstance(live[0], Outcome) and live[0].kind == "failover", live
    rec = Recording(bytes(tee.sent), replica_image, replica, snaps.memory, snaps.disk)
    between = False  # after an epoch's end, before the next checkpoint's pages
    for ev in Decoder(checkpointed=True).feed(rec.stream):
        if isinstance(ev, EpochEnd):
            rec.epoch_ends.append(ev.offset + len(ev.wire))
            between = True
        elif isinstance(ev, Record) and ev.rtype in PAGES_RECORDS:
            between = False
        elif isinstance(ev, Record) and ev.rtype == wire.REC_REMUS_DISK:
            rec.disk_records.append((ev.offset, ev.offset + len(ev.wire)))
            frames = FrameDecoder().feed(bytes(wire.parse_disk(ev.body, "test")[1]))
            writes = sum(f.kind == W for f in frames)
            (rec.streamed if between else rec.in_checkpoints).append(writes)
    assert len(rec.epoch_ends) == len(epochs) == len(rec.memory)
    return rec


def _sender_link(cfg: Config, sock: socket.socket) -> SenderLink:
    return SenderLink(SenderChannel(cfg, time.monotonic()), sock.fileno(), sock.fileno())


class _Sink:
    """The backup's guest: the bytes of committed epochs, its commits and its end."""

    def __init__(self) -> None:
        self.domain_name: str | None = None
        self.data = bytearray()
        self.committed_epochs: list[int] = []
        self.failed_over: int | None = None
        self.held: int | None = None
        self.aborted: str | None = None

    def send(self, bufs: Sequence[Buffer]) -> None:
        for buf in bufs:
            self.data += buf

    def committed(self, epoch: int) -> None:
        self.committed_epochs.append(epoch)

    def failover(self, epoch: int) -> None:
        self.failed_over = epoch

    def hold(self, epoch: int) -> None:
        self.held = epoch

    def abort(self, why: str) -> None:
        self.aborted = why

    def incoming_name(self) -> str:
        return "g--incoming"


def _receive(rfd: int, wfd: int, sink: _Sink) -> Outcome | BaseException:
    up = Upstream(rfd, wfd, idle_timeout=IO_TIMEOUT, io_timeout=IO_TIMEOUT)
    try:
        return receive(up, cast(Any, sink), True,
                       chan=ReceiverChannel(Config(disk=True, mac=True), time.monotonic()))
    except BaseException as exc:  # handed to the test
        return exc


@contextlib.contextmanager
def own_state(d: str) -> Iterator[None]:
    """A state directory of its own (generations, replica records, dirty bitmaps): each
    protection and each backup here is a fresh host."""
    saved = os.environ.get("XEN_REMUS_STATE_DIR")
    os.environ["XEN_REMUS_STATE_DIR"] = os.path.join(d, "state")
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XEN_REMUS_STATE_DIR"]
        else:
            os.environ["XEN_REMUS_STATE_DIR"] = saved


# -- the backup, after the primary died -----------------------------------------------------
@dataclass
class AfterKill:
    outcome: Outcome | BaseException
    acked: list[int]  # the epochs the backup ACKed, in order
    sink: _Sink
    image: bytes  # the replica after the receive ended


def replay(rec: Recording, cut: int, mutate: Callable[[bytes], bytes] = lambda b: b,
           before: Callable[[], object] = lambda: None) -> AfterKill:
    """A fresh backup (its replica and state as before the protection, then ``before()``)
    reads what the primary sent up to byte ``cut``, then the stream ends: the primary is
    dead."""
    with tempfile.TemporaryDirectory(prefix="xr-kill-") as d, own_state(d):
        Path(rec.replica).write_bytes(rec.replica_at_start)
        before()
        src, back = os.path.join(d, "in"), os.path.join(d, "out")
        Path(src).write_bytes(mutate(rec.stream[:cut]))
        sink = _Sink()
        rfd = os.open(src, os.O_RDONLY)
        wfd = os.open(back, os.O_WRONLY | os.O_CREAT)
        try:
            outcome = _receive(rfd, wfd, sink)
        finally:
            os.close(rfd)
            os.close(wfd)
        return AfterKill(outcome, acks_in(Path(back).read_bytes()), sink,
                         Path(rec.replica).read_bytes())


def acks_in(back: bytes) -> list[int]:
    """The epochs ACKed on the backup's channel (banner, offer line, then frames; the
    MAC trailer, if any, follows the ACK's own 16 bytes)."""
    assert back.startswith(BANNER), back[:80]
    offer = OfferReader()
    frames = offer.feed(back[len(BANNER):])
    assert offer.offer is not None, "no offer line"
    dec = wire.FrameDecoder("back channel")
    return [wire.parse_ack(f.body[:16], "ACK")[0] for f in dec.feed(frames)
            if f.rtype == wire.REC_REMUS_ACK]


def check_kill(rec: Recording, cut: int) -> AfterKill:
    """The property, for the primary killed after ``cut`` bytes."""
    after = replay(rec, cut)
    whole = [e for e, end in enumerate(rec.epoch_ends) if end <= cut]  # the model's view
    where = f"killed at byte {cut} of {len(rec.stream)} (epoch ends {rec.epoch_ends})"
    assert after.acked == whole, f"{where}: ACKed {after.acked}, whole {whole}"
    if not whole:
        assert isinstance(after.outcome, ReceiveError), f"{where}: {after.outcome!r}"
        assert after.sink.failed_over is None and after.sink.aborted, where
        return after
    last = whole[-1]
    out = after.outcome
    assert isinstance(out, Outcome) and out.kind == "failover" and out.epoch == last, (
        f"{where}: {out!r}")
    assert after.sink.failed_over == last and after.sink.committed_epochs == whole, where
    assert after.image == rec.disk[last], (
        f"{where}: the replica is not the primary's disk of epoch {last} (first difference "
        f"at byte {_first_difference(after.image, rec.disk[last])})")
    assert memory_at_each_epoch(bytes(after.sink.data))[last] == rec.memory[last], where
    return after


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), -1)


def model_disk(start: bytes, during: Sequence[Op], epochs: Sequence[Epoch]) -> list[bytes]:
    """The guest's disk at the end of each epoch, from its writes alone."""
    img = bytearray(start)
    out = []
    for i, (first, ops, tail, _pages) in enumerate(epochs):
        for kind, off, n, byte in [*(during if i == 0 else []), *first, *ops, *tail]:
            if kind != "flush":
                img[off:off + n] = bytes([byte]) * n
        out.append(bytes(img))
    return out


def cuts(rec: Recording, rnd: random.Random, n: int) -> list[int]:
    """Where to kill the primary: ``n`` uniform offsets, at and around each epoch's end,
    and inside a REMUS_DISK record of each epoch (mid-frame)."""
    out = {rnd.randint(0, len(rec.stream)) for _ in range(n)}
    for end in rec.epoch_ends:
        out |= {end - 1, end, end + 1}
    for start, end in rec.disk_records:
        out.add(rnd.randint(start + 1, end - 1))
    return sorted(c for c in out if 0 <= c <= len(rec.stream))


# -- the tests -------------------------------------------------------------------------------
_OP = st.one_of(
    st.tuples(st.sampled_from(["w", "w", "fua"]), st.integers(0, SIZE - 1),
              st.integers(1, 96 * 1024), st.integers(1, 255)).map(
        lambda t: (t[0], t[1], min(t[2], SIZE - t[1]), t[3])),
    st.just(("flush", 0, 0, 0)))
_EPOCH = st.tuples(st.lists(_OP, max_size=3), st.lists(_OP, max_size=6),
                   st.lists(_OP, max_size=3), st.lists(st.integers(0, PAGES - 1), max_size=6))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(same=st.lists(st.booleans(), min_size=4, max_size=4), during=st.lists(_OP, max_size=6),
       epochs=st.lists(_EPOCH, min_size=2, max_size=6),
       interval=st.sampled_from([0.002, 0.03]), rnd=st.randoms(use_true_random=True))
def test_the_backup_resumes_the_disk_and_memory_of_its_last_ack(
        same: list[bool], during: list[Op], epochs: list[Epoch], interval: float,
        rnd: random.Random) -> None:
    primary = rnd.randbytes(SIZE)
    replica = bytearray(primary)
    for i, eq in enumerate(same):
        if not eq:
            replica[i * CHUNK:(i + 1) * CHUNK] = rnd.randbytes(CHUNK)
    d = tempfile.mkdtemp(prefix="xr-dkf-", dir="/tmp")
    try:
        with own_state(d):
            rec = record(d, primary, bytes(replica), during, epochs, interval)
        model = model_disk(primary, during, epochs)
        assert [rec.disk[e] for e in range(len(epochs))] == model, "the primary's own disk"
        for cut in cuts(rec, rnd, 6):
            check_kill(rec, cut)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_writes_between_checkpoints_go_ahead_of_their_seal(tmp: str) -> None:
    """Given time between checkpoints, an epoch's early writes reach the backup
    streamed, ahead of its checkpoint, and its last ones with its SEAL, in the checkpoint;
    killed anywhere, the primary leaves the backup exactly its last ACKed epoch (what was
    streamed of a later one is dropped)."""
    epochs: list[Epoch] = [([], [], [("w", 0, 4096, 0x10)], [0])] + [
        ([("w", 3 << 20, 512, 0x80 + e)],
         [("w", e * 65536, 32768, 0x20 + e), ("fua", 1 << 20, 4096, 0x40 + e)],
         [("w", 2 << 20, 8192, 0x60 + e)], [e]) for e in range(1, 5)]
    with own_state(tmp):
        rec = record(tmp, bytes(SIZE), bytes(SIZE), [], epochs, interval=0.2)
    assert [rec.disk[e] for e in range(5)] == model_disk(bytes(SIZE), [], epochs)
    assert sum(rec.streamed) >= 4, "few writes went to the backup between checkpoints"
    assert sum(rec.in_checkpoints) >= 5, "the last writes of each epoch in its checkpoint"
    assert sum(rec.streamed) + sum(rec.in_checkpoints) == 1 + 4 * 4  # each write once
    for cut in cuts(rec, random.Random(5), 6):
        check_kill(rec, cut)


def test_an_epoch_without_its_disk_seal_is_never_acked_nor_resumed(tmp: str) -> None:
    """ACK = memory and disk seal: a checkpoint whose REMUS_DISK records are missing
    (here removed from epoch 2 of a recording) is not ACKed, and no copy of it runs."""
    w: Op = ("w", 0, 4096, 0x11)
    with own_state(tmp):
        rec = record(tmp, bytes(SIZE), bytes(SIZE), [w],
                     [([], [], [], []), ([], [("w", 8192, 512, 0x22)], [], [1]),
                      ([("w", 12288, 512, 0x35)], [("fua", 4096, 512, 0x33)],
                       [("w", 0, 512, 0x34)], [2]), ([], [], [], [3])])
    start, end = rec.epoch_ends[1], rec.epoch_ends[2]
    spans = [(s, e) for s, e in rec.disk_records if start <= s < end]
    assert spans, "epoch 2 carries its disk records"

    def without_disk(data: bytes) -> bytes:
        for s, e in reversed(spans):
            data = data[:s] + data[e:]
        return data

    after = replay(rec, end, without_disk)
    assert after.acked == [0, 1], after.acked
    assert after.sink.failed_over is None, "a copy without its disk must not run"
    assert isinstance(after.outcome, ReceiveError), after.outcome
    assert "epoch 2" in str(after.outcome), after.outcome
    assert after.image == rec.disk[1]  # nothing of epoch 2 applied


def test_a_stale_primary_is_refused_with_its_header_and_accept_in_one_read(
        tmp: str) -> None:
    """The backup failed over from this protection before: the same stream, read whole
    at once, is refused at the accept (no epoch ACKed, nothing resumed, the replica
    untouched), now that the driver has the header before the records after it."""
    with own_state(tmp):
        rec = record(tmp, bytes(SIZE), bytes(SIZE), [("w", 0, 4096, 0x11)],
                     [([], [], [], []), ([], [("w", 8192, 512, 0x22)], [], [1])])
    after = replay(rec, len(rec.stream),
                   before=lambda: GenerationStore().failed_over("g", GENERATION))
    assert after.acked == [] and after.sink.failed_over is None, after
    assert isinstance(after.outcome, ReceiveError), after.outcome
    assert "stale" in str(after.outcome), after.outcome
    assert after.image == bytes(SIZE)
