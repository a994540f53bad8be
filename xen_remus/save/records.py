"""Small record bodies shared by the PV and HVM sides, as the codec's body types."""

from __future__ import annotations

from xen_remus.save.ops import Emitter
from xen_remus.stream import consts as C
from xen_remus.stream.libxc_bodies import X86CpuidPolicy, X86MsrPolicy, X86TscInfo
from xen_remus.xen import XenCtrl


def tsc_info(xc: XenCtrl, domid: int) -> X86TscInfo:
    t = xc.tsc_info(domid)
    return X86TscInfo(mode=t.mode, khz=t.khz, nsec=t.nsec, incarnation=t.incarnation)


def cpu_policy_records(xc: XenCtrl, domid: int, out: Emitter) -> None:
    """X86_CPUID_POLICY and X86_MSR_POLICY (each only when non-empty, as libxc)."""
    pol = xc.cpu_policy(domid)
    if pol.cpuid:
        out.libxc_record(C.REC_TYPE_X86_CPUID_POLICY, X86CpuidPolicy(pol.cpuid).pack())
    if pol.msrs:
        out.libxc_record(C.REC_TYPE_X86_MSR_POLICY, X86MsrPolicy(pol.msrs).pack())
