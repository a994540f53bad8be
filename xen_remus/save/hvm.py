"""HVM/PVH guests: identity pfn -> gfn, no pagetable rewriting; TSC, HVM_CONTEXT, HVM_PARAMS.

The pfn space is every gfn up to the highest one in use, holes included (the VGA hole, the
MMIO hole below 4 GiB): as libxc does, each pfn goes in PAGE_DATA with the type Xen gives
it, XTAB (no data) for a gfn without memory. An HVM guest's device model (its libxl
records, QEMU's dirty logging) is not the guest type's business: save/devmodel.py.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xen_remus.save.ops import Emitter, Normalised
from xen_remus.save.pages import Pfns, Types, no_pfns
from xen_remus.save.records import cpu_policy_records, tsc_info
from xen_remus.stream import consts as C
from xen_remus.stream.libxc_bodies import HvmContext, HvmParams
from xen_remus.xen import XenCtrl
from xen_remus.xen import structs as S

# The HVM params libxc saves, in its order; zero values are skipped.
HVM_PARAMS_SAVED = (
    S.HVM_PARAM_STORE_PFN, S.HVM_PARAM_IOREQ_PFN, S.HVM_PARAM_BUFIOREQ_PFN,
    S.HVM_PARAM_PAGING_RING_PFN, S.HVM_PARAM_MONITOR_RING_PFN, S.HVM_PARAM_SHARING_RING_PFN,
    S.HVM_PARAM_VM86_TSS_SIZED, S.HVM_PARAM_CONSOLE_PFN, S.HVM_PARAM_ACPI_IOPORTS_LOCATION,
    S.HVM_PARAM_VIRIDIAN, S.HVM_PARAM_IDENT_PT, S.HVM_PARAM_VM_GENERATION_ID_ADDR,
    S.HVM_PARAM_IOREQ_SERVER_PFN, S.HVM_PARAM_NR_IOREQ_SERVER_PAGES,
    S.HVM_PARAM_X87_FIP_WIDTH, S.HVM_PARAM_MCA_CAP,
)


class HvmGuest:
    domain_type = C.DHDR_TYPE_X86_HVM

    def __init__(self, xc: XenCtrl, domid: int) -> None:
        self.xc, self.domid = xc, domid
        self._nr = xc.maximum_gpfn(domid) + 1

    def nr_pfns(self) -> int:
        return self._nr

    def static_data(self, out: Emitter) -> None:
        cpu_policy_records(self.xc, self.domid, out)

    def start_of_stream(self, out: Emitter) -> None:
        pass

    def p2m_changes(self, out: Emitter, live: bool) -> Pfns:
        return no_pfns()

    def pfn_to_gfn(self, pfns: Pfns) -> npt.NDArray[np.uint64]:
        return pfns

    def normalise(self, types: Types, pages: memoryview, live: bool) -> Normalised:
        return Normalised()

    def end_of_checkpoint(self, out: Emitter) -> None:
        # libxc's order (TSC, HVM_CONTEXT, HVM_PARAMS); its restorer accepts it.
        out.libxc_record(C.REC_TYPE_X86_TSC_INFO, tsc_info(self.xc, self.domid).pack())
        out.libxc_record(C.REC_TYPE_HVM_CONTEXT, HvmContext(self.xc.hvm_context(self.domid)).pack())
        params = [(i, self.xc.hvm_param(self.domid, i)) for i in HVM_PARAMS_SAVED]
        params = [(i, v) for i, v in params if v]
        if params:
            out.libxc_record(C.REC_TYPE_HVM_PARAMS, HvmParams(params).pack())

    def close(self) -> None:
        pass
