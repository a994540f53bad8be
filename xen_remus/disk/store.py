"""The backup's epoch store: each epoch's writes held apart until that epoch commits.

Writes arrive for the open epoch; SEAL closes it ("disk sealed through N"); commit(N)
applies every sealed epoch through N to the image in order (sorted and coalesced within an
epoch, then one fdatasync); failover drops whatever is not committed (the guest resumes
from memory checkpoint N, so its disk must be the disk of epoch N, not later).

Within an epoch the last writer wins per byte range: the epoch is a map of disjoint
intervals, and a write trims or replaces what it overlaps, so an epoch that rewrites the
same blocks holds them once. Held data stays in memory up to ``memory_ceiling`` bytes (all
held epochs together); past it, new data goes to an unlinked spill file and is read back at
commit. Memory accounting counts the bytes an interval covers; a trimmed write's buffer
stays alive until all its pieces are gone, so the true figure can be higher.

Thread-safe: the stream reader (write, seal) and the memory side (wait_sealed, commit,
failover) may run in different threads. Commits are serialised; the lock is not held while
the image is written, so the stream is never stalled behind a commit.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from xen_remus.disk.errors import DiskError, EpochError

DEFAULT_MEMORY_CEILING: Final = 512 * 1024 * 1024
_IOV_MAX: Final = 1024  # Linux's UIO_MAXIOV
_BATCH: Final = 8 * 1024 * 1024  # at most this much data per pwritev


@dataclass(slots=True)
class _Piece:
    """Bytes for [start, end): in memory (``mem``) or at ``spos`` in the spill file."""

    start: int
    end: int
    mem: memoryview | None
    spos: int = 0

    def cut(self, start: int, end: int) -> _Piece:
        """The part of this piece covering [start, end), without copying."""
        a, b = start - self.start, end - self.start
        if self.mem is not None:
            return _Piece(start, end, self.mem[a:b])
        return _Piece(start, end, None, self.spos + a)


@dataclass(slots=True)
class _Epoch:
    """One epoch's writes: disjoint pieces sorted by start (``starts`` mirrors them)."""

    number: int
    starts: list[int] = field(default_factory=list)
    pieces: list[_Piece] = field(default_factory=list)
    writes: int = 0

    def put(self, new: _Piece) -> int:
        """Insert ``new``, trimming what it overlaps; returns the in-memory bytes removed."""
        s, e = new.start, new.end
        i = bisect.bisect_right(self.starts, s) - 1
        keep: list[_Piece] = []
        if i >= 0 and self.pieces[i].end > s:
            first = i  # a piece starting before ``new`` overlaps it: keep its head
        else:
            first = i + 1
        j = first
        while j < len(self.pieces) and self.pieces[j].start < e:
            j += 1
        removed = 0
        for p in self.pieces[first:j]:
            if p.mem is not None:
                removed += p.end - p.start
            if p.start < s:
                keep.append(p.cut(p.start, s))
            if p.end > e:
                keep.append(p.cut(e, p.end))
        mem_kept = sum(k.end - k.start for k in keep if k.mem is not None)
        repl = sorted([*keep, new], key=lambda p: p.start)
        self.pieces[first:j] = repl
        self.starts[first:j] = [p.start for p in repl]
        self.writes += 1
        return removed - mem_kept


