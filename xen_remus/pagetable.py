"""Normalise PV guest page tables for the migration stream (MFN -> PFN).

Pure numpy over batches of tables: ``tables`` is an (n, 512) uint64 array, one row per page,
``types`` the page type of each as the stream names it (stream.consts PFINFO_*, pin bit
ignored). Rules, as in the Xen
migration spec and libxc's normalise_pagetable:

- 64-bit guests (4 levels): L4 slots 256..271 (HYPERVISOR_VIRT_START..END) belong to Xen and
  are cleared.
- 32-bit PAE guests (3 levels): L3 entries 4..511 are cleared; in an L2 whose slot 428
  (HYPERVISOR_VIRT_START_X86_32 = 0xF5800000) maps the compat m2p's first MFN, slots 428..511
  are cleared. An L4 table is an error.
- A present entry's frame must be in the guest's pseudo-physical map
  (mfn <= max_mfn, pfn = m2p[mfn] <= max_pfn, p2m[pfn] == mfn); it is replaced by the pfn.
  If it is not: while the guest runs the table is marked for retry in a later round (split
  updates in flight), once it is suspended/paused it is a hard PagetableError.
- A present entry with PSE above L1 (a superpage) cannot be migrated: PagetableError.
- Non-present entries are kept bit for bit.

``normalise_reference`` is the same in plain Python, for property tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xen_remus.errors import XenRemusError
from xen_remus.stream import consts as C
from xen_remus.xen.vcpu import VcpuContext, cr3_to_mfn, mfn_to_cr3

ENTRIES = C.PAGE_SIZE // 8
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
FRAME_MASK = 0x000FFFFFFFFFF000  # bits 12..51 of a PTE hold the frame

L4_XEN_FIRST, L4_XEN_LAST = 256, 271  # 0xFFFF800000000000..0xFFFF87FFFFFFFFFF >> 39
PAE_L3_XEN_FIRST = 4
PAE_L2_XEN_FIRST, PAE_L2_XEN_LAST = 428, 511  # 0xF5800000..0xFFFFFFFF >> 21
FIRST_RESERVED_GDT_ENTRY = 14 * C.PAGE_SIZE // 8
INVALID_MFN = (1 << 64) - 1

U64 = npt.NDArray[np.uint64]


class PagetableError(XenRemusError):
    """A page table or vCPU frame that cannot go into the stream; names where and why."""

    def __init__(self, reason: str, *, pfn: int | None = None, level: int | None = None,
                 index: int | None = None, entry: int | None = None) -> None:
        self.reason, self.pfn, self.level, self.index, self.entry = reason, pfn, level, index, entry
        where = []
        if level is not None:
            where.append(f"L{level} table")
        if pfn is not None:
            where.append(f"pfn {pfn:#x}")
        if index is not None:
            where.append(f"slot {index}")
        if entry is not None:
            where.append(f"entry {entry:#018x}")
        super().__init__(f"{' '.join(where) or 'page table'}: {reason}")


@dataclass(frozen=True)
class PseudoPhysMap:
    """What MFN <-> PFN translation needs: Xen's m2p, the guest's p2m, and the guest width.

    ``p2m`` may be uint32 (32-bit guest, 0xffffffff = invalid) or uint64. ``max_mfn`` is the
    largest valid index into ``m2p``; ``compat_m2p_mfn0`` only matters for PAE guests.
    """

    m2p: U64
    p2m: npt.NDArray[np.unsignedinteger]
    width: int = 8
    max_mfn: int | None = None
    compat_m2p_mfn0: int | None = None

    @property
    def levels(self) -> int:
        return 4 if self.width == 8 else 3

    @property
    def top_mfn(self) -> int:
        limit = len(self.m2p) - 1
        return limit if self.max_mfn is None else min(self.max_mfn, limit)

    def p2m64(self, pfns: U64) -> U64:
        """p2m[pfns] as uint64; INVALID_MFN for holes (32-bit ones expanded) and for pfns
        beyond the p2m."""
        # take(mode="clip") is twice as fast as fancy indexing; the clipped are masked below.
        v = np.take(self.p2m, pfns.astype(np.intp), mode="clip").astype(np.uint64, copy=False)
        if self.p2m.dtype == np.uint32:
            v[v == 0xFFFFFFFF] = np.uint64(INVALID_MFN)
        v[pfns >= np.uint64(len(self.p2m))] = np.uint64(INVALID_MFN)
        return v

    def mfns_to_pfns(self, mfns: U64) -> tuple[U64, npt.NDArray[np.bool_]]:
        """(pfns, ok): ok where the mfn is in the pseudo-physical map; pfns valid there."""
        in_range = mfns <= np.uint64(self.top_mfn)
        pfns = np.take(self.m2p, mfns.astype(np.intp), mode="clip")
        ok = in_range & (pfns < np.uint64(len(self.p2m)))
        back = self.p2m64(pfns)
        ok &= back == mfns
        return pfns, ok


@dataclass(frozen=True)
class Normalised:
    """Result of normalise(): the rewritten tables, and rows to resend in a later round.

    ``retry[i]`` is True when table i referenced a frame outside the guest while it ran;
    row i of ``tables`` is then meaningless and the page must be sent again later.
    """

    tables: U64
    retry: npt.NDArray[np.bool_]


def is_pagetable(types: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True for L1..L4 page-table types (the pages normalise() applies to)."""
    t = np.asarray(types, dtype=np.uint64) & np.uint64(C.PFINFO_LTABTYPE_MASK)
    ok: npt.NDArray[np.bool_] = (t >= C.PFINFO_L1TAB) & (t <= C.PFINFO_L4TAB)
    return ok


