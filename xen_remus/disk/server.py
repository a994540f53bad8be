"""The NBD server of one image, on a Unix socket, in one asyncio loop.

READ is a pread, WRITE a pwrite (FUA: then fdatasync), FLUSH an fdatasync. Requests are
handled one at a time per connection, and a write's pwrite and its hand-off to the
replication sink happen with no await between them: the loop orders writes, so the
image and the replication stream see them in the same order, and ``seal(N)`` (also run in
the loop) falls between two writes, never inside one. A write is handed to the sink before
it is answered, so every write the guest has seen completed is in the stream before the
SEAL that follows it.

Backpressure: when the sink is ``full`` (too many bytes the backup has not ACKed), the
server stops reading requests until it has room; guest I/O waits, nothing is dropped.
fdatasync runs in a worker thread (it may take long) while the connection waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from xen_remus.disk import nbd
from xen_remus.disk.errors import DiskError, EpochError
from xen_remus.disk.persist import DirtyBitmap

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024  # bytes read from the client at a time
STALL_LOG_EVERY = 5.0  # s between log lines about a replication backlog at its cap


class WriteSink(Protocol):
    """Where completed writes go (the replication stream), in image order."""

    @property
    def full(self) -> bool:
        """True while the server must not take more requests."""
        ...

    def write(self, epoch: int, offset: int, data: bytes) -> None: ...

    def seal(self, epoch: int) -> None: ...

    async def wait_room(self) -> None:
        """Return once ``full`` is False (or replication has stopped)."""
        ...


def _nbd_error(exc: OSError) -> int:
    # proto.md: EDQUOT and EFBIG are reported as ENOSPC; anything unexpected as EIO.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return nbd.ENOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return nbd.EPERM
    return nbd.EIO


@dataclass
class ServerStats:
    """What a DiskServer has done, over all its connections."""

    writes: int = 0
    bytes_written: int = 0
    syncs: int = 0  # fdatasyncs done (FLUSH, FUA)
    stalls: int = 0  # times a connection stopped reading at the sink's cap


class DiskServer:
    """Serve ``image`` over NBD on the Unix socket ``socket_path``.

    ``epoch`` is the open epoch: writes are handed to the sink labelled with it, and
    ``seal(epoch)`` closes it. With no sink the disk is simply served (unreplicated). A sink
    that fails (DiskError) is dropped: guest I/O goes on locally, ``replication_error``
    says why.
    """

    def __init__(self, image: str, socket_path: str, export: str = "",
                 sink: WriteSink | None = None, first_epoch: int = 0) -> None:
        self.image = image
        self.socket_path = socket_path
        self.export = export
        self.size = 0  # of the image, once started
        self.stats = ServerStats()
        # Replication: the open epoch's writes go to the sink, until it fails.
        self.sink = sink
        self.epoch = first_epoch
        self.replication_error: str | None = None  # why the sink was dropped, if it was
        # Every write is marked here with its epoch, replicated or not (persist.py).
        self.dirty: DirtyBitmap | None = None
        self._fd = -1
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stall_said = -STALL_LOG_EVERY  # loop time of the last stall log line

    @property
    def name(self) -> str:
        return f"disk {self.image} (nbd {self.socket_path})"

    async def start(self) -> None:
        try:
            self._fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            self._close_fd()
            raise DiskError(f"{self.name}: cannot open the image: {exc.strerror}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a leftover socket of ours
        try:
            self._server = await asyncio.start_unix_server(self._client, self.socket_path)
        except OSError as exc:
            self._close_fd()
            raise DiskError(f"{self.name}: cannot listen: {exc.strerror}") from exc
        log.info("%s: serving %d bytes", self.name, self.size)

    async def close(self) -> None:
        """Stop listening, end the connections, close the image."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def seal(self, epoch: int) -> None:
        """Epoch ``epoch`` ends here (the guest is suspended); call it in the server's loop.

        Sealing the epoch just sealed again is a no-op (a retried postsuspend).
        """
        if epoch == self.epoch - 1:
            return
        if epoch != self.epoch:
            raise EpochError(f"{self.name}: seal({epoch}) but epoch {self.epoch} is open")
        self.epoch = epoch + 1
        if self.sink is not None:
            try:
                self.sink.seal(epoch)
            except DiskError as exc:
                self._drop_sink(exc)
                raise DiskError(f"{self.name}: sealing epoch {epoch}: {exc}") from exc

    # -- one connection -------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("%s: client connection lost: %s", self.name, exc)
        except asyncio.CancelledError:
            # close() ends us so; returning (not re-raising) keeps asyncio's stream callback
            # from logging the cancelled handler as an error.
            log.info("%s: client connection closed by the server", self.name)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        # Replies are batched and go out before every await (one send for many pipelined
        # requests); none waits for more input than the next await.
        conn = nbd.ServerConnection(self.size, self.export)
        out: list[bytes] = []

        async def send() -> None:
            if out:
                writer.writelines(out)
                out.clear()
            await writer.drain()

        while True:
            ev = conn.next_event()
            if isinstance(ev, nbd.Send):
                out.append(ev.data)
            elif isinstance(ev, nbd.Read):
                out.extend(self._read(ev))
            elif isinstance(ev, nbd.Write):
                err = self._write(ev)
                if ev.fua and err == 0:
                    await send()
                    err = await self._sync(f"FUA WRITE at {ev.offset}")
                out.append(nbd.simple_reply(ev.handle, err))
                sink = self.sink
                if sink is not None and sink.full:
                    await send()
                    await self._stall(sink)
            elif isinstance(ev, nbd.Flush):
                await send()
                out.append(nbd.simple_reply(ev.handle, await self._sync(f"FLUSH {ev.handle}")))
            elif isinstance(ev, nbd.Ready):
                log.info("%s: client attached to export %r", self.name, ev.export)
            elif isinstance(ev, nbd.Closed):
                (log.error if ev.error else log.info)("%s: %s", self.name, ev.reason)
                await send()
                return
            else:  # NEED_DATA
                await send()
                sink = self.sink
                if sink is not None and sink.full:  # another connection filled it
                    await self._stall(sink)
                conn.receive_data(await reader.read(READ_CHUNK))

    async def _stall(self, sink: WriteSink) -> None:
        """The replication backlog is at its cap: take no request until there is room."""
        self.stats.stalls += 1
        now = asyncio.get_running_loop().time()
        if now - self._stall_said >= STALL_LOG_EVERY:
            self._stall_said = now
            log.info("%s: replication backlog at its cap: guest I/O waits for the backup's "
                     "ACK (%d stalls so far)", self.name, self.stats.stalls)
        await sink.wait_room()

    def _read(self, ev: nbd.Read) -> tuple[bytes, ...]:
        """The reply to a READ: header and data, or an error header."""
        try:
            data = os.pread(self._fd, ev.length, ev.offset)
        except OSError as exc:
            log.error("%s: READ of %d bytes at %d: %s", self.name, ev.length, ev.offset,
                      exc.strerror)
            return (nbd.simple_reply(ev.handle, _nbd_error(exc)),)
        if len(data) != ev.length:  # the image shrank under us
            log.error("%s: READ of %d bytes at %d got %d", self.name, ev.length, ev.offset,
                      len(data))
            return (nbd.simple_reply(ev.handle, nbd.EIO),)
        return nbd.simple_reply(ev.handle), data

    def _write(self, ev: nbd.Write) -> int:
        """pwrite, then hand the write to the sink (no await between): its NBD error."""
        try:
            done = os.pwrite(self._fd, ev.data, ev.offset)
            while done < len(ev.data):  # short writes to a regular file are rare
                done += os.pwrite(self._fd, ev.data[done:], ev.offset + done)
        except OSError as exc:
            log.error("%s: WRITE of %d bytes at %d: %s", self.name, len(ev.data), ev.offset,
                      exc.strerror)
            return _nbd_error(exc)
        self.stats.writes += 1
        self.stats.bytes_written += len(ev.data)
        if self.dirty is not None:
            self.dirty.mark(self.epoch, ev.offset, len(ev.data))
        if self.sink is not None:
            try:
                self.sink.write(self.epoch, ev.offset, ev.data)
            except DiskError as exc:
                self._drop_sink(exc)
        return 0

    def _drop_sink(self, exc: DiskError) -> None:
        """Replication failed: the guest goes on with its local disk (backup lost)."""
        log.error("%s: replication stopped: %s", self.name, exc)
        self.replication_error = str(exc)
        self.sink = None

    async def _sync(self, what: str) -> int:
        try:
            await asyncio.to_thread(os.fdatasync, self._fd)
        except OSError as exc:
            log.error("%s: %s: fdatasync: %s", self.name, what, exc.strerror)
            return _nbd_error(exc)
        self.stats.syncs += 1
        return 0
