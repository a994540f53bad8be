"""Event channels through libxenevtchn (only what suspending a guest needs)."""

from __future__ import annotations

from xen_remus.xen import libs
from xen_remus.xen.errors import call_failed


class EventChannels(libs.Handle):
    """An open libxenevtchn handle; bound ports are unbound on close()."""

    def __init__(self) -> None:
        super().__init__(libs.evtchn(), "xenevtchn_open", "xenevtchn_close", libs.logger(), 0)
        self._bound: list[int] = []

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to ``remote_port`` of ``domid``; returns our local port."""
        port = self.lib.xenevtchn_bind_interdomain(self.handle, domid, remote_port)
        if port < 0:
            raise call_failed("xenevtchn_bind_interdomain", domid, libs.errno(),
                              f"remote port {remote_port}")
        self._bound.append(port)
        return int(port)

    def notify(self, port: int, domid: int | None = None) -> None:
        if self.lib.xenevtchn_notify(self.handle, port) < 0:
            raise call_failed("xenevtchn_notify", domid, libs.errno(), f"local port {port}")

    def fd(self) -> int:
        """File descriptor that becomes readable when a bound port fires."""
        return int(self.lib.xenevtchn_fd(self.handle))

    def pending(self) -> int:
        """Next pending local port (call only when fd() is readable); re-arm with unmask()."""
        port = self.lib.xenevtchn_pending(self.handle)
        if port < 0:
            raise call_failed("xenevtchn_pending", None, libs.errno())
        return int(port)

    def unmask(self, port: int) -> None:
        if self.lib.xenevtchn_unmask(self.handle, port) < 0:
            raise call_failed("xenevtchn_unmask", None, libs.errno(), f"local port {port}")

    def _release(self) -> None:
        for port in self._bound:
            self.lib.xenevtchn_unbind(self.handle, port)
        self._bound.clear()
