"""Synthetic streams laid out as Xen 4.17 writes them, for tests, benchmarks and demos.

Record order follows xg_sr_save.c: headers, static data, STATIC_DATA_END, (PV) P2M frames,
then per epoch PAGE_DATA, end-of-checkpoint state (TSC, SHARED_INFO + vCPUs for PV; TSC,
HVM_CONTEXT, HVM_PARAMS for HVM), CHECKPOINT (+ libxl emulator records, CHECKPOINT_END),
and finally END (+ libxl emulator records, END) unless the stream stops at a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E
from xen_remus.stream import libxc_bodies as XC
from xen_remus.stream import libxl_bodies as XL
from xen_remus.stream.events import Buffer


@dataclass
class Epoch:
    """Pages sent in one epoch: pfns, their PFINFO types, and one page per data type."""

    pfns: npt.NDArray[np.uint64]
    types: npt.NDArray[np.uint8]
    pages: list[Buffer] = field(default_factory=list)


def make_epoch(pfns: Sequence[int] | npt.NDArray[np.uint64], types: Sequence[int] |
               None = None, seed: int = 0) -> Epoch:
    p = np.asarray(pfns, dtype=np.uint64)
    t = np.zeros(len(p), np.uint8) if types is None else np.asarray(types, np.uint8)
    pages: list[Buffer] = []
    for i, ty in enumerate(t):
        if int(ty) not in C.PFINFO_NO_DATA:
            pages.append(bytes([(seed + i) % 251 + 1]) * C.PAGE_SIZE)
    return Epoch(p, t, pages)


def synthetic_stream(fmt: str = "xl", pv: bool = False, epochs: Sequence[Epoch] = (),
                     version: int = 3, vcpus: int = 1, end: bool = True,
                     batch: int = C.MAX_BATCH_SIZE,
                     config_json: str = '{"c_info": {"name": "guest"}}') -> list[Buffer]:
    """A complete stream as buffers; more than one epoch makes it checkpointed. An HVM
    stream in libxl framing carries, as libxl writes them, the emulator records after each
    epoch's CHECKPOINT and after END; epoch N's EMULATOR_CONTEXT blob is b"QEVM-ctx-N"."""
    wrapped = fmt != "libxc"
    dtype = C.DHDR_TYPE_X86_PV if pv else C.DHDR_TYPE_X86_HVM
    out = E.stream_start(fmt, dtype, version, config_json=config_json)
    if pv:
        out += E.record(C.REC_TYPE_X86_PV_INFO, XC.X86PvInfo(8, 4))
    if version >= 3:
        out += E.record(C.REC_TYPE_X86_CPUID_POLICY, XC.X86CpuidPolicy(bytes(range(1, 49))))
        out += E.record(C.REC_TYPE_X86_MSR_POLICY, XC.X86MsrPolicy(bytes(range(1, 17))))
        out += E.empty(C.REC_TYPE_STATIC_DATA_END)
    if pv:
        out += E.record(C.REC_TYPE_X86_PV_P2M_FRAMES,
                        XC.X86PvP2mFrames(0, 511, np.array([7], np.uint64)))

    def emu(n: int) -> list[list[Buffer]]:
        if not wrapped or pv:
            return []
        return [E.record(C.LIBXL_EMULATOR_XENSTORE_DATA,
                         XL.EmulatorXenstoreData.from_pairs([("physmap/1/size", "abc")])),
                E.record(C.LIBXL_EMULATOR_CONTEXT, XL.Emulator(2, 0, b"QEVM-ctx-%d" % n))]

    for n, ep in enumerate(epochs):
        page_i = 0
        for i in range(0, len(ep.pfns), batch):
            t = ep.types[i:i + batch]
            ndata = int(sum(1 for x in t if int(x) not in C.PFINFO_NO_DATA))
            out += E.record(C.REC_TYPE_PAGE_DATA, XC.PageData(
                ep.pfns[i:i + batch], t, ep.pages[page_i:page_i + ndata]))
            page_i += ndata
        out += E.record(C.REC_TYPE_X86_TSC_INFO, XC.X86TscInfo(0, 2_000_000, 12345 + n, 1))
        if pv:
            out += E.record(C.REC_TYPE_SHARED_INFO, XC.SharedInfo(bytes([n + 1]) * C.PAGE_SIZE))
            for v in range(vcpus):
                for rt in (C.REC_TYPE_X86_PV_VCPU_BASIC, C.REC_TYPE_X86_PV_VCPU_EXTENDED,
                           C.REC_TYPE_X86_PV_VCPU_XSAVE):
                    out += E.record(rt, XC.X86PvVcpu(v, b"ctx" * 5))
                out += E.record(C.REC_TYPE_X86_PV_VCPU_MSRS, XC.X86PvVcpuMsrs(v, b"m" * 16))
        else:
            out += E.record(C.REC_TYPE_HVM_CONTEXT, XC.HvmContext(b"hvm-context-blob"))
            out += E.record(C.REC_TYPE_HVM_PARAMS, XC.HvmParams([(1, 0x1234), (2, 0xfeed)]))
        if len(epochs) > 1 and (n < len(epochs) - 1 or not end):
            out += E.end_of_epoch(wrapped, emu(n))
    if end:
        out += E.end_of_stream(wrapped, emu(len(epochs) - 1))
    return out
