"""Pure helpers of the save engine: policy, bitmaps, batches, page types, deferred pages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_remus.save import pages as P
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.stream.libxc_bodies import carries_data, valid_types
from xen_remus.xen.hcbuf import bitmap_pfns


def test_policy_rounds_and_target() -> None:
    p = PrecopyPolicy(max_rounds=3, target_dirty=50)
    assert p.live
    assert p.keep_going(1, 51) and p.keep_going(2, 1000)
    assert not p.keep_going(3, 1000)  # round limit
    assert not p.keep_going(1, 50)  # few enough dirty
    assert not PrecopyPolicy(max_rounds=0).live
    with pytest.raises(ValueError):
        PrecopyPolicy(max_rounds=-1)


@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 4999), max_size=300), st.integers(1, 5000))
def test_bitmap_to_pfns_matches_set_bits(bits: set[int], nr: int) -> None:
    words = np.zeros(5000 // 64 + 1, dtype=np.uint64)
    for b in bits:
        words[b // 64] |= np.uint64(1 << (b % 64))
    got = bitmap_pfns(words, nr)
    assert got.dtype == np.uint64
    assert list(got) == sorted(b for b in bits if b < nr)


def test_batches_are_views_of_at_most_1024() -> None:
    pfns = np.arange(2049, dtype=np.uint64)
    bs = list(P.batches(pfns))
    assert [len(b) for b in bs] == [1024, 1024, 1]
    assert bs[1].base is pfns or bs[1].base is pfns.base
    with pytest.raises(ValueError):
        list(P.batches(pfns, 1025))


def test_page_types() -> None:
    t = np.arange(16, dtype=np.uint8)
    assert list(np.flatnonzero(~valid_types(t))) == [5, 6, 7, 8]
    assert list(np.flatnonzero(~carries_data(t))) == [0xD, 0xE, 0xF]
    assert list(P.pagetable_level(t)) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 0, 0, 0]


def test_deferred_pages_take_clears() -> None:
    d = P.DeferredPages(100)
    d.add(np.array([5, 3, 5], dtype=np.uint64))
    assert len(d) == 2
    assert list(d.take()) == [3, 5]
    assert len(d) == 0 and len(d.take()) == 0
