"""Load the Xen 4.17 tool libraries once, declare the prototypes we call, and hold their
handles (``Handle``: open, close once, use in a ``with`` block).

Only this package touches ctypes. Each loader raises XenLibraryError when the library is absent
(not dom0, or another Xen version), so importing xen_remus.xen never needs Xen.
"""

from __future__ import annotations

import ctypes
import functools
import os
from ctypes import (
    POINTER,
    c_int,
    c_long,
    c_longlong,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
)
from typing import Self

from xen_remus.host import SONAMES
from xen_remus.xen import structs as S
from xen_remus.xen.errors import XenCallError, XenLibraryError

P = c_void_p  # opaque handles
xen_pfn_t = c_ulong


def _load(soname: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError as exc:
        raise XenLibraryError(f"cannot load {soname} (is this a Xen 4.17 dom0?): {exc}") from None


def _proto(lib: ctypes.CDLL, protos: dict[str, tuple[object, list[object]]]) -> ctypes.CDLL:
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


@functools.cache
def xenctrl() -> ctypes.CDLL:
    """libxenctrl.so.4.17 with the prototypes of xenctrl.h (and xc_private.h's pfn types)."""
    u32 = c_uint32
    return _proto(_load(SONAMES["xenctrl"]), {
        "xc_interface_open": (P, [P, P, c_uint]),
        "xc_interface_close": (c_int, [P]),
        "xc_version": (c_int, [P, c_int, P]),
        "xc_domain_getinfolist": (c_int, [P, u32, c_uint, POINTER(S.XenDomctlGetDomainInfo)]),
        "xc_domain_pause": (c_int, [P, u32]),
        "xc_domain_unpause": (c_int, [P, u32]),
        "xc_domain_get_guest_width": (c_int, [P, u32, POINTER(c_uint)]),
        "xc_domain_maximum_gpfn": (c_int, [P, u32, POINTER(xen_pfn_t)]),
        "xc_maximum_ram_page": (c_int, [P, POINTER(c_ulong)]),
        "xc_machphys_mfn_list": (c_int, [P, c_ulong, POINTER(xen_pfn_t)]),
        "xc_shadow_control": (c_int, [P, u32, c_uint, POINTER(c_uint), c_uint]),
        "xc_logdirty_control": (c_longlong, [P, u32, c_uint, POINTER(S.XcHypercallBuffer),
                                             c_ulong, c_uint,
                                             POINTER(S.XenDomctlShadowOpStats)]),
        "xc__hypercall_buffer_alloc_pages": (P, [P, POINTER(S.XcHypercallBuffer), c_int]),
        "xc__hypercall_buffer_free_pages": (None, [P, POINTER(S.XcHypercallBuffer), c_int]),
        "xc_get_pfn_type_batch": (c_int, [P, u32, c_uint, POINTER(xen_pfn_t)]),
        "xc_vcpu_getcontext": (c_int, [P, u32, u32, P]),
        "xc_vcpu_get_extstate": (c_int, [P, u32, u32, POINTER(S.XcVcpuExtstate)]),
        "xc_domctl": (c_int, [P, POINTER(S.XenDomctl)]),
        "xc_memory_op": (c_long, [P, c_uint, P, c_size_t]),
        "xc_domain_get_tsc_info": (c_int, [P, u32, POINTER(c_uint32), POINTER(c_uint64),
                                           POINTER(c_uint32), POINTER(c_uint32)]),
        "xc_domain_hvm_getcontext": (c_int, [P, u32, P, u32]),
        "xc_hvm_param_get": (c_int, [P, u32, u32, POINTER(c_uint64)]),
    })


@functools.cache
def xenguest() -> ctypes.CDLL:
    """libxenguest.so.4.17: only fast resume and the CPU policy (no public domctl for those)."""
    return _proto(_load(SONAMES["xenguest"]), {
        "xc_domain_resume": (c_int, [P, c_uint32, c_int]),
        "xc_cpu_policy_init": (P, []),
        "xc_cpu_policy_destroy": (None, [P]),
        "xc_cpu_policy_get_domain": (c_int, [P, c_uint32, P]),
        "xc_cpu_policy_get_size": (c_int, [P, POINTER(c_uint32), POINTER(c_uint32)]),
        "xc_cpu_policy_serialise": (c_int, [P, P, P, POINTER(c_uint32), P, POINTER(c_uint32)]),
    })


@functools.cache
def foreignmemory() -> ctypes.CDLL:
    """libxenforeignmemory.so.1."""
    return _proto(_load(SONAMES["xenforeignmemory"]), {
        "xenforeignmemory_open": (P, [P, c_uint]),
        "xenforeignmemory_close": (c_int, [P]),
        "xenforeignmemory_map": (P, [P, c_uint32, c_int, c_size_t, POINTER(xen_pfn_t),
                                     POINTER(c_int)]),
        "xenforeignmemory_unmap": (c_int, [P, P, c_size_t]),
    })


@functools.cache
def evtchn() -> ctypes.CDLL:
    """libxenevtchn.so.1 (ports are evtchn_port_t = uint32; -1 on error)."""
    return _proto(_load(SONAMES["xenevtchn"]), {
        "xenevtchn_open": (P, [P, c_uint]),
        "xenevtchn_close": (c_int, [P]),
        "xenevtchn_fd": (c_int, [P]),
        "xenevtchn_notify": (c_int, [P, c_uint32]),
        "xenevtchn_bind_interdomain": (c_int, [P, c_uint32, c_uint32]),
        "xenevtchn_unbind": (c_int, [P, c_uint32]),
        "xenevtchn_pending": (c_int, [P]),
        "xenevtchn_unmask": (c_int, [P, c_uint32]),
    })


XTL_CRITICAL = 9  # xentoollog_level: only critical messages pass


@functools.cache
def logger() -> int | None:
    """A xentoollog logger that keeps the libraries' own error lines off stderr: our
    exceptions already say what failed. XEN_REMUS_XEN_LOG=1 restores their default logging."""
    if os.environ.get("XEN_REMUS_XEN_LOG"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fdopen.restype = c_void_p
    libc.fdopen.argtypes = [c_int, ctypes.c_char_p]
    stream = libc.fdopen(os.dup(2), b"w")
    xtl = _load(SONAMES["xentoollog"])
    xtl.xtl_createlogger_stdiostream.restype = c_void_p
    xtl.xtl_createlogger_stdiostream.argtypes = [c_void_p, c_int, c_uint]
    lg: int | None = xtl.xtl_createlogger_stdiostream(stream, XTL_CRITICAL, 0)
    return lg


def errno() -> int:
    """errno of the last ctypes call on this thread."""
    return ctypes.get_errno()


class Closing:
    """close() at the end of a ``with`` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Handle(Closing):
    """An open handle of ``lib``: ``lib.<opener>(*args)`` opened it, ``close()`` calls
    ``lib.<closer>`` once, after ``_release()`` (what a subclass holds through the handle)."""

    def __init__(self, lib: ctypes.CDLL, opener: str, closer: str, *args: object) -> None:
        self.lib = lib
        self._closer = closer
        handle = getattr(lib, opener)(*args)
        if not handle:
            raise XenCallError(opener, None, errno())
        self.handle: int = handle

    def _release(self) -> None:
        pass

    def close(self) -> None:
        if self.handle:
            self._release()
            getattr(self.lib, self._closer)(self.handle)
            self.handle = 0
