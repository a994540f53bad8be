"""Hypercall buffers: memory libxenctrl can hand to Xen, exposed as memoryview / numpy."""

from __future__ import annotations

import ctypes
from ctypes import byref

import numpy as np
import numpy.typing as npt

from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.xen import libs
from xen_remus.xen import structs as S
from xen_remus.xen.errors import call_failed


class HypercallBuffer:
    """Page-aligned memory that libxenctrl may pass to Xen; ``view`` is a writable memoryview."""

    def __init__(self, lib: ctypes.CDLL, handle: int, nbytes: int) -> None:
        self._lib, self._handle = lib, handle
        self.nr_pages = max(1, -(-nbytes // PAGE_SIZE))
        self.desc = S.XcHypercallBuffer(None, None, 0, ctypes.c_void_p(-1).value, 0)
        ptr = lib.xc__hypercall_buffer_alloc_pages(handle, byref(self.desc), self.nr_pages)
        if not ptr:
            raise call_failed("xc_hypercall_buffer_alloc_pages", None, libs.errno(),
                              f"{self.nr_pages} pages")
        self.address: int = ptr
        raw = (ctypes.c_char * (self.nr_pages * PAGE_SIZE)).from_address(ptr)
        self.view: memoryview | None = memoryview(raw).cast("B")

    def close(self) -> None:
        """Free the buffer; arrays taken from ``view`` must not be used afterwards."""
        if self.view is None:
            return
        self.view.release()
        self.view = None
        self._lib.xc__hypercall_buffer_free_pages(self._handle, byref(self.desc), self.nr_pages)


class DirtyBitmap(HypercallBuffer):
    """The log-dirty bitmap of ``pages`` pfns, bit i of byte i//8 for pfn i (Xen's layout)."""

    def __init__(self, lib: ctypes.CDLL, handle: int, pages: int) -> None:
        super().__init__(lib, handle, -(-pages // 8))
        self.pages = pages

    def bits(self) -> npt.NDArray[np.uint8]:
        """The bitmap bytes as a numpy array over the hypercall buffer (no copy)."""
        assert self.view is not None, "bitmap closed"
        return np.frombuffer(self.view, dtype=np.uint8, count=-(-self.pages // 8))

    def dirty_pfns(self) -> npt.NDArray[np.uint64]:
        """Sorted pfns whose bit is set."""
        return bitmap_pfns(self.bits(), self.pages)

    def set_all(self) -> None:
        """Mark every pfn dirty (the first pre-copy round sends everything)."""
        self.bits()  # asserts open
        assert self.view is not None
        self.view[:] = b"\xff" * len(self.view)


def bitmap_pfns(bitmap: npt.NDArray[np.uint8] | npt.NDArray[np.uint64],
                nr_pfns: int) -> npt.NDArray[np.uint64]:
    """The set bits of a Xen bitmap (little-endian bit order, as log-dirty returns it) below
    ``nr_pfns``, as sorted pfns."""
    raw = np.ascontiguousarray(bitmap).view(np.uint8).reshape(-1)
    bits = np.unpackbits(raw, bitorder="little")[:nr_pfns]
    return np.flatnonzero(bits).astype(np.uint64)
