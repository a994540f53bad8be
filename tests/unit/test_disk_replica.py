"""The replication stream and the backup's epoch store, without sockets.

The property: random writes, flushes and seals on the primary, the primary killed anywhere
in its stream (mid-frame too), the backup fed whatever arrived in any chunking: after
failover the backup's image is exactly the model replayed through the last committed epoch.
Here the memory checkpoint's commit is a coin toss; test_disk_failover.py checks the same
property through the production ends (disk daemon, epoch loop, receiver and its ACKs).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xen_remus.disk import replica
from xen_remus.disk.errors import DiskError, EpochError, ReplicaStreamError
from xen_remus.disk.replica import (
    ACK,
    HEADER_SIZE,
    SEAL,
    AckReader,
    BackupStream,
    Frame,
    FrameDecoder,
    PrimaryLog,
    W,
)
from xen_remus.disk.store import EpochStore

SIZE = 64 * 1024


def image(tmp: Path, name: str = "img", fill: bytes = b"\0") -> str:
    path = tmp / name
    path.write_bytes(fill * SIZE)
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EpochStore]:
    with EpochStore(image(tmp_path)) as s:
        yield s


def frames_of(*bufs: bytes | tuple[bytes, bytes]) -> bytes:
    return b"".join(b if isinstance(b, bytes) else b[0] + b[1] for b in bufs)


# -- frames ---------------------------------------------------------------------------------
def test_frames_round_trip_in_any_chunking() -> None:
    stream = frames_of(replica.write_frame(3, 4096, b"abc" * 100), replica.seal_frame(3),
                       replica.ack_frame(3), replica.write_frame(4, 0, b"z"))
    want = [Frame(W, 3, 4096, b"abc" * 100, 0),
            Frame(SEAL, 3, 0, b"", HEADER_SIZE + 300),
            Frame(ACK, 3, 0, b"", 2 * HEADER_SIZE + 300),
            Frame(W, 4, 0, b"z", 3 * HEADER_SIZE + 300)]
    for step in (1, 7, 36, 37, 1000):
        dec = FrameDecoder()
        got: list[Frame] = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        assert got == want and dec.pending == 0 and dec.offset == len(stream)


@pytest.mark.parametrize("where", [0, 4, 5, 8, 16, 24, 28, 32, 36, 40, 99])
def test_any_damaged_byte_is_caught_naming_the_frames_offset(where: int) -> None:
    good = frames_of(replica.write_frame(1, 512, b"d" * 64))
    bad = bytearray(frames_of(replica.write_frame(1, 0, b"e" * 64)))
    bad[where] ^= 0x40
    dec = FrameDecoder()
    with pytest.raises(ReplicaStreamError) as ei:
        dec.feed(good + bytes(bad))
    assert ei.value.offset == len(good)
    assert f"stream offset {len(good)}" in str(ei.value)
    with pytest.raises(ReplicaStreamError):  # the decoder stays failed
        dec.feed(b"")


def test_backup_refuses_out_of_order_frames_naming_offset_and_epoch(
        store: EpochStore) -> None:
    bs = BackupStream(store)
    ok = frames_of(replica.write_frame(0, 0, b"a"), replica.seal_frame(0))
    assert bs.feed(ok) == replica.ack_frame(0)
    with pytest.raises(ReplicaStreamError) as ei:
        bs.feed(frames_of(replica.write_frame(5, 0, b"a")))
    assert (ei.value.offset, ei.value.epoch) == (len(ok), 5)
    assert "epoch 1 is open" in str(ei.value)
    for bad in (replica.seal_frame(3), replica.ack_frame(0),
                replica.write_frame(1, SIZE - 1, b"ab")):
        with pytest.raises(ReplicaStreamError):
            BackupStream(store).feed(frames_of(bad))


def test_ack_reader_takes_only_acks() -> None:
    r = AckReader()
    assert r.feed(replica.ack_frame(1) + replica.ack_frame(2)[:10]) == [1]
    assert r.feed(replica.ack_frame(2)[10:]) == [2]
    with pytest.raises(ReplicaStreamError, match="only ACK"):
        AckReader().feed(replica.seal_frame(1))


def test_primary_log_counts_unacked_bytes_to_the_cap() -> None:
    log = PrimaryLog(first_epoch=5, cap=3 * (HEADER_SIZE + 100))
    log.write(5, 0, b"x" * 100)
    log.write(5, 100, b"x" * 100)
    assert not log.full
    log.seal(5)
    log.write(6, 0, b"x" * 100)
    assert log.full and log.unacked == 4 * HEADER_SIZE + 300
    log.ack(5)
    assert not log.full and log.unacked == HEADER_SIZE + 100 and log.acked_through == 5
    log.ack(4)  # stale: no-op
    with pytest.raises(DiskError, match="not sealed"):
        log.ack(6)
    with pytest.raises(DiskError, match="epoch 6 is open"):
        log.write(7, 0, b"x")
    with pytest.raises(DiskError, match="epoch 6 is open"):
        log.seal(9)


# -- the store ------------------------------------------------------------------------------
def test_store_holds_epochs_apart_until_commit(store: EpochStore) -> None:
    store.write(0, 0, b"A" * 1024)
    store.write(0, 512, b"B" * 1024)  # overlaps: last writer wins
    store.seal(0)
    store.write(1, 100, b"C" * 10)
    assert Path(store.image).read_bytes() == bytes(SIZE)  # nothing applied yet
    with pytest.raises(EpochError, match="sealed only through epoch 0"):
        store.commit(1)
    assert store.commit(0) == 2
    assert store.commit(0) == 0  # again: no-op
    img = Path(store.image).read_bytes()
    assert img[:512] == b"A" * 512 and img[512:1536] == b"B" * 1024 and img[1536:] == bytes(
        SIZE - 1536)
    assert store.failover(0) == 1  # the open epoch's write is dropped
    assert Path(store.image).read_bytes() == img


def test_failover_commits_through_the_memory_checkpoint_and_drops_later_seals(
        store: EpochStore) -> None:
    for e in range(4):
        store.write(e, e * 1000, bytes([65 + e]) * 1000)
        store.seal(e)
    store.write(4, 0, b"!" * 10)
    assert store.failover(1) == 3  # epochs 2 and 3 were sealed but memory has only 1
    img = Path(store.image).read_bytes()
    assert img[:2000] == b"A" * 1000 + b"B" * 1000 and img[2000:] == bytes(SIZE - 2000)
    with pytest.raises(EpochError):
        store.failover(7)  # never sealed: the disk cannot match that memory


def test_store_spills_past_the_memory_ceiling_and_empties_the_spill(tmp_path: Path) -> None:
    with EpochStore(image(tmp_path), memory_ceiling=3000, spill_dir=str(tmp_path)) as s:
        for i in range(8):
            s.write(0, i * 1000, bytes([i + 1]) * 1000)
        s.write(0, 2500, b"\xee" * 3000)  # overlaps memory and spilled pieces
        assert s.memory_bytes <= 3000 and s.spilled_bytes > 0
        assert os.listdir(tmp_path) == ["img"]  # the spill file is unlinked
        s.seal(0)
        s.commit(0)
        assert s.memory_bytes == 0 and s.spilled_bytes == 0
    model = bytearray(SIZE)
    for i in range(8):
        model[i * 1000:(i + 1) * 1000] = bytes([i + 1]) * 1000
    model[2500:5500] = b"\xee" * 3000
    assert Path(tmp_path / "img").read_bytes() == bytes(model)


def test_wait_sealed_wakes_on_seal_and_times_out(store: EpochStore) -> None:
    t0 = time.monotonic()
    assert not store.wait_sealed(0, timeout=0.05)
    assert time.monotonic() - t0 < 2
    threading.Timer(0.05, lambda: store.seal(0)).start()
    assert store.wait_sealed(0, timeout=5)
    assert store.wait_sealed(-1, timeout=0)


def test_store_refuses_bad_writes(store: EpochStore) -> None:
    with pytest.raises(DiskError, match="beyond the image size"):
        store.write(0, SIZE - 10, b"x" * 11)
    with pytest.raises(DiskError, match="empty write"):
        store.write(0, 0, b"")
    with pytest.raises(EpochError, match="SEAL\\(3\\)"):
        store.seal(3)


def test_missing_image_is_a_disk_error(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="cannot open image"):
        EpochStore(str(tmp_path / "nope"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 5000),
                          st.integers(0, 255)), max_size=40),
       st.sampled_from([0, 2000, 1 << 30]))
def test_one_epoch_last_writer_wins_per_byte(writes: list[tuple[int, int, int]],
                                             ceiling: int) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d, EpochStore(
            image(Path(d)), memory_ceiling=ceiling) as s:
        model = bytearray(SIZE)
        for off, n, b in writes:
            n = min(n, SIZE - off)
            s.write(0, off, bytes([b]) * n)
            model[off:off + n] = bytes([b]) * n
        ep = s._open
        assert all(p.start < p.end for p in ep.pieces)
        assert all(a.end <= b.start for a, b in zip(ep.pieces, ep.pieces[1:], strict=False))
        assert ep.starts == [p.start for p in ep.pieces]
        s.seal(0)
        s.commit(0)
        assert Path(s.image).read_bytes() == bytes(model)


# -- the property ---------------------------------------------------------------------------
_WRITE = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3000), st.integers(1, 255))
# One epoch: its writes and flushes (None) in order; a SEAL follows every epoch but the last.
_EPOCHS = st.lists(st.lists(st.one_of(_WRITE, st.none()), max_size=8), min_size=2,
                   max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_EPOCHS, st.data(), st.sampled_from([0, 4000, 1 << 30]))
def test_killed_primary_leaves_the_backup_at_the_last_committed_epoch(
        epochs: list[list[tuple[int, int, int] | None]], data: st.DataObject,
        ceiling: int) -> None:
    import tempfile
    log = PrimaryLog(first_epoch=0)
    stream = bytearray()
    model_epochs: list[list[tuple[int, bytes]]] = []
    for i, ops in enumerate(epochs):
        model_epochs.append([])
        for op in ops:
            if op is None:
                continue  # a flush is local durability on the primary: nothing to stream
            off, n, b = op
            payload = bytes([b]) * min(n, SIZE - off)
            stream += b"".join(log.write(log.epoch, off, payload))
            model_epochs[-1].append((off, payload))
        if i < len(epochs) - 1:
            stream += log.seal(log.epoch)
    # Killed anywhere, mid-frame included: uniform over the stream's bytes (hypothesis's
    # own integers lean to the ends, which would rarely reach a SEAL).
    rnd = data.draw(st.randoms(use_true_random=True), label="rnd")
    cut = rnd.randint(0, len(stream))
    with tempfile.TemporaryDirectory() as d, EpochStore(
            image(Path(d), fill=b"\x5a"), memory_ceiling=ceiling) as s:
        bs = BackupStream(s)
        acks = AckReader()
        committed = -1
        pos = 0
        while pos < cut:
            n = data.draw(st.integers(1, cut - pos), label="chunk")
            for epoch in acks.feed(bs.feed(bytes(stream[pos:pos + n]))):
                # The backup ACKs; the memory checkpoint may or may not have committed.
                log.ack(epoch)
                if data.draw(st.booleans(), label=f"memory {epoch} commits now"):
                    s.commit(epoch)
                    committed = epoch
            pos += n
        # Memory may have committed a sealed epoch whose disk commit did not run yet.
        last = rnd.randint(committed, s.sealed_through)
        s.failover(last)
        model = bytearray(b"\x5a" * SIZE)
        for ep in model_epochs[:last + 1]:
            for off, payload in ep:
                model[off:off + len(payload)] = payload
        assert Path(s.image).read_bytes() == bytes(model)
        assert s.memory_bytes == 0
        assert log.acked_through == s.sealed_through


# -- the property, with the initial synchronisation ----------------------------------------
class _Wire:
    """The real ``synchronise`` against a live backup: every frame goes into ``stream``
    and, at once, into the backup, whose answers go back into ``answers``."""

    def __init__(self, backup: BackupStream) -> None:
        import asyncio
        self.backup, self.stream = backup, bytearray()
        self.answers: asyncio.Queue[Frame] = asyncio.Queue()
        self.lost: str | None = None
        self.backlog = 0
        self._back = FrameDecoder()

    def control(self, frame: bytes) -> None:
        self.stream += frame
        for f in self._back.feed(self.backup.feed(frame)):
            self.answers.put_nowait(f)


_SYNC_WRITE = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 9000), st.integers(1, 255))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(st.lists(st.booleans(), min_size=16, max_size=16), st.lists(_SYNC_WRITE, max_size=12),
       _EPOCHS, st.data())
def test_a_killed_primary_during_or_after_the_synchronisation_never_tears_the_backup(
        same: list[bool], during: list[tuple[int, int, int]],
        epochs: list[list[tuple[int, int, int] | None]], data: st.DataObject) -> None:
    """The replica starts with some chunks equal to the primary's; the guest writes while
    the real synchronise runs (hash mode, 4 KiB chunks), then in sealed epochs. Killed
    anywhere: the backup is exactly the primary of the last committed epoch."""
    import asyncio
    import tempfile

    from xen_remus.disk.sync import synchronise
    chunk = SIZE // 16
    rnd = data.draw(st.randoms(use_true_random=True), label="rnd")
    with tempfile.TemporaryDirectory() as d:
        prim = Path(d) / "p"
        prim.write_bytes(rnd.randbytes(SIZE))
        start = bytearray(prim.read_bytes())
        for i, eq in enumerate(same):
            if not eq:
                start[i * chunk:(i + 1) * chunk] = rnd.randbytes(chunk)
        rep = Path(d) / "r"
        rep.write_bytes(start)
        live = EpochStore(str(rep))
        wire = _Wire(BackupStream(live))
        log = PrimaryLog(first_epoch=0)
        fd = os.open(prim, os.O_RDWR)

        def guest_write(off: int, n: int, b: int) -> None:
            payload = bytes([b]) * min(n, SIZE - off)
            os.pwrite(fd, payload, off)
            wire.control(b"".join(log.write(log.epoch, off, payload)))

        async def guest() -> None:
            for w in during:
                await asyncio.sleep(0)
                guest_write(*w)

        async def run() -> None:
            g = asyncio.create_task(guest())
            await synchronise(fd, SIZE, 0, 1, wire, wire.answers, None, chunk=chunk)
            await g

        try:
            asyncio.run(run())
            at_epoch: list[bytes] = []
            for i, ops in enumerate(epochs):
                for op in ops:
                    if op is not None:
                        guest_write(*op)
                if i < len(epochs) - 1:
                    wire.control(log.seal(log.epoch))
                    at_epoch.append(os.pread(fd, SIZE, 0))
        finally:
            os.close(fd)
            live.close()
        stream = bytes(wire.stream)
        cut = rnd.randint(0, len(stream))
        rep.write_bytes(start)
        with EpochStore(str(rep)) as s:
            bs = BackupStream(s)
            committed, pos = -1, 0
            while pos < cut:
                n = rnd.randint(1, min(cut - pos, 20000))
                for epoch in AckReader().feed(bs.feed(stream[pos:pos + n])):
                    if rnd.random() < 0.5:  # the memory checkpoint commits now, or later
                        s.commit(epoch)
                        committed = epoch
                pos += n
            if s.sealed_through < 0:
                return  # no checkpoint: the backup aborts, its replica is not a disk yet
            last = rnd.randint(max(committed, 0), s.sealed_through)
            s.failover(last)
            assert rep.read_bytes() == at_epoch[last]