def _levels_of(types: npt.ArrayLike, n: int, ppm: PseudoPhysMap,
               pfns: U64 | None) -> npt.NDArray[np.intp]:
    t = np.asarray(types, dtype=np.uint64)
    if t.shape != (n,):
        raise ValueError(f"types: expected shape ({n},), got {t.shape}")
    lvl = (t & np.uint64(C.PFINFO_LTABTYPE_MASK)).astype(np.intp)
    bad = np.flatnonzero((lvl < 1) | (lvl > ppm.levels))
    if len(bad):
        i = int(bad[0])
        why = ("an L4 table in a 32-bit guest" if lvl[i] == 4 else
               f"type {int(t[i]):#x} is not a page table")
        raise PagetableError(why, pfn=None if pfns is None else int(pfns[i]))
    return lvl


def _xen_slots(tables: U64, lvl: npt.NDArray[np.intp], ppm: PseudoPhysMap
               ) -> npt.NDArray[np.bool_]:
    """Mask of entries that belong to Xen and are cleared."""
    col = np.arange(ENTRIES)
    mask = np.zeros(tables.shape, dtype=bool)
    if ppm.levels == 4:
        mask[lvl == 4] = (col >= L4_XEN_FIRST) & (col <= L4_XEN_LAST)
    else:
        mask[lvl == 3] = col >= PAE_L3_XEN_FIRST
        if ppm.compat_m2p_mfn0 is not None:
            slot = (tables[:, PAE_L2_XEN_FIRST] & np.uint64(FRAME_MASK)) >> np.uint64(C.PAGE_SHIFT)
            rows = (lvl == 2) & (slot == np.uint64(ppm.compat_m2p_mfn0))
            mask[rows] = (col >= PAE_L2_XEN_FIRST) & (col <= PAE_L2_XEN_LAST)
    return mask


def normalise(tables: npt.ArrayLike, types: npt.ArrayLike, ppm: PseudoPhysMap, live: bool,
              pfns: npt.ArrayLike | None = None) -> Normalised:
    """MFN -> PFN in a batch of page tables (see the module doc for the rules).

    ``tables`` (n, 512) or (n*512,) uint64, left untouched; ``pfns`` (n,) only names pages in
    errors. ``live`` = the guest is running (bad frames mean retry, not error).
    """
    src = np.asarray(tables, dtype=np.uint64).reshape(-1, ENTRIES)
    where = None if pfns is None else np.asarray(pfns, dtype=np.uint64)
    lvl = _levels_of(types, len(src), ppm, where)
    out = np.where(_xen_slots(src, lvl, ppm), np.uint64(0), src)
    # Whole-array operations: cheaper than gathering the present entries first.
    present = (out & np.uint64(PTE_PRESENT)) != 0
    big = present & ((out & np.uint64(PTE_PSE)) != 0) & (lvl > 1)[:, None]
    if big.any():
        r, c = (int(x[0]) for x in np.nonzero(big))
        raise PagetableError("superpage cannot be migrated", level=int(lvl[r]), index=c,
                             pfn=None if where is None else int(where[r]), entry=int(out[r, c]))
    mfns = (out & np.uint64(FRAME_MASK)) >> np.uint64(C.PAGE_SHIFT)
    new_pfns, ok = ppm.mfns_to_pfns(np.where(present, mfns, np.uint64(ppm.top_mfn + 1)))
    bad = present & ~ok
    retry = bad.any(axis=1)
    if not live and retry.any():
        r, c = (int(x[0]) for x in np.nonzero(bad))
        raise PagetableError(f"mfn {int(mfns[r, c]):#x} is not in the guest's pseudo-physical "
                             f"map (guest suspended)", level=int(lvl[r]), index=c,
                             pfn=None if where is None else int(where[r]), entry=int(out[r, c]))
    merged = (out & ~np.uint64(FRAME_MASK)) | (new_pfns << np.uint64(C.PAGE_SHIFT))
    out = np.where(ok, merged, out)
    return Normalised(out, retry)


# -- vCPU frames --------------------------------------------------------------------------

