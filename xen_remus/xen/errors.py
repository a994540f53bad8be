"""Errors raised by the Xen layer: each names the call, the domain and errno."""

from __future__ import annotations

import errno as _errno
import os

from xen_remus.errors import XenRemusError


class XenError(XenRemusError):
    """Base of all errors from ``xen_remus.xen``."""


class XenLibraryError(XenError):
    """A Xen library (libxenctrl & co.) cannot be loaded: not in dom0, or wrong Xen version."""


class XenCallError(XenError):
    """A Xen library call failed. ``call``, ``domid`` and ``errno`` say which and why."""

    def __init__(self, call: str, domid: int | None, err: int, detail: str = "") -> None:
        self.call = call
        self.domid = domid
        self.errno = err
        self.detail = detail
        where = f" on domain {domid}" if domid is not None else ""
        name = _errno.errorcode.get(err, "?")
        extra = f": {detail}" if detail else ""
        super().__init__(f"{call}{where} failed: errno {err} ({name}, {os.strerror(err)}){extra}")


class NoSuchDomain(XenCallError):
    """The domain does not exist (ESRCH from Xen, or absent from the domain list)."""


class MappingError(XenError):
    """Some frames of a foreign mapping could not be mapped (per-page errors)."""

    def __init__(self, domid: int, frames: list[tuple[int, int]]) -> None:
        self.domid = domid
        self.frames = frames  # (frame, errno) pairs
        shown = ", ".join(f"{f:#x}: errno {e}" for f, e in frames[:4])
        more = f" and {len(frames) - 4} more" if len(frames) > 4 else ""
        super().__init__(f"xenforeignmemory_map on domain {domid}: {len(frames)} frame(s) "
                         f"failed ({shown}{more})")


class GuestStateError(XenError):
    """Guest state read from its memory is unusable (bad p2m, bad page table walk, ...)."""


class SuspendError(XenError):
    """The guest did not reach the suspended state, or could not be asked to."""


def call_failed(call: str, domid: int | None, err: int, detail: str = "") -> XenCallError:
    """The right exception class for a failed call (ESRCH means no such domain)."""
    cls = NoSuchDomain if err == _errno.ESRCH else XenCallError
    return cls(call, domid, err, detail)
