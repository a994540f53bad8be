"""The initial synchronisation of a replica, in the replication stream before SEAL(0).

    primary                                    backup
    BEGIN(size, base of its dirty bitmap) ──►  is the replica still at that base?
                                          ◄──  BASE(1: yes, 0: no)
    yes: CHUNK(each dirty block)          ──►  written into the replica at once
    no:  SUMS(SHA-256 of 64 chunks)       ──►  hashes its own chunks
                                          ◄──  NEED(bitmap of those that differ)
         CHUNK(each chunk asked for)      ──►  written into the replica at once
    SYNCED                                ──►  the stream's epochs start holding writes

The guest runs meanwhile: its writes go on as W frames in the same stream, which the
backup also writes at once until SYNCED. Everything reaches the replica in stream order,
and the primary reads a chunk and queues it with no await in between, so a chunk read
before a write is followed by that write and one read after it already holds it: when
SEAL(0) comes (after SYNCED), the replica is the primary's image at that seal. A SUMS that
matches is equally safe: the backup compares after applying every write queued before
it, so equal hashes mean the chunk is already what the primary had, and later writes follow.

``synchronise`` is the primary's side (in the disk daemon's loop); ``ReplicaSync`` the
backup's (in BackupStream); ``SyncProgress`` follows both directions for the epoch loop,
which relays them and reports progress.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from xen_remus.disk.errors import DiskError
from xen_remus.disk.persist import NO_BASE, DirtyBitmap, ReplicaRecord
from xen_remus.disk.replica import (
    BASE,
    BEGIN,
    CHUNK,
    NEED,
    SUMS,
    SYNCED,
    Frame,
    FrameDecoder,
    frame_bytes,
)
from xen_remus.disk.store import EpochStore

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1 << 20  # bytes per hash, and at most per CHUNK frame
DIGEST_SIZE: Final = 32  # SHA-256: the fastest on hosts with SHA extensions
BATCH: Final = 64  # chunks per SUMS frame
WINDOW: Final = 4  # SUMS frames awaiting their NEED at most
BACKLOG: Final = 8  # frames queued ahead of the transport at most


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Begin:
    """BEGIN's data: the image, the chunk size, this protection's generation and the base
    of the primary's dirty bitmap (NO_BASE: none trusted) with the bytes it marks."""

    size: int
    chunk: int
    generation: int
    base_generation: int = NO_BASE
    base_epoch: int = NO_BASE
    dirty_bytes: int = 0

    _S = struct.Struct(">QIQQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.size, self.chunk, self.generation, self.base_generation,
                            self.base_epoch, self.dirty_bytes)

    @classmethod
    def unpack(cls, data: bytes) -> Begin:
        if len(data) != cls._S.size:
            raise DiskError(f"BEGIN data of {len(data)} bytes, expected {cls._S.size}")
        b = cls(*cls._S.unpack(data))
        if not 0 < b.chunk <= CHUNK_SIZE * 64:
            raise DiskError(f"BEGIN with a chunk size of {b.chunk}")
        return b


