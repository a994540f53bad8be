"""Small record bodies shared by the PV and HVM sides (layouts of the libxc spec)."""

from __future__ import annotations

import struct

from xen_remus.save.ops import Emitter
from xen_remus.stream import consts as C
from xen_remus.xen import XenCtrl


def tsc_info_body(xc: XenCtrl, domid: int) -> bytes:
    """X86_TSC_INFO: mode u32, khz u32, nsec u64, incarnation u32, reserved u32."""
    t = xc.tsc_info(domid)
    return struct.pack("<IIQII", t.mode, t.khz, t.nsec, t.incarnation, 0)


def cpu_policy_records(xc: XenCtrl, domid: int, out: Emitter) -> None:
    """X86_CPUID_POLICY and X86_MSR_POLICY (each only when non-empty, as libxc)."""
    pol = xc.cpu_policy(domid)
    if pol.cpuid:
        out.libxc_record(C.REC_TYPE_X86_CPUID_POLICY, [pol.cpuid])
    if pol.msrs:
        out.libxc_record(C.REC_TYPE_X86_MSR_POLICY, [pol.msrs])


def vcpu_record_body(vcpu: int, blob: bytes | bytearray) -> list[bytes | bytearray]:
    """X86_PV_VCPU_*: vcpu_id u32, reserved u32, then the context blob."""
    return [struct.pack("<II", vcpu, 0), blob]
