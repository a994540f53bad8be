"""The replication stream over an asyncio connection: the primary's sender (a WriteSink
for the DiskServer) and the backup's receiving loop (frames into an EpochStore, ACKs back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from xen_remus.disk.errors import DiskError, ReplicaStreamError
from xen_remus.disk.replica import DEFAULT_CAP, AckReader, BackupStream, Frame, PrimaryLog
from xen_remus.disk.store import EpochStore

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
HIGH_WATER = 4 * 1024 * 1024  # bytes in the transport's buffer before the sender waits


class ReplicaSender:
    """The primary's end: completed writes and SEALs out, ACKs in; counts unACKed bytes.

    Never blocks the guest on the backup: frames are queued here (no copy) and ``run()``
    (which must be running) sends them in order, keeping at most HIGH_WATER bytes in the
    transport; the queue is bounded by the cap on unACKed bytes, at which ``full`` tells
    the server to stop taking requests. When the backup is lost (EOF, error, a bad ACK,
    ``release()``), replication stops: ``full`` is False from then on, writes are no longer
    queued, and ``on_lost`` is told why. ``on_request`` gets the frames the peer sends
    besides ACKs (the backup's BASE and NEED; with it, the epoch loop's SEAL and START
    too); ``on_ack`` each epoch the backup now holds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 first_epoch: int = 0, cap: int = DEFAULT_CAP,
                 on_lost: Callable[[str], None] | None = None,
                 on_request: Callable[[Frame], None] | None = None,
                 from_loop: bool = False,
                 on_ack: Callable[[int], None] | None = None) -> None:
        self.log = PrimaryLog(first_epoch, cap)
        self._on_request = on_request
        self._on_ack = on_ack
        self.lost: str | None = None
        self._reader = reader
        self._writer = writer
        self._on_lost = on_lost
        self._acks = AckReader(from_loop=from_loop)
        self._room = asyncio.Event()
        self._room.set()
        self._out: deque[bytes] = deque()
        self._wake = asyncio.Event()
        # A transport's buffer is one bytearray; kept small, appending to it stays cheap.
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)

    @property
    def full(self) -> bool:
        return self.lost is None and self.log.full

    @property
    def backlog(self) -> int:
        """Frames queued, not yet handed to the transport."""
        return len(self._out)

    @property
    def acked_through(self) -> int:
        return self.log.acked_through

    def write(self, epoch: int, offset: int, data: bytes) -> None:
        if self.lost is not None:
            return
        self._queue(*self.log.write(epoch, offset, data))
        if self.log.full:
            self._room.clear()

    def seal(self, epoch: int) -> None:
        if self.lost is not None:
            return
        self._queue(self.log.seal(epoch))

    def control(self, frame: bytes) -> None:
        """A frame of the synchronisation, in stream order (not counted to the cap: the
        backup writes it at once, and the synchronisation waits on ``backlog``)."""
        if self.lost is None:
            self._queue(frame)

    def committed(self, epoch: int) -> None:
        """The backup committed ``epoch`` (its memory ACK): as good as a disk ACK of it."""
        if self.lost is None and epoch < self.log.epoch:
            self._ack(epoch)

    async def wait_room(self) -> None:
        await self._room.wait()

    def release(self, why: str = "replication released") -> None:
        """Stop replicating; the disk goes on being served locally."""
        self._lose(why)

    async def run(self) -> None:
        """Send the frames and read the ACKs until the connection ends (backup lost)."""
        pump = asyncio.create_task(self._pump())
        try:
            while self.lost is None:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    self._lose("the backup closed the replication connection")
                    return
                for epoch in self._acks.feed(data):
                    self._ack(epoch)
                requests, self._acks.requests = self._acks.requests, []
                for frame in requests:
                    if self._on_request is None:
                        raise DiskError(f"{frame.name} frame (at {frame.at}) unexpected")
                    self._on_request(frame)
        except (ConnectionError, OSError) as exc:
            self._lose(f"replication connection failed: {exc}")
        except DiskError as exc:
            self._lose(str(exc))
        finally:
            pump.cancel()
            await asyncio.wait([pump])

    def _queue(self, *bufs: bytes) -> None:
        self._out.extend(bufs)
        self._wake.set()

    async def _pump(self) -> None:
        try:
            while self.lost is None:
                await self._wake.wait()
                self._wake.clear()
                while self._out and self.lost is None:
                    batch, size = [], 0
                    while self._out and size < HIGH_WATER:
                        batch.append(self._out.popleft())
                        size += len(batch[-1])
                    self._writer.writelines(batch)
                    await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._lose(f"replication connection failed: {exc}")

    def _ack(self, epoch: int) -> None:
        before = self.log.acked_through
        self.log.ack(epoch)
        if not self.log.full:
            self._room.set()
        if self._on_ack is not None and self.log.acked_through > before:
            self._on_ack(self.log.acked_through)

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        self._out.clear()
        self._wake.set()
        self._room.set()  # the server must not wait for a backup that is gone
        self._writer.close()
        log.warning("disk replication stopped: %s (acked through epoch %d)", why,
                    self.log.acked_through)
        if self._on_lost is not None:
            self._on_lost(why)


async def serve_backup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       store: EpochStore) -> str:
    """Feed one primary's stream into ``store`` and ACK each SEAL; returns how it ended.

    A frame cut short by the end of the stream is dropped (the primary died mid-frame);
    the open epoch stays in the store until ``store.failover()`` drops it.
    """
    stream = BackupStream(store)
    why = "cancelled"
    try:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                why = "the primary closed the replication stream"
                break
            acks = stream.feed(data)
            if acks:
                writer.write(acks)
                await writer.drain()
    except ReplicaStreamError as exc:
        why = str(exc)
        log.error("%s", why)
    except (ConnectionError, OSError) as exc:
        why = f"replication connection failed: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if stream.pending:
        why += (f"; a frame of which {stream.pending} bytes had arrived (at stream offset"
                f" {stream.offset}) was dropped")
    log.info("disk replica %s: %s; sealed through epoch %d", store.image, why,
             store.sealed_through)
    return why
