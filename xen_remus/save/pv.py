"""PV guests: pfn -> mfn through the guest's p2m, pagetables normalised MFN -> PFN, and the
PV records: X86_PV_INFO, X86_PV_P2M_FRAMES, SHARED_INFO and the per-vCPU records.

vCPUs: every epoch (every end of checkpoint) carries the records of each vCPU that is up,
as libxc writes them; a vCPU that is down gets none. A stock restorer keeps the records it
last had of each vCPU and sets every vCPU it has records of running: a vCPU taken down
after it was sent would come back on the backup with its old state, which nothing in the
stream can undo, so that is logged.

The p2m: a guest that populates a range its p2m backed with a shared page (Linux maps one
all-invalid page wherever no pfn has memory, the ballooned-out range of a guest started
below its maxmem) gives that range a p2m page of its own and says so by raising
shared_info's p2m_generation. libxc gives up its migration there; we map the p2m again,
send X86_PV_P2M_FRAMES again and send the pfns whose frame changed (``p2m_changes``).
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from xen_remus import pagetable
from xen_remus.save.ops import Emitter, Normalised
from xen_remus.save.pages import Pfns, Types, no_pfns, pagetable_level
from xen_remus.save.records import cpu_policy_records, tsc_info
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import SharedInfo, X86PvInfo, X86PvP2mFrames, X86PvVcpu
from xen_remus.xen import M2P, P2M, ForeignMemory, GuestStateError, VcpuContext, XenCtrl
from xen_remus.xen.p2m import read_shared_info

log = logging.getLogger(__name__)

class PvGuest:
    domain_type = C.DHDR_TYPE_X86_PV

    def __init__(self, xc: XenCtrl, fmem: ForeignMemory, domid: int) -> None:
        self.xc, self.fmem, self.domid = xc, fmem, domid
        self.info = xc.domain_info(domid)
        self.width = xc.guest_width(domid)
        if self.width != 8:
            # PAE guests need the compat m2p's first frame to spot Xen's L2 slots.
            raise GuestStateError(f"domain {domid}: 32-bit PV guests are not supported yet")
        si = read_shared_info(fmem, domid, self.info.shared_info_frame, self.width)
        self.m2p = M2P(xc, fmem)
        try:
            self.p2m = P2M(fmem, domid, si, self.width)
        except BaseException:
            self.m2p.close()
            raise
        self.ppm = self._ppm()
        self.vcpus_sent: set[int] = set()  # up at the last end of checkpoint

    def _ppm(self) -> pagetable.PseudoPhysMap:
        return pagetable.PseudoPhysMap(self.m2p.table, self.p2m.table, self.width,
                                       self.m2p.max_mfn)

    def nr_pfns(self) -> int:
        return self.p2m.max_pfn

    def static_data(self, out: Emitter) -> None:
        levels = 4 if self.width == 8 else 3
        out.libxc_record(C.REC_TYPE_X86_PV_INFO, X86PvInfo(self.width, levels).pack())
        cpu_policy_records(self.xc, self.domid, out)

    def start_of_stream(self, out: Emitter) -> None:
        """X86_PV_P2M_FRAMES: the pfns of the pages holding the p2m, for pfns 0..max."""
        pfns, ok = self.ppm.mfns_to_pfns(self.p2m.frames)
        if not ok.all():
            bad = int(self.p2m.frames[~ok][0])
            raise GuestStateError(f"domain {self.domid}: p2m frame mfn {bad:#x} is not a page "
                                  "of the guest")
        body = X86PvP2mFrames(0, self.p2m.max_pfn - 1, pfns.astype(np.uint64))
        out.libxc_record(C.REC_TYPE_X86_PV_P2M_FRAMES, body.pack())

    def p2m_changes(self, out: Emitter, live: bool) -> Pfns:
        """The pfns whose frame changed because the guest rebuilt part of its p2m since the
        last look (its p2m_generation moved): the p2m is mapped again and
        X86_PV_P2M_FRAMES sent again. Only the linear p2m has a generation (the tree of
        old guests is never rebuilt in place). While the guest runs, a p2m caught in the
        middle of a change is looked at again next round; once it is suspended, a p2m
        that cannot be read or changed size is an error."""
        if not self.p2m.shared_info.p2m_cr3:
            return no_pfns()
        si = read_shared_info(self.fmem, self.domid, self.info.shared_info_frame, self.width)
        if si.p2m_generation == self.p2m.shared_info.p2m_generation:
            return no_pfns()
        if si.max_pfn != self.p2m.max_pfn:
            raise GuestStateError(f"domain {self.domid}: its p2m changed size from "
                                  f"{self.p2m.max_pfn} to {si.max_pfn} pfns during the save "
                                  "(memory hot-added?): not supported")
        try:
            new = P2M(self.fmem, self.domid, si, self.width)
        except GuestStateError as exc:
            if live:
                log.debug("domain %d: p2m in the middle of a change (%s); next round",
                          self.domid, exc)
                return no_pfns()
            raise
        changed = np.flatnonzero(self.p2m.table != new.table).astype(np.uint64)
        old, self.p2m = self.p2m, new
        old.close()
        self.ppm = self._ppm()
        log.info("domain %d: p2m generation %d -> %d, %d pfn(s) moved; p2m frames sent again",
                 self.domid, old.shared_info.p2m_generation, si.p2m_generation, len(changed))
        self.start_of_stream(out)
        return changed

    def pfn_to_gfn(self, pfns: Pfns) -> npt.NDArray[np.uint64]:
        return self.ppm.p2m64(pfns)

    def normalise(self, types: Types, pages: memoryview, live: bool) -> Normalised:
        idx = np.flatnonzero(pagetable_level(types))
        if not len(idx):
            return Normalised()
        tables = np.frombuffer(pages, dtype=np.uint64).reshape(-1, pagetable.ENTRIES)[idx]
        res = pagetable.normalise(tables, types[idx], self.ppm, live)
        retry = np.zeros(len(types), dtype=np.bool_)
        retry[idx[res.retry]] = True
        replaced: dict[int, Buffer] = {int(i): res.tables[k].tobytes()
                                       for k, i in enumerate(idx) if not res.retry[k]}
        return Normalised(replaced=replaced, retry=retry)

    def end_of_checkpoint(self, out: Emitter) -> None:
        out.libxc_record(C.REC_TYPE_X86_TSC_INFO, tsc_info(self.xc, self.domid).pack())
        with self.fmem.map(self.domid, [self.info.shared_info_frame]) as m:
            m.raise_on_error()
            out.libxc_record(C.REC_TYPE_SHARED_INFO, SharedInfo(bytes(m.page(0))).pack())
        up = {v for v in range(self.xc.domain_info(self.domid).max_vcpu_id + 1)
              if self.write_vcpu(v, out)}
        for v in sorted(self.vcpus_sent - up):
            log.warning("domain %d: vCPU %d went down after it was sent; a stock restore of "
                        "this stream brings it back up with the state it was last sent with",
                        self.domid, v)
        self.vcpus_sent = up

    def write_vcpu(self, v: int, out: Emitter) -> bool:
        """BASIC (frames as pfns), EXTENDED, XSAVE, MSRS of vCPU ``v`` if it is up (each of
        the last three only when it has content), as libxc; False for a vCPU that is down."""
        ctx = VcpuContext(self.xc.vcpu_context(self.domid, v), self.width)
        if not ctx.online:  # Xen's VGCF_online: the vCPU is not down (VPF_down)
            return False
        pagetable.normalise_vcpu(ctx, v, self.ppm)
        out.libxc_record(C.REC_TYPE_X86_PV_VCPU_BASIC, X86PvVcpu(v, ctx.raw).pack())
        ext = self.xc.vcpu_extended_context(self.domid, v)
        if ext:
            out.libxc_record(C.REC_TYPE_X86_PV_VCPU_EXTENDED, X86PvVcpu(v, ext).pack())
        xsave = self.xc.vcpu_extstate_raw(self.domid, v)
        if xsave:
            out.libxc_record(C.REC_TYPE_X86_PV_VCPU_XSAVE, X86PvVcpu(v, xsave).pack())
        msrs = self.xc.vcpu_msrs(self.domid, v)
        if msrs:
            out.libxc_record(C.REC_TYPE_X86_PV_VCPU_MSRS, X86PvVcpu(v, msrs).pack())
        return True

    def close(self) -> None:
        self.p2m.close()
        self.m2p.close()
