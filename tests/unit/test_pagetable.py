"""Examples of each pagetable.py rule (the properties are in test_pagetable_props.py)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from xen_remus import pagetable as pt
from xen_remus.pagetable import PagetableError, PseudoPhysMap
from xen_remus.stream import consts as C
from xen_remus.xen.vcpu import VcpuContext, mfn_to_cr3

U64 = npt.NDArray[np.uint64]


def make_guest(nr_pfns: int, max_mfn: int, width: int = 8, seed: int = 0,
               holes: int = 0) -> PseudoPhysMap:
    """A guest whose pfns sit on random distinct mfns; m2p has junk for foreign mfns."""
    rng = np.random.default_rng(seed)
    mfns = rng.choice(max_mfn + 1, size=nr_pfns, replace=False).astype(np.uint64)
    m2p = rng.integers(0, 2 * nr_pfns + 10, size=max_mfn + 1).astype(np.uint64)
    m2p[mfns] = np.arange(nr_pfns, dtype=np.uint64)
    p2m = mfns.copy()
    if holes:
        p2m[rng.choice(nr_pfns, size=holes, replace=False)] = np.uint64(pt.INVALID_MFN)
    if width == 4:
        p2m32 = p2m.astype(np.uint32)  # INVALID_MFN truncates to 0xffffffff
        return PseudoPhysMap(m2p=m2p, p2m=p2m32, width=4, max_mfn=max_mfn)
    return PseudoPhysMap(m2p=m2p, p2m=p2m, width=8, max_mfn=max_mfn)


def pte(frame: int, flags: int = 0x67) -> int:
    return (frame << 12) | flags


def foreign_mfn(g: PseudoPhysMap) -> int:
    """An mfn that is not the guest's."""
    owned = set(int(x) for x in g.p2m)
    return next(m for m in range(g.top_mfn + 1) if m not in owned)


G = make_guest(64, 1000)


def table(entries: dict[int, int]) -> U64:
    t = np.zeros((1, 512), dtype=np.uint64)
    for i, v in entries.items():
        t[0, i] = v
    return t


def test_present_entries_become_pfns_flags_kept() -> None:
    m = int(G.p2m[5])
    src = table({0: pte(m, 0x8000000000000067), 1: pte(int(G.p2m[63]), 0x25)})
    out = pt.normalise(src, [C.PFINFO_L1TAB], G, live=False)
    assert out.tables[0, 0] == pte(5, 0x8000000000000067)  # NX bit survives
    assert out.tables[0, 1] == pte(63, 0x25)
    assert not out.retry.any()
    assert src[0, 0] == pte(m, 0x8000000000000067)  # input untouched


def test_non_present_entries_kept_bit_for_bit() -> None:
    src = table({3: 0xDEADBEEF000 | 0x66, 4: 0xFFFF_FFFF_FFFF_FFFE})
    out = pt.normalise(src, [C.PFINFO_L2TAB], G, live=False)
    assert np.array_equal(out.tables, src)


def test_l4_xen_slots_cleared_64bit() -> None:
    src = table({255: pte(int(G.p2m[1])), 256: pte(99999 % 1000), 271: 0x1234, 272: 0x66})
    out = pt.normalise(src, [C.PFINFO_L4TAB | C.PFINFO_LPINTAB], G, live=False)
    assert out.tables[0, 255] == pte(1)
    assert out.tables[0, 256] == 0 and out.tables[0, 271] == 0
    assert out.tables[0, 272] == 0x66


def test_l3_of_64bit_guest_has_no_xen_slots() -> None:
    src = table({300: pte(int(G.p2m[2]))})
    assert pt.normalise(src, [C.PFINFO_L3TAB], G, live=False).tables[0, 300] == pte(2)


