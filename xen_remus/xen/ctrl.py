"""XenCtrl: a libxenctrl handle with typed calls for domains, pausing, log-dirty and page types.

Every failing call raises XenCallError (NoSuchDomain for ESRCH) naming the call, domain, errno.
Guest state (vCPU, TSC, CPU policy, HVM) is in the state.py mixin.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_uint, c_uint64, c_ulong
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xen_remus.xen import libs
from xen_remus.xen import structs as S
from xen_remus.xen.domain import DomainInfo
from xen_remus.xen.errors import NoSuchDomain, call_failed
from xen_remus.xen.hcbuf import DirtyBitmap, HypercallBuffer
from xen_remus.xen.state import StateCalls

PFN_TYPE_BATCH = 1024  # XEN_DOMCTL_getpageframeinfo3 takes at most 1024 frames per call


@dataclass(frozen=True)
class ShadowStats:
    """xen_domctl_shadow_op_stats after a CLEAN/PEEK."""

    fault_count: int
    dirty_count: int


class XenCtrl(StateCalls, libs.Handle):
    """An open libxenctrl interface. Use as a context manager or call close()."""

    def __init__(self) -> None:
        super().__init__(libs.xenctrl(), "xc_interface_open", "xc_interface_close",
                         libs.logger(), libs.logger(), 0)

    def _check(self, rc: int, call: str, domid: int | None, detail: str = "") -> None:
        if rc < 0:
            raise call_failed(call, domid, libs.errno(), detail)

    # -- domains ------------------------------------------------------------------------
    def domains(self) -> list[DomainInfo]:
        """All domains, in domid order."""
        out: list[DomainInfo] = []
        buf = (S.XenDomctlGetDomainInfo * 64)()
        first = 0
        while True:
            n = self.lib.xc_domain_getinfolist(self.handle, first, 64, buf)
            self._check(n, "xc_domain_getinfolist", None, f"from domain {first}")
            out.extend(DomainInfo.from_struct(buf[i]) for i in range(n))
            if n < 64:
                return out
            first = out[-1].domid + 1

    def domain_info(self, domid: int) -> DomainInfo:
        """Info of one domain; NoSuchDomain if it does not exist."""
        buf = S.XenDomctlGetDomainInfo()
        n = self.lib.xc_domain_getinfolist(self.handle, domid, 1, byref(buf))
        self._check(n, "xc_domain_getinfolist", domid)
        if n != 1 or buf.domain != domid:
            raise NoSuchDomain("xc_domain_getinfolist", domid, 3, "no such domain")
        return DomainInfo.from_struct(buf)

    def pause(self, domid: int) -> None:
        self._check(self.lib.xc_domain_pause(self.handle, domid), "xc_domain_pause", domid)

    def unpause(self, domid: int) -> None:
        self._check(self.lib.xc_domain_unpause(self.handle, domid), "xc_domain_unpause", domid)

    def resume(self, domid: int, fast: bool = True) -> None:
        """xc_domain_resume: fast (cooperative, "suspend cancelled") or a full resume."""
        rc = libs.xenguest().xc_domain_resume(self.handle, domid, int(fast))
        self._check(rc, "xc_domain_resume", domid, "fast" if fast else "slow")

    def guest_width(self, domid: int) -> int:
        """Guest word size in bytes: 8 for 64-bit, 4 for 32-bit PV guests."""
        w = c_uint()
        self._check(self.lib.xc_domain_get_guest_width(self.handle, domid, byref(w)),
                    "xc_domain_get_guest_width", domid)
        return int(w.value)

    def maximum_gpfn(self, domid: int) -> int:
        """Highest guest pfn in use; the log-dirty bitmap needs maximum_gpfn + 1 bits."""
        v = c_ulong()
        self._check(self.lib.xc_domain_maximum_gpfn(self.handle, domid, byref(v)),
                    "xc_domain_maximum_gpfn", domid)
        return int(v.value)

    def maximum_ram_page(self) -> int:
        """max_mfn (XENMEM_maximum_ram_page): bound of the host's MFN space."""
        v = c_ulong()
        self._check(self.lib.xc_maximum_ram_page(self.handle, byref(v)),
                    "xc_maximum_ram_page", None)
        return int(v.value)

    def machphys_mfn_list(self, chunks: int) -> npt.NDArray[np.uint64]:
        """First MFN of each 2 MiB chunk of Xen's read-only M2P table."""
        arr = (c_ulong * chunks)()
        self._check(self.lib.xc_machphys_mfn_list(self.handle, chunks, arr),
                    "xc_machphys_mfn_list", None, f"{chunks} chunks")
        return np.ctypeslib.as_array(arr).astype(np.uint64)

    def compat_m2p_mfn0(self) -> int:
        """First MFN of the compat (32-bit guests') M2P, which PAE L2 tables may map."""
        hb = HypercallBuffer(self.lib, self.handle, 8)
        try:
            arg = S.XenMachphysMfnList(max_extents=1, extent_start=hb.address)
            rc = self.lib.xc_memory_op(self.handle, S.XENMEM_machphys_compat_mfn_list,
                                       byref(arg), ctypes.sizeof(arg))
            self._check(rc, "xc_memory_op(XENMEM_machphys_compat_mfn_list)", None)
            assert hb.view is not None
            return int(np.frombuffer(hb.view, dtype=np.uint64, count=1)[0])
        finally:
            hb.close()

    # -- log-dirty ----------------------------------------------------------------------
    def logdirty_enable(self, domid: int) -> None:
        """Enable log-dirty mode (XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY).

        Like libxc, if it is already on (e.g. VRAM tracking by QEMU), turn it off and retry.
        """
        op = S.SHADOW_OP_ENABLE_LOGDIRTY
        if self.lib.xc_shadow_control(self.handle, domid, op, None, 0) >= 0:
            return
        first = libs.errno()
        if self.lib.xc_shadow_control(self.handle, domid, S.SHADOW_OP_OFF, None, 0) < 0:
            raise call_failed("xc_shadow_control(ENABLE_LOGDIRTY)", domid, first)
        self._check(self.lib.xc_shadow_control(self.handle, domid, op, None, 0),
                    "xc_shadow_control(ENABLE_LOGDIRTY)", domid, "after OFF")

    def logdirty_off(self, domid: int) -> None:
        self._check(self.lib.xc_shadow_control(self.handle, domid, S.SHADOW_OP_OFF, None, 0),
                    "xc_shadow_control(OFF)", domid)

    def dirty_bitmap(self, pages: int) -> DirtyBitmap:
        """A bitmap buffer for ``pages`` pfns (maximum_gpfn + 1) to pass to clean/peek."""
        return DirtyBitmap(self.lib, self.handle, pages)

    def _logdirty_op(self, domid: int, op: int, name: str, bitmap: DirtyBitmap,
                     final: bool) -> ShadowStats:
        stats = S.XenDomctlShadowOpStats()
        mode = S.SHADOW_LOGDIRTY_FINAL if final else 0
        rc = self.lib.xc_logdirty_control(self.handle, domid, op, byref(bitmap.desc),
                                          bitmap.pages, mode, byref(stats))
        self._check(rc, f"xc_logdirty_control({name})", domid, f"{bitmap.pages} pages")
        return ShadowStats(int(stats.fault_count), int(stats.dirty_count))

    def logdirty_clean(self, domid: int, bitmap: DirtyBitmap, final: bool = False) -> ShadowStats:
        """Fetch the pages dirtied since the last clean into ``bitmap`` and reset them."""
        return self._logdirty_op(domid, S.SHADOW_OP_CLEAN, "CLEAN", bitmap, final)

    def logdirty_peek(self, domid: int, bitmap: DirtyBitmap) -> ShadowStats:
        """Like clean, but leaves Xen's dirty state untouched."""
        return self._logdirty_op(domid, S.SHADOW_OP_PEEK, "PEEK", bitmap, False)

    # -- page types ---------------------------------------------------------------------
    def pfn_types(self, domid: int, frames: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """The page type of each frame (GFN/MFN as the guest's p2m gives them), as the
        migration stream names them (stream.consts PFINFO_*, 0..15): xc_get_pfn_type_batch
        returns XEN_DOMCTL_PFINFO_* in place, the type in bits 28-31 of each word."""
        arr = np.array(frames, dtype=np.uint64)  # our own copy: Xen writes in place
        for start in range(0, len(arr), PFN_TYPE_BATCH):
            part = arr[start:start + PFN_TYPE_BATCH]
            ptr = part.ctypes.data_as(ctypes.POINTER(c_ulong))
            rc = self.lib.xc_get_pfn_type_batch(self.handle, domid, len(part), ptr)
            self._check(rc, "xc_get_pfn_type_batch", domid, f"frames {start}..")
        return ((arr >> np.uint64(S.PFINFO_LTAB_SHIFT)) & np.uint64(0xF)).astype(np.uint8)

    def hvm_param(self, domid: int, param: int) -> int:
        """HVM_PARAM_* value (HVM and PVH guests)."""
        v = c_uint64()
        self._check(self.lib.xc_hvm_param_get(self.handle, domid, param, byref(v)),
                    "xc_hvm_param_get", domid, f"param {param}")
        return int(v.value)
