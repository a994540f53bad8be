"""The PV guest's physical-to-machine map (p2m) and Xen's machine-to-physical map (m2p).

The p2m is reached either through the linear p2m list (shared_info.arch.p2m_vaddr in the
address space of p2m_cr3; preferred, as libxc does) or the 3-level frame-list-list tree
(pfn_to_mfn_frame_list_list). Both give zero-copy numpy views of the guest's live p2m pages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.stream.events import Buffer
from xen_remus.xen import structs as S
from xen_remus.xen.ctrl import XenCtrl
from xen_remus.xen.errors import GuestStateError
from xen_remus.xen.memory import ForeignMemory, Mapping
from xen_remus.xen.vcpu import cr3_to_mfn

M2P_CHUNK_PAGES = 512  # the M2P is handed out in 2 MiB chunks
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_FRAME_MASK = 0x000FFFFFFFFFF000

# Offsets of shared_info.arch fields (xen/foreign/x86_64.h, x86_32.h).
_ARCH = {8: (3088, "<QQQQQQ"), 4: (2316, "<IIIIII")}


@dataclass(frozen=True)
class SharedInfoArch:
    """shared_info.arch of a PV guest (max_pfn is a count of p2m entries)."""

    max_pfn: int
    pfn_to_mfn_frame_list_list: int
    nmi_reason: int
    p2m_cr3: int
    p2m_vaddr: int
    p2m_generation: int


def parse_shared_info(page: Buffer, width: int) -> SharedInfoArch:
    off, fmt = _ARCH[width]
    return SharedInfoArch(*struct.unpack_from(fmt, page, off))


class M2P:
    """Xen's read-only machine-to-phys table, mapped from DOMID_XEN. ``table[mfn]`` = pfn."""

    def __init__(self, xc: XenCtrl, fmem: ForeignMemory) -> None:
        max_page = xc.maximum_ram_page()
        # Xen hands out exactly ceil(max_page * 8 / 2 MiB) chunks; asking for more fails.
        chunks = -(-max_page * 8 // (M2P_CHUNK_PAGES * PAGE_SIZE))
        starts = xc.machphys_mfn_list(chunks)
        frames = (starts[:, None] + np.arange(M2P_CHUNK_PAGES, dtype=np.uint64)).ravel()
        self.mapping = fmem.map(S.DOMID_XEN, frames)
        self.mapping.raise_on_error()
        count = min(max_page + 1, len(frames) * PAGE_SIZE // 8)
        self.table: npt.NDArray[np.uint64] = np.frombuffer(
            self.mapping.view, dtype=np.uint64, count=count)
        self.max_mfn = count - 1  # libxc accepts mfn <= max_page when the table covers it

    def close(self) -> None:
        del self.table
        self.mapping.close()


class P2M:
    """A PV guest's live p2m: ``table[pfn]`` = mfn (uint64, or uint32 for 32-bit guests;
    ``invalid`` marks holes). ``frames`` are the MFNs of the p2m pages themselves, in order
    (X86_PV_P2M_FRAMES once translated to PFNs). ``method`` is "linear" or "tree"."""

    def __init__(self, fmem: ForeignMemory, domid: int, shared_info: SharedInfoArch,
                 width: int, method: str | None = None) -> None:
        self.domid, self.width, self.shared_info = domid, width, shared_info
        self.max_pfn = shared_info.max_pfn
        self.invalid = (1 << (8 * width)) - 1
        if self.max_pfn == 0:
            raise GuestStateError(f"domain {domid}: shared_info.arch.max_pfn is 0 (p2m not set up)")
        self.method = method or ("linear" if shared_info.p2m_cr3 else "tree")
        self._fmem = fmem
        self._maps: list[Mapping] = []
        if self.method == "linear":
            self.frames = self._linear_frames()
        elif self.method == "tree":
            self.frames = self._tree_frames()
        else:
            raise ValueError(f"p2m method {self.method!r}")
        leaves = self._map(self.frames, "p2m pages")
        dtype = np.uint64 if width == 8 else np.uint32
        off = (shared_info.p2m_vaddr & (PAGE_SIZE - 1)) if self.method == "linear" else 0
        self.table: npt.NDArray[np.unsignedinteger] = np.frombuffer(
            leaves.view, dtype=dtype, count=self.max_pfn, offset=off)

    @property
    def per_page(self) -> int:
        return PAGE_SIZE // self.width

    def _map(self, frames: npt.NDArray[np.uint64], what: str) -> Mapping:
        m = self._fmem.map(self.domid, frames)
        bad = np.flatnonzero(m.errors)
        if len(bad):
            m.close()
            raise GuestStateError(f"domain {self.domid}: {len(bad)} {what} unmappable, first "
                                  f"mfn {int(frames[bad[0]]):#x} errno {int(m.errors[bad[0]])}")
        self._maps.append(m)
        return m

    def _words(self, m: Mapping) -> npt.NDArray[np.uint64]:
        dt = np.uint64 if self.width == 8 else np.uint32
        return np.frombuffer(m.view, dtype=dt).astype(np.uint64)

    def _tree_frames(self) -> npt.NDArray[np.uint64]:
        fll = self.shared_info.pfn_to_mfn_frame_list_list
        if fll in (0, self.invalid):
            raise GuestStateError(f"domain {self.domid}: no p2m frame-list-list ({fll:#x})")
        n_leaves = -(-self.max_pfn // self.per_page)
        n_lists = -(-n_leaves // self.per_page)
        top = self._words(self._map(np.array([fll], dtype=np.uint64), "frame-list-list"))
        lists = self._words(self._map(top[:n_lists], "p2m frame lists"))
        return np.ascontiguousarray(lists[:n_leaves])

    def _linear_frames(self) -> npt.NDArray[np.uint64]:
        """Walk the guest's page tables from p2m_cr3 for every page of the linear p2m."""
        si, w = self.shared_info, self.width
        first = si.p2m_vaddr & ~(PAGE_SIZE - 1)
        end = si.p2m_vaddr + self.max_pfn * w
        vas = np.arange(first, end, PAGE_SIZE, dtype=np.uint64)
        shifts = (39, 30, 21, 12) if w == 8 else (30, 21, 12)
        tables = np.full(len(vas), cr3_to_mfn(si.p2m_cr3, w), dtype=np.uint64)
        for level, shift in zip(range(len(shifts), 0, -1), shifts, strict=True):
            uniq, inv = np.unique(tables, return_inverse=True)
            entries = np.frombuffer(self._map(uniq, f"L{level} tables").view, dtype=np.uint64)
            idx = (vas >> np.uint64(shift)) & np.uint64(511)
            pte = entries.reshape(len(uniq), 512)[inv, idx.astype(np.intp)]
            absent = np.flatnonzero((pte & PTE_PRESENT) == 0)
            if len(absent):
                raise GuestStateError(f"domain {self.domid}: linear p2m va "
                                      f"{int(vas[absent[0]]):#x} not mapped at L{level}")
            if level > 1 and np.any(pte & PTE_PSE):
                raise GuestStateError(f"domain {self.domid}: linear p2m uses a superpage at "
                                      f"L{level}")
            tables = (pte & np.uint64(PTE_FRAME_MASK)) >> np.uint64(12)
        return np.ascontiguousarray(tables)

    def close(self) -> None:
        del self.table
        for m in self._maps:
            m.close()
        self._maps.clear()


def read_shared_info(fmem: ForeignMemory, domid: int, mfn: int, width: int) -> SharedInfoArch:
    """shared_info.arch of a PV guest (``mfn`` is DomainInfo.shared_info_frame)."""
    with fmem.map(domid, [mfn]) as m:
        m.raise_on_error()
        return parse_shared_info(bytes(m.page(0)), width)
