"""Property tests: pagetable.normalise against the plain-Python reference."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_pagetable import make_guest
from xen_remus import pagetable as pt
from xen_remus.pagetable import PagetableError, PseudoPhysMap
from xen_remus.stream import consts as C

FLAGS = 0x8000000000000FFF  # NX and the low flag bits, everything but the frame


@st.composite
def batches(draw: st.DrawFn) -> tuple[PseudoPhysMap, npt.NDArray[np.uint64], list[int], bool]:
    width = draw(st.sampled_from([8, 4]))
    nr = draw(st.integers(1, 150))
    max_mfn = draw(st.integers(nr, 1500))
    g = make_guest(nr, max_mfn, width, seed=draw(st.integers(0, 2**32 - 1)),
                   holes=draw(st.integers(0, nr // 4)))
    if width == 4 and draw(st.booleans()):
        g = PseudoPhysMap(g.m2p, g.p2m, 4, g.max_mfn, compat_m2p_mfn0=draw(st.integers(0, 50)))
    top = 4 if width == 8 else 3
    n = draw(st.integers(1, 4))
    levels = draw(st.lists(st.integers(1, top), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p_bad = draw(st.sampled_from([0.0, 0.0, 0.002, 0.05]))
    p_pse = draw(st.sampled_from([0.0, 0.0, 0.001]))
    flags = rng.integers(0, 2**63, size=(n, 512), dtype=np.uint64) & np.uint64(FLAGS)
    flags &= ~np.uint64(pt.PTE_PSE)
    flags[rng.random((n, 512)) < p_pse] |= np.uint64(pt.PTE_PSE)
    present = rng.random((n, 512)) < 0.6
    flags[present] |= np.uint64(1)
    flags[~present] &= ~np.uint64(1)
    own = g.p2m[rng.integers(0, nr, size=(n, 512))].astype(np.uint64)
    own[own == np.uint64(0xFFFFFFFF)] = np.uint64(pt.INVALID_MFN)
    frames = np.where(own == np.uint64(pt.INVALID_MFN), np.uint64(max_mfn + 7), own)
    stray = rng.random((n, 512)) < p_bad
    frames[stray] = rng.integers(0, max_mfn + 50, size=int(stray.sum())).astype(np.uint64)
    if width == 4 and g.compat_m2p_mfn0 is not None and draw(st.booleans()):
        frames[:, pt.PAE_L2_XEN_FIRST] = np.uint64(g.compat_m2p_mfn0)
    tables = (frames << np.uint64(12)) | flags
    types = [lvl | (draw(st.sampled_from([0, C.PFINFO_LPINTAB]))) for lvl in levels]
    return g, tables, types, draw(st.booleans())


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(batches())
def test_matches_reference(b: tuple[PseudoPhysMap, npt.NDArray[np.uint64], list[int], bool]
                           ) -> None:
    g, tables, types, live = b
    try:
        ref_tables, ref_retry = pt.normalise_reference(tables.tolist(), types, g, live)
    except PagetableError:
        ref_tables = None
    if ref_tables is None:
        try:
            pt.normalise(tables, types, g, live)
        except PagetableError:
            return
        raise AssertionError("reference rejected the batch, normalise accepted it")
    got = pt.normalise(tables, types, g, live)
    assert got.retry.tolist() == ref_retry
    for i, retry in enumerate(ref_retry):
        if not retry:
            assert got.tables[i].tolist() == ref_tables[i], f"table {i}"


@PROPS
@given(batches())
def test_non_present_entries_kept_unless_in_xen_slots(
        b: tuple[PseudoPhysMap, npt.NDArray[np.uint64], list[int], bool]) -> None:
    g, tables, types, live = b
    try:
        got = pt.normalise(tables, types, g, live)
    except PagetableError:
        return
    keep = ~got.retry
    cleared = got.tables[keep] == 0
    absent = (tables[keep] & np.uint64(1)) == 0
    assert np.all((got.tables[keep] == tables[keep]) | ~absent | cleared)