def test_superpage_above_l1_rejected_even_live() -> None:
    src = table({7: pte(int(G.p2m[3]), 0xE7)})
    with pytest.raises(PagetableError, match=r"L2 table pfn 0x2a slot 7 .*superpage"):
        pt.normalise(src, [C.PFINFO_L2TAB], G, live=True, pfns=[42])
    # PSE (bit 7) means PAT in an L1 entry: allowed.
    assert pt.normalise(src, [C.PFINFO_L1TAB], G, live=False).tables[0, 7] == pte(3, 0xE7)


def test_foreign_mfn_retry_when_live_error_when_suspended() -> None:
    bad = foreign_mfn(G)
    src = np.vstack([table({0: pte(int(G.p2m[0]))}), table({9: pte(bad)})])
    out = pt.normalise(src, [C.PFINFO_L1TAB, C.PFINFO_L1TAB], G, live=True)
    assert out.retry.tolist() == [False, True]
    assert out.tables[0, 0] == pte(0)
    with pytest.raises(PagetableError, match=rf"pfn 0x11 slot 9 .*mfn {bad:#x}"):
        pt.normalise(src, [C.PFINFO_L1TAB, C.PFINFO_L1TAB], G, live=False, pfns=[0x10, 0x11])


def test_mfn_above_max_mfn_is_not_the_guests() -> None:
    src = table({0: pte(G.top_mfn + 1)})
    assert pt.normalise(src, [C.PFINFO_L1TAB], G, live=True).retry[0]


def test_hole_in_p2m_is_not_a_match() -> None:
    g = make_guest(32, 200, holes=32)  # every pfn ballooned out
    src = table({0: pte(int(make_guest(32, 200).p2m[0]))})
    assert pt.normalise(src, [C.PFINFO_L1TAB], g, live=True).retry[0]


def test_not_a_pagetable_type_rejected() -> None:
    with pytest.raises(PagetableError, match="not a page table"):
        pt.normalise(table({}), [0], G, live=True, pfns=[1])


G32 = make_guest(64, 1000, width=4)


def test_pae_l3_entries_4_up_cleared_and_l4_rejected() -> None:
    src = table({0: pte(int(G32.p2m[1]), 0x1), 3: pte(int(G32.p2m[2]), 0x1), 4: 0x55, 511: 7})
    out = pt.normalise(src, [C.PFINFO_L3TAB], G32, live=False)
    assert out.tables[0, 0] == pte(1, 0x1) and out.tables[0, 3] == pte(2, 0x1)
    assert not out.tables[0, 4:].any()
    with pytest.raises(PagetableError, match="L4 table in a 32-bit guest"):
        pt.normalise(src, [C.PFINFO_L4TAB], G32, live=False)


def test_pae_l2_compat_m2p_slots_cleared_only_when_mapping_it() -> None:
    m2p0 = foreign_mfn(G32)
    g = PseudoPhysMap(G32.m2p, G32.p2m, width=4, max_mfn=G32.max_mfn, compat_m2p_mfn0=m2p0)
    src = table({427: pte(int(g.p2m[4])), 428: pte(m2p0), 500: pte(m2p0 + 1)})
    out = pt.normalise(src, [C.PFINFO_L2TAB], g, live=False)
    assert out.tables[0, 427] == pte(4) and not out.tables[0, 428:].any()
    other = table({428: pte(int(g.p2m[6]))})
    assert pt.normalise(other, [C.PFINFO_L2TAB], g, live=False).tables[0, 428] == pte(6)


def _vcpu(width: int, g: PseudoPhysMap) -> VcpuContext:
    ctx = VcpuContext(bytes(5168), width)
    ctx.dx = int(g.p2m[1])
    ctx.set_gdt_frame(0, int(g.p2m[2]))
    ctx.set_gdt_frame(1, int(g.p2m[3]))
    raw = ctx.raw
    raw[ctx.layout.gdt_ents:ctx.layout.gdt_ents + 2] = (1024).to_bytes(2, "little")
    ctx.set_ctrlreg(3, mfn_to_cr3(int(g.p2m[4]), width))
    if width == 8:
        ctx.set_ctrlreg(1, int(g.p2m[5]) << 12)
    return ctx


