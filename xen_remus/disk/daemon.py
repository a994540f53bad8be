"""One replicated disk in dom0: the NBD server and its replication socket, one process.

The block hotplug script (hotplug/block-remus) starts it per guest disk: nbd-client
attaches the NBD socket to /dev/nbdN, which the guest uses through blkback. The epoch loop
(`xen-remus protect`) connects to the replication socket when it starts protecting:

    server ──BEGIN … CHUNK … SYNCED, W(e, off, data) … SEAL(e)──► protect ──► the backup
    server ◄──START(generation), BASE/NEED (relayed), SEAL(e) request, ACK(e)── protect

On that connection, once START names the protection, the server synchronises the backup's
replica (sync.py: the blocks its dirty bitmap marks, or every chunk whose hash differs) while
the guest's writes go on in the same stream (from its BEGIN on), and seals no epoch before
the synchronisation is all in the stream: the backup's copy is whole once epoch 0 commits.
Every write is marked in the dirty bitmap (persist.py), cleared as the backup ACKs its
epoch, so that the next protection after a lost backup or a restart of protect sends only
those blocks. When the connection ends (protection stopped, primary's epoch loop gone) the
disk is served on, locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from xen_remus.disk.errors import DiskError
from xen_remus.disk.link import ReplicaSender
from xen_remus.disk.persist import DirtyBitmap
from xen_remus.disk.replica import BASE, DEFAULT_CAP, NEED, SEAL, START, Frame
from xen_remus.disk.server import DiskServer
from xen_remus.disk.sync import synchronise

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0  # seconds between progress lines in the daemon's log


class ReplicatedDiskDaemon:
    """``image`` served on ``nbd_socket``; replicated to whoever connects to
    ``replica_socket`` (one connection at a time)."""

    def __init__(self, image: str, nbd_socket: str, replica_socket: str,
                 cap: int = DEFAULT_CAP) -> None:
        self.server = DiskServer(image, nbd_socket)
        self.replica_socket = replica_socket
        self.cap = cap  # unACKed bytes at which guest I/O waits (replica.DEFAULT_CAP)
        self.sender: ReplicaSender | None = None
        self.bitmap: DirtyBitmap | None = None
        self.generation = 0  # of the protection in progress (its START)
        self.synced_bytes = 0  # CHUNK bytes of the last synchronisation
        self._listener: asyncio.AbstractServer | None = None
        self._synced = asyncio.Event()
        self._answers: asyncio.Queue[Frame] = asyncio.Queue()
        self._sync: asyncio.Task[None] | None = None
        self._said = 0.0

    async def start(self) -> None:
        await self.server.start()
        try:
            self.bitmap = DirtyBitmap(self.server.image, self.server.size)
        except DiskError as exc:  # served all the same; every protection syncs by hashes
            log.error("%s: %s", self.server.name, exc)
        else:
            log.info("%s: %s", self.server.name, self.bitmap.why)
            self.server.dirty = self.bitmap
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
        if self.bitmap is not None:
            self.bitmap.close()

    async def _replicate(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if self.sender is not None and self.sender.lost is None:
            log.error("%s: a second replication connection refused", self.server.name)
            writer.close()
            return
        # Each protection counts its epochs from 0.
        self.server.epoch = 0
        if self.bitmap is not None:
            self.bitmap.restart()
        self._synced.clear()
        self._answers = asyncio.Queue()
        sender = ReplicaSender(reader, writer, first_epoch=0, cap=self.cap,
                               on_request=self._request, from_loop=True, on_ack=self._acked)
        self.sender = sender  # the server's sink from BEGIN on (_synchronise)
        log.info("%s: replicating", self.server.name)
        try:
            await sender.run()
        finally:
            if self._sync is not None:
                self._sync.cancel()
                self._sync = None
            if self.server.sink is sender:
                self.server.sink = None
            log.info("%s: replication ended (%s); serving locally", self.server.name,
                     sender.lost)

    def _request(self, frame: Frame) -> None:
        sender = self.sender
        assert sender is not None
        if frame.kind == START:
            if self._sync is not None:
                raise DiskError(f"a second START (at {frame.at})")
            self.generation = frame.offset
            self._sync = asyncio.get_running_loop().create_task(self._synchronise(sender))
        elif frame.kind in (BASE, NEED):
            self._answers.put_nowait(frame)
        elif frame.kind == SEAL:
            if self._synced.is_set():
                self._seal(frame.epoch)
            else:  # epoch 0 ends only once the synchronisation is in the stream
                asyncio.get_running_loop().create_task(self._seal_when_synced(frame.epoch))

    async def _synchronise(self, sender: ReplicaSender) -> None:
        fd = os.open(self.server.image, os.O_RDONLY | os.O_CLOEXEC)
        # Guest writes join the stream from here, and synchronise() puts BEGIN into it
        # before its first await: no W precedes BEGIN (the backup, not yet synchronising,
        # would hold it as an epoch's write). Those before are in the image it reads.
        self.server.sink = sender
        try:
            self.synced_bytes = await synchronise(
                fd, self.server.size, self.server.epoch, self.generation, sender,
                self._answers, self.bitmap, self._progress)
        except DiskError as exc:
            log.error("%s: initial synchronisation: %s", self.server.name, exc)
            sender.release(f"initial synchronisation: {exc}")
            return
        except OSError as exc:
            log.error("%s: initial synchronisation: %s", self.server.name, exc.strerror)
            sender.release(f"initial synchronisation: {exc.strerror}")
            return
        finally:
            os.close(fd)
        if sender.lost is None:
            self._synced.set()

    def _progress(self, done: int, total: int) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._said >= PROGRESS_EVERY or done >= total:
            self._said = now
            log.info("%s: initial synchronisation %d/%d bytes", self.server.name, done,
                     total)

    def _acked(self, epoch: int) -> None:
        if self.bitmap is not None:
            self.bitmap.acked(self.generation, epoch)

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
                ready: asyncio.Event | None = None, cap: int = DEFAULT_CAP) -> None:
    """Serve until SIGTERM or SIGINT."""
    daemon = ReplicatedDiskDaemon(image, nbd_socket, replica_socket, cap)
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
