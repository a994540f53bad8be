"""DomainOps over the real Xen bindings (`xen_remus.xen`): log-dirty, page types, mapping,
suspend and fast resume of one domain."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xen_remus.save.pages import Pfns, Types
from xen_remus.xen import DirtyBitmap, ForeignMemory, Mapping, Suspender, XenCtrl, XenStore


class XenDomain:
    """One domain, for the save engine. ``nr_pfns`` sizes the log-dirty bitmap."""

    def __init__(self, xc: XenCtrl, fmem: ForeignMemory, xs: XenStore, domid: int,
                 nr_pfns: int) -> None:
        self.xc, self.fmem, self.domid = xc, fmem, domid
        self.nr_pfns = nr_pfns
        self._bitmap: DirtyBitmap | None = None
        self._suspender = Suspender(xc, xs, domid)

    @property
    def suspend_method(self) -> str:
        return self._suspender.method

    def logdirty_enable(self) -> None:
        self.xc.logdirty_enable(self.domid)

    def logdirty_clean(self, final: bool) -> Pfns:
        if self._bitmap is None:
            self._bitmap = self.xc.dirty_bitmap(self.nr_pfns)
        self.xc.logdirty_clean(self.domid, self._bitmap, final=final)
        return self._bitmap.dirty_pfns()

    def logdirty_off(self) -> None:
        self.xc.logdirty_off(self.domid)

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> Types:
        return self.xc.pfn_types(self.domid, frames)

    def map(self, frames: npt.NDArray[np.uint64]) -> Mapping:
        return self.fmem.map(self.domid, frames)

    def suspend(self) -> None:
        self._suspender.suspend()

    def resume(self) -> None:
        self._suspender.resume(fast=True)

    def pause(self) -> None:
        self.xc.pause(self.domid)

    def close(self) -> None:
        if self._bitmap is not None:
            self._bitmap.close()
            self._bitmap = None
        self._suspender.close()
