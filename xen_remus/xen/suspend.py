"""Suspend a guest (suspend event channel, else xenstore control/shutdown) and resume it.

Suspender is set up once per protected domain: binding the guest's suspend event channel is
the expensive part, and each Remus epoch then suspends with one notify.
"""

from __future__ import annotations

import time

from xen_remus.xen.ctrl import XenCtrl
from xen_remus.xen.domain import DomainInfo
from xen_remus.xen.errors import SuspendError, XenError
from xen_remus.xen.evtchn import EventChannels
from xen_remus.xen.libs import Closing
from xen_remus.xen.xenstore import XenStore

POLL_MIN = 0.0005  # the first checks are fast: a Remus epoch's downtime is at stake
POLL_MAX = 0.01


class Suspender(Closing):
    """Suspends ``domid`` on request; ``method`` is "evtchn" or "xenstore"."""

    def __init__(self, xc: XenCtrl, xs: XenStore, domid: int) -> None:
        self.xc, self.xs, self.domid = xc, xs, domid
        self.dompath = xs.domain_path(domid)
        self._evtchn: EventChannels | None = None
        self._port = -1
        self._asked = 0.0  # when the current xenstore request was written
        remote = (self.xs.read(f"{self.dompath}/device/suspend/event-channel") or "").strip()
        if remote.isdigit() and int(remote) > 0:
            try:
                evtchn = EventChannels()
            except XenError:
                evtchn = None
            if evtchn is not None:
                try:
                    self._port = evtchn.bind_interdomain(domid, int(remote))
                    self._evtchn = evtchn
                except XenError:
                    evtchn.close()
        self.method = "evtchn" if self._evtchn is not None else "xenstore"

    # libxl allows a guest 60 s to answer; under TCG a busy guest took over 10 s to answer
    # in the middle of a protect.
    def suspend(self, timeout: float = 60.0) -> DomainInfo:
        """Ask the guest to suspend and wait (at most ``timeout`` s) until Xen reports it
        shut down with reason suspend. Returns that domain info."""
        deadline = time.monotonic() + timeout
        if self._evtchn is not None:
            self._evtchn.notify(self._port, self.domid)
        else:
            self._request_via_xenstore(deadline)
        return self._wait_suspended(deadline, timeout)

    def _request_via_xenstore(self, deadline: float) -> None:
        path = f"{self.dompath}/control/shutdown"
        self._asked = time.monotonic()
        self.xs.write(path, "suspend")
        delay = POLL_MIN
        while time.monotonic() < deadline:
            # The guest acknowledges by clearing the key; a fast guest may already be down.
            if self.xs.read(path) != "suspend" or self.xc.domain_info(self.domid).suspended:
                return
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        if self.xs.read(path) != "suspend":
            return  # acknowledged just at the deadline
        self.xs.write(path, "")  # withdraw the request
        # The guest may have read it before we withdrew it: never leave it suspended.
        late = time.monotonic() + 2.0
        while time.monotonic() < late:
            if self.xc.domain_info(self.domid).suspended:
                self.resume(fast=True)
                break
            time.sleep(POLL_MAX)
        raise SuspendError(f"domain {self.domid} did not acknowledge control/shutdown=suspend "
                           f"within {deadline - self._asked:.0f} s (is a PV suspend driver "
                           "running in the guest?)")

    def _wait_suspended(self, deadline: float, timeout: float) -> DomainInfo:
        delay = POLL_MIN
        while True:
            info = self.xc.domain_info(self.domid)
            if info.suspended:
                return info
            if info.dying or (info.shutdown and info.shutdown_reason is None):
                raise SuspendError(f"domain {self.domid} was destroyed while we waited for "
                                   "it to suspend")
            if info.shutdown:
                raise SuspendError(f"domain {self.domid} shut down with reason "
                                   f"{info.shutdown_reason} instead of suspending")
            if time.monotonic() >= deadline:
                raise SuspendError(f"domain {self.domid} not suspended after {timeout:.1f} s "
                                   f"(asked via {self.method})")
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def resume(self, fast: bool = True) -> None:
        """Resume after suspend: fast = cooperative, the guest sees "suspend cancelled"."""
        self.xc.resume(self.domid, fast)

    def close(self) -> None:
        if self._evtchn is not None:
            self._evtchn.close()
            self._evtchn = None
