"""Guest state reads (vCPU, TSC, CPU policy, HVM context): a mixin of XenCtrl.

Results are raw bytes in the layouts the migration stream records carry (the save engine
frames them); vcpu.py gives a typed view of the basic vCPU context.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_uint32, c_uint64
from dataclasses import dataclass

from xen_remus.xen import libs
from xen_remus.xen import structs as S
from xen_remus.xen.errors import XenCallError, call_failed
from xen_remus.xen.hcbuf import HypercallBuffer


@dataclass(frozen=True)
class TscInfo:
    """xc_domain_get_tsc_info: the X86_TSC_INFO record's fields."""

    mode: int
    nsec: int
    khz: int
    incarnation: int


@dataclass(frozen=True)
class CpuPolicy:
    """A domain's CPUID and MSR policy, as libxenguest serialises it: ``nr_leaves``
    xen_cpuid_leaf_t in ``cpuid``, ``nr_msrs`` xen_msr_entry_t in ``msrs``."""

    cpuid: bytes
    msrs: bytes
    nr_leaves: int
    nr_msrs: int


class StateCalls:
    lib: ctypes.CDLL
    handle: int

    def _check(self, rc: int, call: str, domid: int | None, detail: str = "") -> None:
        raise NotImplementedError

    def vcpu_context(self, domid: int, vcpu: int) -> bytes:
        """vcpu_guest_context_any_t of one vCPU (5168 bytes; the x86_32 layout for 32-bit
        PV guests occupies the first 2800). Wrap in vcpu.VcpuContext to read its fields."""
        buf = S.VcpuContextAny()
        rc = self.lib.xc_vcpu_getcontext(self.handle, domid, vcpu, byref(buf))
        self._check(rc, "xc_vcpu_getcontext", domid, f"vcpu {vcpu}")
        return bytes(buf)

    def _domctl(self, d: S.XenDomctl, name: str, domid: int, vcpu: int) -> None:
        d.interface_version = S.XEN_DOMCTL_INTERFACE_VERSION
        d.domain = domid
        self._check(self.lib.xc_domctl(self.handle, byref(d)), name, domid, f"vcpu {vcpu}")

    def vcpu_extended_context(self, domid: int, vcpu: int) -> bytes:
        """xen_domctl_ext_vcpucontext (its first ``size`` bytes, as X86_PV_VCPU_EXTENDED)."""
        d = S.XenDomctl(cmd=S.XEN_DOMCTL_get_ext_vcpucontext)
        ext = S.XenDomctlExtVcpuContext.from_buffer(d.u)
        ext.vcpu = vcpu
        self._domctl(d, "xc_domctl(get_ext_vcpucontext)", domid, vcpu)
        return bytes(memoryview(d.u).cast("B")[: ext.size])

    def vcpu_xsave(self, domid: int, vcpu: int) -> tuple[int, bytes]:
        """(xfeature_mask, xsave area) of a vCPU; (0, b"") when it has no extended state."""
        st = S.XcVcpuExtstate(0, 0, None)
        rc = self.lib.xc_vcpu_get_extstate(self.handle, domid, vcpu, byref(st))
        self._check(rc, "xc_vcpu_get_extstate", domid, f"vcpu {vcpu} (size query)")
        if st.xfeature_mask == 0 or st.size == 0:
            return 0, b""
        area = ctypes.create_string_buffer(st.size)
        st.buffer = ctypes.cast(area, ctypes.c_void_p)
        rc = self.lib.xc_vcpu_get_extstate(self.handle, domid, vcpu, byref(st))
        self._check(rc, "xc_vcpu_get_extstate", domid, f"vcpu {vcpu}")
        return int(st.xfeature_mask), area.raw[: st.size]

    def vcpu_extstate_raw(self, domid: int, vcpu: int) -> bytes:
        """The X86_PV_VCPU_XSAVE payload: XEN_DOMCTL_getvcpuextstate's buffer as Xen fills
        it (u64 xcr0, u64 xcr0_accum, then the xsave area), which is what the restorer's
        setvcpuextstate takes back; b"" when the vCPU has no extended state.
        xc_vcpu_get_extstate is no use here: it hands back the area without that header."""
        d = S.XenDomctl(cmd=S.XEN_DOMCTL_getvcpuextstate)
        ext = S.XenDomctlVcpuExtstate.from_buffer(d.u)
        ext.vcpu, ext.xfeature_mask, ext.size, ext.buffer = vcpu, 0, 0, 0
        self._domctl(d, "xc_domctl(getvcpuextstate) size query", domid, vcpu)
        size = int(ext.size)
        if size == 0:
            return b""
        hb = HypercallBuffer(self.lib, self.handle, size)
        try:
            ext.buffer = hb.address
            self._domctl(d, "xc_domctl(getvcpuextstate)", domid, vcpu)
            assert hb.view is not None
            return bytes(hb.view[: int(ext.size)])
        finally:
            hb.close()

    def vcpu_msrs(self, domid: int, vcpu: int) -> bytes:
        """The vCPU's MSRs as xen_domctl_vcpu_msr_t entries (X86_PV_VCPU_MSRS payload)."""
        d = S.XenDomctl(cmd=S.XEN_DOMCTL_get_vcpu_msrs)
        msrs = S.XenDomctlVcpuMsrs.from_buffer(d.u)
        msrs.vcpu, msrs.msr_count, msrs.msrs = vcpu, 0, 0
        self._domctl(d, "xc_domctl(get_vcpu_msrs)", domid, vcpu)
        count = int(msrs.msr_count)
        if count == 0:
            return b""
        size = count * ctypes.sizeof(S.XenDomctlVcpuMsr)
        hb = HypercallBuffer(self.lib, self.handle, size)
        try:
            msrs.msrs = hb.address
            self._domctl(d, "xc_domctl(get_vcpu_msrs)", domid, vcpu)
            assert hb.view is not None
            return bytes(hb.view[: int(msrs.msr_count) * ctypes.sizeof(S.XenDomctlVcpuMsr)])
        finally:
            hb.close()

    def tsc_info(self, domid: int) -> TscInfo:
        mode, khz, inc = c_uint32(), c_uint32(), c_uint32()
        nsec = c_uint64()
        rc = self.lib.xc_domain_get_tsc_info(self.handle, domid, byref(mode), byref(nsec),
                                             byref(khz), byref(inc))
        self._check(rc, "xc_domain_get_tsc_info", domid)
        return TscInfo(int(mode.value), int(nsec.value), int(khz.value), int(inc.value))

    def cpu_policy(self, domid: int) -> CpuPolicy:
        """The domain's CPUID/MSR policy (xc_cpu_policy_get_domain + serialise)."""
        g = libs.xenguest()
        nl, nm = c_uint32(), c_uint32()
        self._check(g.xc_cpu_policy_get_size(self.handle, byref(nl), byref(nm)),
                    "xc_cpu_policy_get_size", domid)
        pol = g.xc_cpu_policy_init()
        if not pol:
            raise XenCallError("xc_cpu_policy_init", domid, libs.errno())
        try:
            self._check(g.xc_cpu_policy_get_domain(self.handle, domid, pol),
                        "xc_cpu_policy_get_domain", domid)
            leaves = (S.XenCpuidLeaf * nl.value)()
            entries = (S.XenMsrEntry * nm.value)()
            rc = g.xc_cpu_policy_serialise(self.handle, pol, leaves, byref(nl), entries,
                                           byref(nm))
            self._check(rc, "xc_cpu_policy_serialise", domid)
            lsz, msz = ctypes.sizeof(S.XenCpuidLeaf), ctypes.sizeof(S.XenMsrEntry)
            return CpuPolicy(bytes(leaves)[: nl.value * lsz], bytes(entries)[: nm.value * msz],
                             int(nl.value), int(nm.value))
        finally:
            g.xc_cpu_policy_destroy(pol)

    def hvm_context(self, domid: int) -> bytes:
        """The HVM save blob (HVM_CONTEXT record payload) of an HVM or PVH guest."""
        size = self.lib.xc_domain_hvm_getcontext(self.handle, domid, None, 0)
        self._check(size, "xc_domain_hvm_getcontext", domid, "size query")
        buf = ctypes.create_string_buffer(size)
        n = self.lib.xc_domain_hvm_getcontext(self.handle, domid, buf, size)
        if n < 0:
            raise call_failed("xc_domain_hvm_getcontext", domid, libs.errno())
        return buf.raw[:n]
