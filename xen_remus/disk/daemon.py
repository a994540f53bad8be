"""One replicated disk in dom0: the NBD server and its replication socket, one process.

The block hotplug script (hotplug/block-remus) starts it per guest disk: nbd-client
attaches the NBD socket to /dev/nbdN, which the guest uses through blkback. The epoch loop
(`xen-remus protect`) connects to the replication socket when it starts protecting:

    server ──W(e, off, data) … SEAL(e)──► protect ──in checkpoint e──► the backup
    server ◄──SEAL(e) request, ACK(e)──── protect (postsuspend(e), commit(e))

On that connection the server first sends the whole image (the initial synchronisation,
as writes of the connection's first epoch), interleaved in order with the guest's writes,
and seals no epoch before the image is all in the stream: the backup's copy is whole
once epoch 0 commits. When the connection ends (protection stopped, primary's epoch loop
gone) the disk is served on, locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from xen_remus.disk.errors import DiskError
from xen_remus.disk.link import ReplicaSender
from xen_remus.disk.server import DiskServer

log = logging.getLogger(__name__)

SYNC_CHUNK = 1 << 20  # bytes of the image per initial-synchronisation write
SYNC_BACKLOG = 8  # chunks queued ahead of the transport at most


class ReplicatedDiskDaemon:
    """``image`` served on ``nbd_socket``; replicated to whoever connects to
    ``replica_socket`` (one connection at a time)."""

    def __init__(self, image: str, nbd_socket: str, replica_socket: str) -> None:
        self.server = DiskServer(image, nbd_socket)
        self.replica_socket = replica_socket
        self.sender: ReplicaSender | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._synced = asyncio.Event()

    async def start(self) -> None:
        await self.server.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.replica_socket)
        try:
            self._listener = await asyncio.start_unix_server(self._replicate,
                                                             self.replica_socket)
        except OSError as exc:
            await self.server.close()
            raise DiskError(f"{self.server.name}: cannot listen on {self.replica_socket}: "
                            f"{exc.strerror}") from exc

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.replica_socket)
        await self.server.close()

    async def _replicate(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if self.sender is not None and self.sender.lost is None:
            log.error("%s: a second replication connection refused", self.server.name)
            writer.close()
            return
        # Each protection counts its epochs from 0.
        self.server.epoch = 0
        self._synced.clear()
        sender = ReplicaSender(reader, writer, first_epoch=0,
                               on_seal_request=self._seal_request)
        self.sender = self.server.sink = sender
        log.info("%s: replicating (initial synchronisation of %d bytes)", self.server.name,
                 self.server.size)
        sync = asyncio.create_task(self._sync(sender))
        try:
            await sender.run()
        finally:
            sync.cancel()
            if self.server.sink is sender:
                self.server.sink = None
            log.info("%s: replication ended (%s); serving locally", self.server.name,
                     sender.lost)

    async def _sync(self, sender: ReplicaSender) -> None:
        """Queue the whole image; each chunk is read and queued with no await in between,
        so a guest write before it is in the chunk and one after it follows it."""
        fd = os.open(self.server.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off in range(0, self.server.size, SYNC_CHUNK):
                while sender.backlog >= SYNC_BACKLOG and sender.lost is None:
                    await asyncio.sleep(0.01)
                if sender.lost is not None:
                    return
                sender.write(self.server.epoch, off, os.pread(fd, SYNC_CHUNK, off))
        finally:
            os.close(fd)
        log.info("%s: initial synchronisation queued", self.server.name)
        self._synced.set()

    def _seal_request(self, epoch: int) -> None:
        if self._synced.is_set():
            self._seal(epoch)
        else:  # epoch 0 ends only once the whole image is in the stream
            asyncio.get_running_loop().create_task(self._seal_when_synced(epoch))

    async def _seal_when_synced(self, epoch: int) -> None:
        await self._synced.wait()
        self._seal(epoch)

    def _seal(self, epoch: int) -> None:
        try:
            self.server.seal(epoch)
        except DiskError as exc:
            log.error("%s", exc)
            if self.sender is not None:
                self.sender.release(str(exc))


async def serve(image: str, nbd_socket: str, replica_socket: str,
                ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    daemon = ReplicatedDiskDaemon(image, nbd_socket, replica_socket)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await daemon.close()