def _vcpu_frames(ctx: VcpuContext, vcpu_id: int) -> list[tuple[str, int, int]]:
    """(field, frame, kind) of each vCPU field that holds a frame; kind: 0 raw, 1 cr3, 2 cr1."""
    if ctx.gdt_ents > FIRST_RESERVED_GDT_ENTRY:
        raise PagetableError(f"vcpu{vcpu_id}: {ctx.gdt_ents} GDT entries, more than the "
                             f"{FIRST_RESERVED_GDT_ENTRY} a guest may use")
    out = [("user_regs.edx (start_info)", ctx.dx, 0)] if vcpu_id == 0 else []
    out += [(f"gdt_frames[{i}]", ctx.gdt_frame(i), 0) for i in range(ctx.nr_gdt_frames)]
    out.append(("ctrlreg[3]", cr3_to_mfn(ctx.ctrlreg(3), ctx.width), 1))
    if ctx.width == 8 and ctx.ctrlreg(1):
        out.append(("ctrlreg[1] (user cr3)", ctx.ctrlreg(1) >> C.PAGE_SHIFT, 2))
    return out


def _set_vcpu_frame(ctx: VcpuContext, field: str, kind: int, frame: int) -> None:
    if kind == 1:
        ctx.set_ctrlreg(3, mfn_to_cr3(frame, ctx.width))
    elif kind == 2:
        ctx.set_ctrlreg(1, 1 | (frame << C.PAGE_SHIFT))
    elif field.startswith("user_regs"):
        ctx.dx = frame
    else:
        ctx.set_gdt_frame(int(field[len("gdt_frames["):-1]), frame)


def normalise_vcpu(ctx: VcpuContext, vcpu_id: int, ppm: PseudoPhysMap) -> None:
    """MFN -> PFN in the frame-holding fields of a suspended vCPU's context, in place:
    vcpu0's start_info (edx), GDT frames, CR3 (PAE-folded on 32-bit), 64-bit user CR3."""
    fields = _vcpu_frames(ctx, vcpu_id)
    mfns = np.array([f for _, f, _ in fields], dtype=np.uint64)
    pfns, ok = ppm.mfns_to_pfns(mfns)
    for (field, mfn, kind), pfn, good in zip(fields, pfns, ok, strict=True):
        if not good:
            raise PagetableError(f"vcpu{vcpu_id} {field}: mfn {mfn:#x} is not in the guest's "
                                 f"pseudo-physical map")
        _set_vcpu_frame(ctx, field, kind, int(pfn))


# -- plain-Python reference ---------------------------------------------------------------

def normalise_reference(tables: list[list[int]], types: list[int], ppm: PseudoPhysMap,
                        live: bool) -> tuple[list[list[int]], list[bool]]:
    """normalise() written entry by entry with Python ints: the oracle for property tests
    and the baseline of the benchmark. Returns (tables, retry); raises PagetableError."""
    m2p, p2m = ppm.m2p, ppm.p2m
    inv = 0xFFFFFFFF if ppm.p2m.dtype == np.uint32 else INVALID_MFN
    out_tables, retry = [], []
    for table, typ in zip(tables, types, strict=True):
        level = typ & C.PFINFO_LTABTYPE_MASK
        if not 1 <= level <= ppm.levels:
            raise PagetableError("not a page table of this guest")
        first, last = ENTRIES, -1
        if ppm.levels == 4 and level == 4:
            first, last = L4_XEN_FIRST, L4_XEN_LAST
        elif ppm.levels == 3 and level == 3:
            first, last = PAE_L3_XEN_FIRST, ENTRIES - 1
        elif (ppm.levels == 3 and level == 2 and ppm.compat_m2p_mfn0 is not None
              and (table[PAE_L2_XEN_FIRST] & FRAME_MASK) >> C.PAGE_SHIFT == ppm.compat_m2p_mfn0):
            first, last = PAE_L2_XEN_FIRST, PAE_L2_XEN_LAST
        new, again = [], False
        for i, pte in enumerate(table):
            if first <= i <= last:
                pte = 0
            if pte & PTE_PRESENT:
                if level > 1 and pte & PTE_PSE:
                    raise PagetableError("superpage cannot be migrated", level=level, index=i)
                mfn = (pte & FRAME_MASK) >> C.PAGE_SHIFT
                pfn = int(m2p[mfn]) if mfn <= ppm.top_mfn else -1
                back = int(p2m[pfn]) if 0 <= pfn < len(p2m) else None
                if back is None or back == inv or back != mfn:
                    if not live:
                        raise PagetableError("mfn not in the pseudo-physical map",
                                             level=level, index=i)
                    again = True
                else:
                    pte = (pte & ~FRAME_MASK & (2**64 - 1)) | (pfn << C.PAGE_SHIFT)
            new.append(pte)
        out_tables.append(new)
        retry.append(again)
    return out_tables, retry
