"""The replicated disk as a checkpointed Device of the epoch loop (primary side).

``postsuspend(N)`` seals epoch N in the disk stream while the guest is suspended: every
write the guest saw complete is already in the stream, so SEAL(N) follows them (a server
in another process says it sealed, and the frames through SEAL(N) follow into checkpoint N
as it is sent: remote.py). ``idle``, while the guest runs between checkpoints, moves the
open epoch's writes on towards the backup, so that little is left for the checkpoint.
``commit`` tells the stream the backup holds N (its unACKed bytes are freed).
``release_all`` stops replicating (backup lost or failover): the disk is then served
locally only.

A replica that fails once protection runs (its server gone, the stream to it broken, a
seal that never comes) is a lost backup for the epoch loop: ReplicaLost (a BackupLost
naming the disk), and the guest goes on here unprotected.

The Device talks to its server through a DiskControl, so that the server may live in this
process (``LoopControl``: a DiskServer in an asyncio loop on another thread) or elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from xen_remus.channel.link import BackupLost
from xen_remus.devices.base import Device, DeviceError
from xen_remus.disk.link import ReplicaSender
from xen_remus.disk.server import DiskServer
from xen_remus.errors import XenRemusError

T = TypeVar("T")
DEFAULT_TIMEOUT = 5.0  # seconds for one control call (a seal runs while the guest waits)


class DiskControl(Protocol):
    """What the Device needs from one replicated disk's server."""

    @property
    def name(self) -> str: ...

    def connect(self) -> None:
        """Start replicating to the backup."""

    def seal(self, epoch: int) -> None: ...

    def idle(self) -> None:
        """Between checkpoints: move the open epoch's writes on, without waiting."""

    def commit(self, epoch: int) -> None: ...

    def release(self) -> None:
        """Stop replicating; the disk goes on locally."""

    def disconnect(self) -> None:
        """Undo connect(); safe after a failed connect, and twice."""


class ReplicaLost(BackupLost):
    """A disk's replication failed: the backup's copy of that disk cannot follow."""


class ReplicatedDisk(Device):
    """One guest disk, replicated; commits before the network (order 0)."""

    order = 0

    def __init__(self, control: DiskControl) -> None:
        self.control = control

    @property
    def name(self) -> str:
        return self.control.name

    def _do(self, what: str, op: Callable[[], T], lost: bool = False) -> T:
        try:
            return op()
        except BackupLost:
            raise
        except Exception as exc:
            if lost:
                raise ReplicaLost(f"replication of {self.name} failed ({what}): "
                                  f"{str(exc) or type(exc).__name__}") from exc
            if isinstance(exc, XenRemusError):
                raise
            raise DeviceError(f"{self.name}: {what}: {str(exc) or type(exc).__name__}") from exc

    def guarded(self, what: str, op: Callable[[], T]) -> T:
        """``op`` on this disk's replication (e.g. the initial synchronisation): its
        failure is ReplicaLost."""
        return self._do(what, op, lost=True)

    def setup(self) -> None:
        self._do("connect", self.control.connect)

    def postsuspend(self, epoch: int) -> None:
        self._do(f"seal epoch {epoch}", lambda: self.control.seal(epoch), lost=True)

    def idle(self) -> None:
        self._do("between checkpoints", self.control.idle, lost=True)

    def commit(self, epoch: int) -> None:
        self._do(f"commit epoch {epoch}", lambda: self.control.commit(epoch), lost=True)

    def release_all(self) -> None:
        self._do("release", self.control.release)

    def teardown(self) -> None:
        self._do("disconnect", self.control.disconnect)


class LoopControl:
    """Control of a DiskServer that runs in ``loop`` on another thread.

    ``open_link(first_epoch)`` runs in the loop and returns the ReplicaSender of a new
    connection to the backup; its epochs start at the server's open epoch.
    """

    def __init__(self, server: DiskServer, loop: asyncio.AbstractEventLoop,
                 open_link: Callable[[int], Awaitable[ReplicaSender]],
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.server = server
        self.loop = loop
        self.open_link = open_link
        self.timeout = timeout
        self.sender: ReplicaSender | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.server.name

    def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        if _running_loop() is self.loop:  # waiting for it here would deadlock
            raise DeviceError(f"{self.name}: {what} called from the server's own loop")
        fut = asyncio.run_coroutine_threadsafe(_run(fn), self.loop)
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise DeviceError(f"{self.name}: {what} took longer than {self.timeout} s"
                              ) from None

    def connect(self) -> None:
        async def go() -> None:
            if self.sender is not None and self.sender.lost is None:
                return
            self.sender = await self.open_link(self.server.epoch)
            self.server.sink = self.sender
            self._reader = asyncio.get_running_loop().create_task(self.sender.run())
        self._call("connect", go)

    def seal(self, epoch: int) -> None:
        async def go() -> None:
            self.server.seal(epoch)
        self._call(f"seal({epoch})", go)

    def idle(self) -> None:
        """Nothing: the sender sends each write as it comes."""

    def commit(self, epoch: int) -> None:
        async def go() -> None:
            if self.sender is not None:
                self.sender.committed(epoch)
        self._call(f"commit({epoch})", go)

    def release(self) -> None:
        async def go() -> None:
            self.server.sink = None
            if self.sender is not None:
                self.sender.release()
        self._call("release", go)

    def disconnect(self) -> None:
        async def go() -> None:
            self.server.sink = None
            if self.sender is not None:
                self.sender.release("replication disconnected")
            if self._reader is not None:
                self._reader.cancel()
            self.sender = self._reader = None
        self._call("disconnect", go)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
