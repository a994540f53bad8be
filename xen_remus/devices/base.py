"""The interface of a checkpointed device, and the set that drives a domain's devices.

Per epoch (ARCHITECTURE.md), the epoch loop calls, for epoch N:

    suspend guest -> postsuspend(N) -> preresume() -> resume guest -> send epoch N
    -> backup ACKs N -> commit(N)

and ``idle()`` again and again while the loop waits between two checkpoints (for an ACK or
the next interval): work that need not wait for the pause (a disk sends the open epoch's
writes on), so that the pause itself has little left to do.

``postsuspend(N)`` marks the boundary: everything the guest did before this suspend belongs
to epoch N (for the network: its output so far is sealed as epoch N's buffer and a new
buffer starts). ``commit(N)`` says the backup holds epoch N: release exactly epoch N's
output. ``release_all()`` lets everything out because protection stops and the guest goes
on here. ``teardown()`` removes whatever ``setup()`` created and never releases: what is
still held then belongs to epochs the backup does not have, and the backup's copy, not
this one, is the one that may speak for them (it is dropped).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from types import TracebackType

from xen_remus.errors import XenRemusError


class DeviceError(XenRemusError):
    """A device operation failed; the message names the device and the operation."""


class Device(abc.ABC):
    """One checkpointed device of a protected domain."""

    #: Commit order within a DeviceSet: lower first (disks 0 before nets 10, so that
    #: output is only released once the disk state it may depend on is committed).
    order: int = 50

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """What the device is, for messages ("netbuf vif5.0 -> xrifb5.0")."""

    @abc.abstractmethod
    def setup(self) -> None:
        """Start checkpointing this device; idempotent against our own leftovers."""

    @abc.abstractmethod
    def postsuspend(self, epoch: int) -> None:
        """The guest is suspended at the end of epoch ``epoch``: seal that epoch."""

    def preresume(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """The guest is about to resume (speculatively). Nothing to do by default."""

    def idle(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """The guest runs between two checkpoints. Nothing to do by default."""

    @abc.abstractmethod
    def commit(self, epoch: int) -> None:
        """The backup has committed ``epoch``: release exactly what that epoch held."""

    @abc.abstractmethod
    def release_all(self) -> None:
        """Protection stops and the guest goes on here: let everything out."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Undo setup() without releasing anything still held (it is dropped); safe to
        call after a failed or partial setup, and twice."""


class DeviceSet:
    """A domain's devices, driven in commit order; torn down in reverse.

    Use as a context manager: setup on enter, teardown on exit, whatever happened.
    """

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices: list[Device] = sorted(devices, key=lambda d: d.order)  # stable
        self._up: list[Device] = []

    def setup(self) -> None:
        """Set up every device; if one fails, tear down those already set up and raise."""
        for dev in self.devices:
            try:
                dev.setup()
            except BaseException:
                self._up.append(dev)  # a partial setup may have left something behind
                self._teardown_quietly()
                raise
            self._up.append(dev)

    def postsuspend(self, epoch: int) -> None:
        for dev in self.devices:
            dev.postsuspend(epoch)

    def preresume(self) -> None:
        for dev in self.devices:
            dev.preresume()

    def idle(self) -> None:
        for dev in self.devices:
            dev.idle()

    def commit(self, epoch: int) -> None:
        """Disks before nets: a packet leaves only once the state it reflects is safe."""
        for dev in self.devices:
            dev.commit(epoch)

    def release_all(self) -> None:
        """Every device is released even if some fail; then the first failure is raised."""
        _each(self.devices, lambda d: d.release_all(), "release_all")

    def teardown(self) -> None:
        """Reverse order; every device is torn down even if some fail."""
        up, self._up = self._up, []
        _each(reversed(up), lambda d: d.teardown(), "teardown")

    def _teardown_quietly(self) -> None:
        try:
            self.teardown()
        except DeviceError:
            pass  # the setup failure is the error the caller needs to see

    def __enter__(self) -> DeviceSet:
        self.setup()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if t is None:
            self.teardown()
        else:
            self._teardown_quietly()


def _each(devices: Iterable[Device], op: Callable[[Device], None], what: str) -> None:
    errors: list[tuple[Device, Exception]] = []
    for dev in devices:
        try:
            op(dev)
        except Exception as exc:
            errors.append((dev, exc))
    if errors:
        if len(errors) == 1 and isinstance(errors[0][1], XenRemusError):
            raise errors[0][1]
        msg = "; ".join(f"{d.name}: {e}" for d, e in errors)
        raise DeviceError(f"{what} failed on {len(errors)} device(s): {msg}") from errors[0][1]
