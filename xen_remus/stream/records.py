"""Records of both layers and the table of their typed bodies, shared by the decoder and
the encoder.

The bodies themselves are in bodies.py (shared), libxc_bodies.py and libxl_bodies.py.
Adding a record type is one body class and one row in BODY_TYPES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xen_remus.stream import consts as C
from xen_remus.stream.bodies import Blob, Body, Empty
from xen_remus.stream.events import Buffer, Event
from xen_remus.stream.libxc_bodies import (
    HvmContext,
    HvmParams,
    PageData,
    PfnList,
    SharedInfo,
    X86CpuidPolicy,
    X86MsrPolicy,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpu,
    X86PvVcpuMsrs,
    X86TscInfo,
)
from xen_remus.stream.libxl_bodies import CheckpointState, Emulator, EmulatorXenstoreData

LIBXL = "libxl"
LIBXC = "libxc"


BODY_TYPES: dict[tuple[str, int], Any] = {
    (LIBXC, C.REC_TYPE_END): Empty,
    (LIBXC, C.REC_TYPE_PAGE_DATA): PageData,
    (LIBXC, C.REC_TYPE_X86_PV_INFO): X86PvInfo,
    (LIBXC, C.REC_TYPE_X86_PV_P2M_FRAMES): X86PvP2mFrames,
    (LIBXC, C.REC_TYPE_X86_PV_VCPU_BASIC): X86PvVcpu,
    (LIBXC, C.REC_TYPE_X86_PV_VCPU_EXTENDED): X86PvVcpu,
    (LIBXC, C.REC_TYPE_X86_PV_VCPU_XSAVE): X86PvVcpu,
    (LIBXC, C.REC_TYPE_SHARED_INFO): SharedInfo,
    (LIBXC, C.REC_TYPE_X86_TSC_INFO): X86TscInfo,
    (LIBXC, C.REC_TYPE_HVM_CONTEXT): HvmContext,
    (LIBXC, C.REC_TYPE_HVM_PARAMS): HvmParams,
    (LIBXC, C.REC_TYPE_X86_PV_VCPU_MSRS): X86PvVcpuMsrs,
    (LIBXC, C.REC_TYPE_VERIFY): Empty,
    (LIBXC, C.REC_TYPE_CHECKPOINT): Empty,
    (LIBXC, C.REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST): PfnList,
    (LIBXC, C.REC_TYPE_STATIC_DATA_END): Empty,
    (LIBXC, C.REC_TYPE_X86_CPUID_POLICY): X86CpuidPolicy,
    (LIBXC, C.REC_TYPE_X86_MSR_POLICY): X86MsrPolicy,
    (LIBXL, C.LIBXL_END): Empty,
    (LIBXL, C.LIBXL_LIBXC_CONTEXT): Empty,
    (LIBXL, C.LIBXL_EMULATOR_XENSTORE_DATA): EmulatorXenstoreData,
    (LIBXL, C.LIBXL_EMULATOR_CONTEXT): Emulator,
    (LIBXL, C.LIBXL_CHECKPOINT_END): Empty,
    (LIBXL, C.LIBXL_CHECKPOINT_STATE): CheckpointState,
}


def record_name(layer: str, rtype: int) -> str:
    names = C.LIBXC_NAMES if layer == LIBXC else C.LIBXL_NAMES
    name = names.get(rtype)
    if name is not None:
        return name
    kind = "OPTIONAL" if rtype & C.REC_TYPE_OPTIONAL else "UNKNOWN"
    return f"{kind}_0x{rtype:08x}"


def unpack_body(layer: str, rtype: int, body: Buffer) -> Body:
    cls = BODY_TYPES.get((layer, rtype), Blob)
    result: Body = cls.unpack(body)
    return result


@dataclass
class Record(Event):
    """One record of either layer. ``body`` excludes header and padding."""

    layer: str = LIBXC
    rtype: int = 0
    length: int = 0
    body: Buffer = field(default=b"", repr=False)
    parsed: Body | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return record_name(self.layer, self.rtype)

    def parse(self) -> Any:
        """The typed body (PageData, X86TscInfo, ...), validated; cached."""
        if self.parsed is None:
            self.parsed = unpack_body(self.layer, self.rtype, self.body)
        return self.parsed
