"""One replicated disk in dom0: the NBD server and its replication socket, one process.

The block hotplug script (hotplug/block-remus) starts it per guest disk: nbd-client
attaches the NBD socket to /dev/nbdN, which the guest uses through blkback. The epoch loop
(`xen-remus protect`) connects to the replication socket when it starts protecting:

    server ──BEGIN … CHUNK … SYNCED, W(e, off, data) … SEAL(e)──► protect ──► the backup
    server ◄──START(generation), BASE/NEED (relayed), SEAL(e) request, ACK(e)── protect
    server ◄──CONTROL(generation), SEAL(e) request──► SEAL(e) done ── protect (its seals)

On that connection, once START names the protection, the server synchronises the backup's
replica (sync.py: the blocks its dirty bitmap marks, or every chunk whose hash differs) while
the guest's writes go on in the same stream (from its BEGIN on), and seals no epoch before
the synchronisation is all in the stream: the backup's copy is whole once epoch 0 commits.
Every write is marked in the dirty bitmap (persist.py), cleared as the backup ACKs its
epoch, so that the next protection after a lost backup or a restart of protect sends only
those blocks. When the connection ends (protection stopped, primary's epoch loop gone) the
disk is served on, locally.

A second connection, opened with CONTROL and the generation of the protection in
progress, carries protect's seal requests during its pauses: each is answered as soon as
the epoch is sealed, while the stream's SEAL(e) may wait behind a backlog of writes that
protect then reads with the guest running again.
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
from xen_remus.disk.replica import (
    BASE,
    CONTROL,
    DEFAULT_CAP,
    HEADER_SIZE,
    NEED,
    SEAL,
    START,
    Frame,
    FrameDecoder,
    seal_frame,
)
from xen_remus.disk.server import DiskServer
from xen_remus.disk.sync import synchronise

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0  # seconds between progress lines in the daemon's log
CONTROL_WAIT = 5.0  # s for a control connection's CONTROL, and its protection's START


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
        self._controls: set[asyncio.StreamWriter] = set()  # of the protection in progress
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
            await self._control(self.sender, reader, writer)
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
            for control in list(self._controls):
                control.close()  # its reader sees the end; no seal is answered any more
            log.info("%s: replication ended (%s); serving locally", self.server.name,
                     sender.lost)

    async def _control(self, sender: ReplicaSender, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """A second connection while ``sender``'s protection runs: its seal connection if
        it opens with CONTROL and that protection's generation, else refused. Each
        SEAL(e) on it is answered with SEAL(e) once epoch e is sealed."""
        dec = FrameDecoder()
        try:
            head = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), CONTROL_WAIT)
            first = next(iter(dec.feed(head)), None)  # None: a frame with data
            for _ in range(int(CONTROL_WAIT / 0.01)):  # its START may not be read yet
                if self._sync is not None or sender.lost is not None:
                    break
                await asyncio.sleep(0.01)
            if (first is None or first.kind != CONTROL or sender.lost is not None
                    or self._sync is None or first.offset != self.generation):
                what = "a frame with data" if first is None else f"{first.name} {first.offset}"
                log.error("%s: a second replication connection refused (%s; generation %d)",
                          self.server.name, what, self.generation)
                return
            self._controls.add(writer)
            while sender.lost is None:
                data = await reader.read(4096)
                if not data:
                    return
                for f in dec.feed(data):
                    if f.kind != SEAL:
                        raise DiskError(f"{f.name} frame (at {f.at}) on the control "
                                        "connection")
                    if not await self._synced_or_lost(sender):
                        return
                    self._seal(f.epoch)
                    if sender.lost is not None:
                        return
                    writer.write(seal_frame(f.epoch))
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
            log.error("%s: control connection: %s", self.server.name,
                      str(exc) or type(exc).__name__)
        except DiskError as exc:
            log.error("%s: control connection: %s", self.server.name, exc)
        finally:
            self._controls.discard(writer)
            writer.close()

    async def _synced_or_lost(self, sender: ReplicaSender) -> bool:
        """Wait for the synchronisation to be all in the stream: True, or False if the
        replication ended first (no epoch is sealed before it)."""
        while not self._synced.is_set() and sender.lost is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), 0.1)
        return sender.lost is None

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