@pytest.mark.parametrize("width", [8, 4])
def test_vcpu_frames_normalised(width: int) -> None:
    g = G if width == 8 else G32
    ctx = _vcpu(width, g)
    pt.normalise_vcpu(ctx, 0, g)
    assert (ctx.dx, ctx.gdt_frame(0), ctx.gdt_frame(1)) == (1, 2, 3)
    assert ctx.ctrlreg(3) == mfn_to_cr3(4, width)
    if width == 8:
        assert ctx.ctrlreg(1) == 1 | (5 << 12)


def test_vcpu_edx_only_converted_on_vcpu0_and_errors_name_field() -> None:
    ctx = _vcpu(8, G)
    ctx.dx = 0xDEAD  # not a frame on vcpu1
    pt.normalise_vcpu(ctx, 1, G)
    assert ctx.dx == 0xDEAD
    ctx = _vcpu(8, G)
    ctx.set_ctrlreg(3, foreign_mfn(G) << 12)
    with pytest.raises(PagetableError, match=r"vcpu0 ctrlreg\[3\]: mfn"):
        pt.normalise_vcpu(ctx, 0, G)


def test_p2m64_beyond_the_p2m_is_invalid() -> None:
    got = G.p2m64(np.array([0, 63, 64, 2**40], dtype=np.uint64))
    assert got.tolist() == [int(G.p2m[0]), int(G.p2m[63]), pt.INVALID_MFN, pt.INVALID_MFN]
    assert G32.p2m64(np.array([1000], dtype=np.uint64)).tolist() == [pt.INVALID_MFN]


def test_pae_vcpu_frames_above_4gib_fold_into_cr3_and_cr1_is_not_a_frame() -> None:
    """A 32-bit PAE guest whose top table sits above 4 GiB of machine memory (mfn bit 20
    and up go into cr3's low bits); its ctrlreg[1] is no user cr3 (64-bit only), kept."""
    high = (1 << 20) + 5
    m2p = np.zeros(high + 1, dtype=np.uint64)
    p2m = np.array([10, 11, 12, high], dtype=np.uint32)
    m2p[p2m.astype(np.intp)] = np.arange(4, dtype=np.uint64)
    g = PseudoPhysMap(m2p, p2m, width=4, max_mfn=high)
    ctx = VcpuContext(bytes(2800), 4)
    ctx.dx = 11
    ctx.set_ctrlreg(3, mfn_to_cr3(high, 4))
    assert ctx.ctrlreg(3) & 0xFFF == 1  # bit 20 of the mfn, folded
    ctx.set_ctrlreg(1, 0xABCD000)
    pt.normalise_vcpu(ctx, 0, g)
    assert (ctx.dx, ctx.ctrlreg(3), ctx.ctrlreg(1)) == (1, mfn_to_cr3(3, 4), 0xABCD000)


def test_pae_tables_keep_frames_above_4gib_and_32bit_holes_are_not_frames() -> None:
    """PAE entries are 64-bit: a frame above 4 GiB is found; a hole of a 32-bit p2m
    (0xffffffff) never matches, not even an entry that names mfn 0xffffffff."""
    high = (1 << 21) + 3
    m2p = np.zeros(high + 1, dtype=np.uint64)
    p2m = np.array([7, high, 0xFFFFFFFF], dtype=np.uint32)
    m2p[[7, high]] = [0, 1]
    g = PseudoPhysMap(m2p, p2m, width=4, max_mfn=0xFFFFFFFF)
    src = table({0: pte(high, 0x8000000000000063), 1: pte(7)})
    out = pt.normalise(src, [C.PFINFO_L1TAB], g, live=False)
    assert out.tables[0, 0] == pte(1, 0x8000000000000063) and out.tables[0, 1] == pte(0)
    assert g.p2m64(np.array([2], dtype=np.uint64)).tolist() == [pt.INVALID_MFN]
    _, ok = g.mfns_to_pfns(np.array([0xFFFFFFFF], dtype=np.uint64))
    assert not ok[0]
