"""Reads and writes on plain file descriptors (pipes, sockets, files), bounded in time:
writev until every byte is out, read what is there, wait for an fd. The one place that
knows how a short write resumes and how a deadline bounds a wait.

Deadlines are time.monotonic() seconds; None waits for ever. Blocking and non-blocking
fds both work: a non-blocking fd that is not ready is waited on, not spun on.
"""

from __future__ import annotations

import contextlib
import os
import select
import tempfile
import time
from collections.abc import Sequence

from xen_remus.errors import XenRemusError
from xen_remus.stream.events import Buffer

IOV_MAX = 1024  # Linux's limit of buffers per writev

# At most this much per read: a pipe holds 64 KiB by default, and glibc serves a request
# above its mmap threshold (128 KiB by default) with mmap, so os.read(fd, 1 MiB) of a pipe
# holding 8 KiB (socat's blocks) costs an mmap, an mremap and a munmap each time (in a
# fresh process: 37 us a read against 2 us for a 64 KiB request).
READ_SIZE = 64 << 10


class IoTimeout(XenRemusError):
    """Nothing came (or nothing could go) before the deadline; names what was awaited."""

    def __init__(self, what: str) -> None:
        super().__init__(f"timed out waiting for {what}")


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def wait_fd(fd: int, events: int, deadline: float | None, what: str) -> None:
    """Block until ``fd`` is ready for ``events`` (select.POLLIN / POLLOUT; a hang-up or
    an error counts as ready: the next call reports it), or raise IoTimeout once
    ``deadline`` has passed."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise IoTimeout(what)
        if poller.poll(None if left is None else max(1, int(left * 1000))):
            return


def readable(fd: int) -> bool:
    """Whether reading ``fd`` would not block now (data, EOF or an error waits)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def read_some(fd: int, timeout: float | None, what: str, size: int = READ_SIZE) -> bytes:
    """What ``fd`` has (at most ``size`` bytes; b"" at EOF), waiting at most ``timeout``
    seconds for it (IoTimeout names ``what``). OSError from the read passes through."""
    wait_fd(fd, select.POLLIN, deadline_after(timeout), what)
    return os.read(fd, size)


class Iovecs:
    """The bytes of ``bufs`` not written yet, for os.writev: a short write (pipes,
    sockets, a non-blocking fd) resumes exactly where it stopped. ``written`` counts
    the bytes out so far."""

    def __init__(self, bufs: Sequence[Buffer]) -> None:
        self._views = [memoryview(b).cast("B") for b in bufs if memoryview(b).nbytes]
        self._i = 0
        self.written = 0

    def __bool__(self) -> bool:
        """Whether bytes are left to write."""
        return self._i < len(self._views)

    def writev(self, fd: int, max_bytes: int | None = None) -> int:
        """One os.writev of the next buffers (at most IOV_MAX; with ``max_bytes``, only
        up to the buffer that reaches it); returns the bytes written. Raises what writev
        raises, BlockingIOError included."""
        views, i = self._views, self._i
        stop = min(len(views), i + IOV_MAX)
        j = stop
        if max_bytes is not None:
            j, size = i, 0
            while j < stop and size < max_bytes:
                size += views[j].nbytes
                j += 1
        n = os.writev(fd, views[i:j])
        self.written += n
        left = n
        while left and i < len(views):
            if left >= views[i].nbytes:
                left -= views[i].nbytes
                i += 1
            else:
                views[i], left = views[i][left:], 0
        self._i = i
        return n


def write_all(fd: int, bufs: Sequence[Buffer] | Iovecs, timeout: float | None,
              what: str) -> None:
    """writev every byte of ``bufs`` to ``fd``, within ``timeout`` seconds in all (then
    IoTimeout, naming ``what``). Pass an Iovecs to learn how far it got if it fails;
    OSError (BrokenPipeError: the reader is gone) passes through."""
    out = bufs if isinstance(bufs, Iovecs) else Iovecs(bufs)
    deadline = deadline_after(timeout)
    while out:
        if deadline is not None:
            wait_fd(fd, select.POLLOUT, deadline, what)
        try:
            out.writev(fd)
        except BlockingIOError:
            if deadline is None:  # else the wait above comes next
                wait_fd(fd, select.POLLOUT, None, what)


def replace_durably(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the directory: after a crash the file is the old one or the new
    one, never a mix. Raises OSError."""
    directory = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