class ReplicaSync:
    """The backup's side: answers BEGIN and SUMS, writes CHUNKs (and, until SYNCED, the
    guest's writes) straight into the replica. ``record``: the replica's record on this
    host (None: not kept, as in tests without a state directory)."""

    def __init__(self, store: EpochStore, record: ReplicaRecord | None = None) -> None:
        self.store = store
        self.record = record
        self.active = False
        self.begun: Begin | None = None
        self.received = 0  # CHUNK bytes
        self.sealed = False  # an epoch was sealed: too late to begin

    def seal(self) -> None:
        if self.active:
            raise DiskError("the initial synchronisation is not complete")
        self.sealed = True

    def through(self, epoch: int, offset: int, data: bytes) -> None:
        self._epoch(epoch)
        self.store.write_through(epoch, offset, data)

    def _epoch(self, epoch: int) -> None:
        if epoch != self.store.open_epoch:
            raise DiskError(f"epoch {epoch} while epoch {self.store.open_epoch} is open")

    def frame(self, f: Frame) -> bytes:
        """Act on BEGIN, SUMS, CHUNK or SYNCED; returns the answer (b"" for none)."""
        self._epoch(f.epoch)
        if f.kind == BEGIN:
            return self._begin(f)
        if not self.active or self.begun is None:
            raise DiskError("no synchronisation in progress (BEGIN missing, or SYNCED"
                            " already)")
        if f.kind == SUMS:
            return self._sums(f, self.begun.chunk)
        if f.kind == CHUNK:
            self.store.write_through(f.epoch, f.offset, f.data)
            self.received += len(f.data)
        elif f.kind == SYNCED:
            self.active = False
            log.info("disk replica %s: synchronised (%d bytes received)", self.store.image,
                     self.received)
        return b""

    def _begin(self, f: Frame) -> bytes:
        if self.begun is not None:
            raise DiskError("a second BEGIN")
        if self.sealed:
            raise DiskError(f"BEGIN after epoch {self.store.sealed_through} was sealed")
        b = Begin.unpack(f.data)
        if b.size != self.store.size:
            raise DiskError(f"the primary's image has {b.size} bytes, the replica"
                            f" {self.store.image} {self.store.size}")
        at_base = (b.base_generation != NO_BASE and self.record is not None
                   and self.record.at_base(b.base_generation, b.size))
        if self.record is not None:  # before any byte of this protection reaches it
            self.record.write(b.generation, "replica", b.size)
        self.begun, self.active = b, True
        log.info("disk replica %s: synchronising %s", self.store.image,
                 f"the {b.dirty_bytes} bytes marked since generation {b.base_generation}"
                 f" epoch {b.base_epoch}" if at_base else "by chunk hashes")
        return frame_bytes(BASE, f.epoch, 1 if at_base else 0)

    def _sums(self, f: Frame, chunk: int) -> bytes:
        n, rest = divmod(len(f.data), DIGEST_SIZE)
        if rest or not n or f.offset % chunk or f.offset + (n - 1) * chunk >= self.store.size:
            raise DiskError(f"SUMS of {len(f.data)} bytes at {f.offset} do not fit the"
                            f" image ({self.store.size} bytes, chunks of {chunk})")
        need = bytearray(-(-n // 8))
        for i in range(n):
            off = f.offset + i * chunk
            mine = digest(self.store.read(off, min(chunk, self.store.size - off)))
            if mine != f.data[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]:
                need[i >> 3] |= 1 << (i & 7)
        return frame_bytes(NEED, f.epoch, f.offset, bytes(need))


class SyncSender(Protocol):
    """What synchronise needs of the replication sender (link.ReplicaSender)."""

    @property
    def lost(self) -> str | None: ...

    @property
    def backlog(self) -> int: ...

    def control(self, frame: bytes) -> None: ...


Progress = Callable[[int, int], None]  # (bytes done, bytes to do)


async def synchronise(image_fd: int, size: int, epoch: int, generation: int,
                      sender: SyncSender, answers: asyncio.Queue[Frame],
                      bitmap: DirtyBitmap | None, progress: Progress | None = None,
                      chunk: int = CHUNK_SIZE) -> int:
    """The primary's side, in the server's loop (``epoch``: its open epoch, which must
    stay open until this returns); ``answers`` gets the backup's BASE and NEED frames.
    Returns the bytes sent in CHUNKs; returns early if the sender is lost."""
    base = bitmap.base if bitmap is not None and bitmap.trusted else None
    runs = bitmap.runs() if base is not None and bitmap is not None else []
    dirty = sum(n for _, n in runs)
    begin = Begin(size, chunk, generation, *(base or (NO_BASE, NO_BASE)), dirty)
    sender.control(frame_bytes(BEGIN, epoch, size, begin.pack()))
    answer = await answers.get()
    if answer.kind != BASE:
        raise DiskError(f"{answer.name} (at {answer.at}) before the backup's BASE")
    t0 = time.monotonic()
    sent = 0

    async def send(off: int, n: int) -> None:
        nonlocal sent
        while sender.backlog >= BACKLOG and sender.lost is None:
            await asyncio.sleep(0.005)
        if sender.lost is None:  # read and queued with no await between (see above)
            data = os.pread(image_fd, n, off)
            if len(data) != n:
                raise DiskError(f"reading {n} bytes at {off} for the synchronisation got"
                                f" {len(data)}")
            sender.control(frame_bytes(CHUNK, epoch, off, data))
            sent += n

    if answer.offset == 1 and base is not None:
        log.info("initial synchronisation: the %d bytes marked in the dirty bitmap since"
                 " generation %d epoch %d", dirty, *base)
        done = 0
        for off, n in runs:
            for o in range(off, off + n, chunk):
                await send(o, min(chunk, off + n - o))
                done += min(chunk, off + n - o)
                if progress is not None:
                    progress(done, dirty)
    else:
        log.info("initial synchronisation by chunk hashes (%s)",
                 "the replica is not at the bitmap's base" if base is not None else
                 bitmap.why if bitmap is not None else "no dirty bitmap")
        await _by_hashes(image_fd, size, epoch, chunk, sender, answers, send, progress)
    sender.control(frame_bytes(SYNCED, epoch, sent))
    log.info("initial synchronisation queued: %d bytes sent in %.1f s", sent,
             time.monotonic() - t0)
    return sent


async def _by_hashes(fd: int, size: int, epoch: int, chunk: int, sender: SyncSender,
                     answers: asyncio.Queue[Frame],
                     send: Callable[[int, int], object], progress: Progress | None) -> None:
    waiting: dict[int, int] = {}  # SUMS offset -> chunks in it
    done = 0

    async def answer() -> None:
        nonlocal done
        f = await answers.get()
        count = waiting.pop(f.offset, None) if f.kind == NEED else None
        if count is None or len(f.data) != -(-count // 8):
            raise DiskError(f"{f.name} at {f.offset} ({len(f.data)} bytes) answers no SUMS"
                            f" sent (awaiting {sorted(waiting)})")
        for i in range(count):
            off = f.offset + i * chunk
            n = min(chunk, size - off)
            if f.data[i >> 3] & (1 << (i & 7)):
                await send(off, n)  # type: ignore[misc]
            done += n
            if progress is not None:
                progress(done, size)

    for first in range(0, size, BATCH * chunk):
        while len(waiting) >= WINDOW:
            await answer()
        if sender.lost is not None:
            return
        sums = []
        for off in range(first, min(first + BATCH * chunk, size), chunk):
            sums.append(digest(os.pread(fd, min(chunk, size - off), off)))
            await asyncio.sleep(0)  # a guest request may go between two chunks
        waiting[first] = len(sums)
        sender.control(frame_bytes(SUMS, epoch, first, b"".join(sums)))
    while waiting:
        await answer()


class SyncProgress:
    """The synchronisation as the epoch loop relays it: ``forward`` the frames it sends
    the backup, ``back`` the bytes the backup answers; ``done``/``total`` in bytes."""

    def __init__(self) -> None:
        self.size = self.total = self.done = 0
        self.sent = 0  # CHUNK bytes
        self.chunk = CHUNK_SIZE
        self.dirty_bytes = 0
        self.mode: str | None = None  # "dirty blocks" or "hashes", once BASE came
        self.begun = self.finished = False
        self._back = FrameDecoder()

    def forward(self, frames: list[Frame]) -> None:
        for f in frames:
            if f.kind == BEGIN:
                b = Begin.unpack(f.data)
                self.begun, self.size, self.chunk = True, b.size, b.chunk
                self.total, self.dirty_bytes = b.size, b.dirty_bytes
            elif f.kind == CHUNK:
                self.sent += len(f.data)
                if self.mode == "dirty blocks":
                    self.done += len(f.data)
            elif f.kind == SYNCED:
                self.finished = True
                self.done = self.total

    def back(self, data: bytes) -> None:
        for f in self._back.feed(data):
            if f.kind == BASE:
                self.mode = "dirty blocks" if f.offset == 1 else "hashes"
                if f.offset == 1:
                    self.total = self.dirty_bytes
            elif f.kind == NEED:  # the chunks answered count as done once answered
                n = len(f.data) * 8
                end = min(f.offset + n * self.chunk, self.size)
                self.done = max(self.done, min(end, f.offset + BATCH * self.chunk))