class EpochStore:
    """Epochs first_epoch, first_epoch+1, ... of one image, applied only on commit."""

    def __init__(self, image: str, first_epoch: int = 0,
                 memory_ceiling: int = DEFAULT_MEMORY_CEILING,
                 spill_dir: str | None = None) -> None:
        self.image = image
        try:
            self._fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"disk store: cannot open image {image}: {exc.strerror}") from exc
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self.memory_ceiling = memory_ceiling
        self._spill_dir = spill_dir
        self._spill: int | None = None  # fd of the unlinked spill file, opened on demand
        self._spill_end = 0
        self._open = _Epoch(first_epoch)
        self._sealed: list[_Epoch] = []  # sealed, not yet committed, in order
        self.sealed_through = first_epoch - 1
        self.committed_through = first_epoch - 1
        self.memory_bytes = 0
        self.spilled_bytes = 0  # written to the spill file since it was last emptied
        self._lock = threading.Lock()
        self._sealed_cv = threading.Condition(self._lock)
        self._commit_lock = threading.Lock()

    # -- the stream's side --------------------------------------------------------------------
    @property
    def open_epoch(self) -> int:
        return self._open.number

    def write(self, epoch: int, offset: int, data: bytes) -> None:
        if not data:
            raise DiskError(f"empty write at {offset} in epoch {epoch}")
        if offset + len(data) > self.size:
            raise DiskError(f"write of {len(data)} bytes at {offset} beyond the image size"
                            f" {self.size} ({self.image})")
        with self._lock:
            if epoch != self._open.number:
                raise EpochError(f"write at {offset} for epoch {epoch}, but epoch"
                                 f" {self._open.number} is open")
            end = offset + len(data)
            if self.memory_bytes + len(data) > self.memory_ceiling:
                piece = _Piece(offset, end, None, self._to_spill(data))
            else:
                piece = _Piece(offset, end, memoryview(data))
                self.memory_bytes += len(data)
            self.memory_bytes -= self._open.put(piece)

    def _to_spill(self, data: bytes) -> int:
        if self._spill is None:
            fd, path = tempfile.mkstemp(prefix="xen-remus-disk-spill.", dir=self._spill_dir)
            os.unlink(path)  # nothing to clean up, whatever happens to us
            self._spill = fd
        pos = self._spill_end
        done = 0
        while done < len(data):  # pwrite to a regular file is rarely short, but may be
            done += os.pwrite(self._spill, data[done:], pos + done)
        self._spill_end += len(data)
        self.spilled_bytes += len(data)
        return pos

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes (the initial synchronisation compares them)."""
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise DiskError(f"disk store {self.image}: reading {length} bytes at {offset}:"
                            f" {exc.strerror}") from exc

    def write_through(self, epoch: int, offset: int, data: bytes) -> None:
        """Write into the image now (the initial synchronisation: no checkpoint to keep)."""
        if offset + len(data) > self.size:
            raise DiskError(f"write of {len(data)} bytes at {offset} beyond the image size"
                            f" {self.size} ({self.image})")
        with self._lock:
            if self._sealed or self._open.pieces:
                raise EpochError(f"write through at {offset} while epoch writes are held")
        self._pwritev([data], offset, len(data), epoch)

    def seal(self, epoch: int) -> None:
        with self._lock:
            if epoch != self._open.number:
                raise EpochError(f"SEAL({epoch}) while epoch {self._open.number} is open")
            self._sealed.append(self._open)
            self._open = _Epoch(epoch + 1)
            self.sealed_through = epoch
            self._sealed_cv.notify_all()

    # -- the memory side ----------------------------------------------------------------------
    def wait_sealed(self, epoch: int, timeout: float) -> bool:
        """True once SEAL(epoch) is in (the backup may then ACK checkpoint ``epoch``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.sealed_through < epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sealed_cv.wait(left)
            return True

    def commit(self, epoch: int) -> int:
        """Apply every sealed epoch through ``epoch`` to the image; returns writes applied.

        Committing an epoch already committed is a no-op; one not yet sealed is an error
        (the backup must not ACK a checkpoint whose disk seal is missing).
        """
        with self._commit_lock:
            with self._lock:
                if epoch <= self.committed_through:
                    return 0
                if epoch > self.sealed_through:
                    raise EpochError(f"disk store {self.image}: commit({epoch}) but the disk"
                                     f" is sealed only through epoch {self.sealed_through}")
                todo = [e for e in self._sealed if e.number <= epoch]
                self._sealed = self._sealed[len(todo):]
            applied = 0
            for ep in todo:
                applied += self._apply(ep)
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise DiskError(f"disk store {self.image}: fdatasync after epoch {epoch}:"
                                f" {exc.strerror}") from exc
            with self._lock:
                self.committed_through = epoch
                for ep in todo:
                    self.memory_bytes -= sum(p.end - p.start for p in ep.pieces
                                             if p.mem is not None)
                self._maybe_reset_spill()
            return applied

    def failover(self, committed: int) -> int:
        """Memory checkpoint ``committed`` is what resumes: commit through it, drop the rest.

        Returns the number of writes dropped (the open epoch and sealed, uncommitted ones).
        """
        self.commit(committed)
        with self._commit_lock, self._lock:
            dropped = self._open.writes + sum(e.writes for e in self._sealed)
            self._sealed = []
            self._open = _Epoch(self._open.number)
            self.memory_bytes = 0
            self._maybe_reset_spill()
            return dropped

    def close(self) -> None:
        with self._lock:
            for fd in (self._spill, self._fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            self._spill = None
            self._fd = -1

    def __enter__(self) -> EpochStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- applying -----------------------------------------------------------------------------
    def _maybe_reset_spill(self) -> None:
        """Empty the spill file once no held piece refers to it (lock held)."""
        if self._spill is None or self._sealed or self._open.pieces:
            return
        os.ftruncate(self._spill, 0)
        self._spill_end = 0
        self.spilled_bytes = 0

    def _bytes(self, p: _Piece) -> bytes | memoryview:
        if p.mem is not None:
            return p.mem
        assert self._spill is not None
        n = p.end - p.start
        data = os.pread(self._spill, n, p.spos)
        if len(data) != n:
            raise DiskError(f"disk store {self.image}: spill file short read at {p.spos}")
        return data

    def _apply(self, ep: _Epoch) -> int:
        """Write one epoch: adjacent pieces go out together in one pwritev."""
        i, n = 0, len(ep.pieces)
        while i < n:
            start = ep.pieces[i].start
            bufs = [self._bytes(ep.pieces[i])]
            size = len(bufs[0])
            j = i + 1
            while (j < n and ep.pieces[j].start == ep.pieces[j - 1].end
                   and len(bufs) < _IOV_MAX and size < _BATCH):
                bufs.append(self._bytes(ep.pieces[j]))
                size += len(bufs[-1])
                j += 1
            self._pwritev(bufs, start, size, ep.number)
            i = j
        return ep.writes

    def _pwritev(self, bufs: list[bytes | memoryview], offset: int, size: int,
                 epoch: int) -> None:
        done = 0
        try:
            while done < size:
                if done:  # a short write: finish it from a flat copy of what is left
                    flat = b"".join(bufs)[done:]
                    done += os.pwrite(self._fd, flat, offset + done)
                else:
                    done += os.pwritev(self._fd, bufs, offset)
        except OSError as exc:
            raise DiskError(f"disk store {self.image}: writing epoch {epoch} at"
                            f" {offset + done}: {exc.strerror}") from exc
