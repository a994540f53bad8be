"""Foreign mapping of guest frames (libxenforeignmemory) as zero-copy memoryviews."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import numpy.typing as npt

from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.xen import libs
from xen_remus.xen.errors import MappingError, call_failed


class Mapping(libs.Closing):
    """``pages`` guest frames mapped contiguously; page i is ``view[i*PAGE_SIZE:(i+1)*PAGE_SIZE]``.

    ``errors[i]`` is 0 or the positive errno for frame i (its bytes are then unusable).
    close() unmaps. Views derived from ``view`` (numpy arrays, slices) alias the guest's
    memory without owning it: drop them before close(), as touching them afterwards faults.
    """

    def __init__(self, fmem: ForeignMemory, domid: int, address: int,
                 frames: npt.NDArray[np.uint64], errors: npt.NDArray[np.int32],
                 writable: bool = False) -> None:
        self._fmem = fmem
        self.domid = domid
        self.address = address
        self.frames = frames
        self.errors = errors
        self.pages = len(frames)
        raw = (ctypes.c_char * (self.pages * PAGE_SIZE)).from_address(address)
        self._base = memoryview(raw).cast("B")
        # A read-only mapping must not be writable from Python either (it would SIGSEGV).
        self._view: memoryview | None = self._base if writable else self._base.toreadonly()

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"mapping of {self.pages} frames of domain {self.domid} is closed")
        return self._view

    def page(self, i: int) -> memoryview:
        return self.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    def array(self, dtype: type[np.generic] = np.uint64) -> npt.NDArray[np.generic]:
        """All pages as one numpy array of ``dtype`` (no copy; read-only if mapped so)."""
        return np.frombuffer(self.view, dtype=dtype)

    def ok(self) -> npt.NDArray[np.bool_]:
        good: npt.NDArray[np.bool_] = self.errors == 0
        return good

    def raise_on_error(self) -> None:
        """MappingError listing the frames that failed, if any did."""
        bad = np.flatnonzero(self.errors)
        if len(bad):
            raise MappingError(self.domid, [(int(self.frames[i]), int(self.errors[i]))
                                            for i in bad])

    def close(self) -> None:
        if self._view is None:
            return
        self._view.release()
        self._base.release()
        self._view = None
        if self._fmem.handle:
            self._fmem.lib.xenforeignmemory_unmap(self._fmem.handle, self.address, self.pages)


class ForeignMemory(libs.Handle):
    """An open libxenforeignmemory handle."""

    def __init__(self) -> None:
        super().__init__(libs.foreignmemory(), "xenforeignmemory_open",
                         "xenforeignmemory_close", libs.logger(), 0)

    def map(self, domid: int, frames: npt.ArrayLike, writable: bool = False) -> Mapping:
        """Map guest frames (GFNs for HVM/PVH, MFNs for PV; MFNs for DOMID_XEN) in one call.

        Per-frame failures are reported in ``Mapping.errors``, not raised: during live rounds
        some frames may be transiently unmappable and are retried by the caller.
        """
        arr = np.ascontiguousarray(frames, dtype=np.uint64)
        n = len(arr)
        if n == 0:
            raise ValueError("map: no frames")
        errs = np.zeros(n, dtype=np.int32)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = self.lib.xenforeignmemory_map(
            self.handle, domid, prot, n, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_ulong)),
            errs.ctypes.data_as(ctypes.POINTER(ctypes.c_int)))
        if not addr:
            raise call_failed("xenforeignmemory_map", domid, libs.errno(), f"{n} frames")
        return Mapping(self, domid, addr, arr, np.abs(errs), writable)

