"""Pages of a save: batches, pagetable levels, deferred pages.

Page types are the spec's (`xen_remus.stream.consts` PFINFO_*, 0..15, as in the top nibble
of a PAGE_DATA pfn entry); the stream constants also say which types are valid and which
carry data.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C

Pfns = npt.NDArray[np.uint64]
Types = npt.NDArray[np.uint8]


def no_pfns() -> Pfns:
    """An empty pfn list."""
    return np.zeros(0, dtype=np.uint64)


def pagetable_level(types: Types) -> npt.NDArray[np.uint8]:
    """1..4 for pagetable pages (pinned or not), 0 for every other type."""
    lvl = (types & C.PFINFO_LTABTYPE_MASK).astype(np.uint8)
    lvl[(types >= C.PFINFO_BROKEN) | (types == C.PFINFO_NOTAB)] = 0
    return lvl


def batches(pfns: Pfns, size: int = C.MAX_BATCH_SIZE) -> Iterator[Pfns]:
    """Consecutive slices of at most ``size`` pfns (views, no copy)."""
    if size < 1 or size > C.MAX_BATCH_SIZE:
        raise ValueError(f"batch size {size} outside 1..{C.MAX_BATCH_SIZE}")
    for start in range(0, len(pfns), size):
        yield pfns[start:start + size]


class DeferredPages:
    """Pfns that could not be sent in a live round (ballooned, or a pagetable referring to a
    frame not yet in the guest's p2m); they are sent again after the final suspend."""

    def __init__(self, nr_pfns: int) -> None:
        self._bits = np.zeros(nr_pfns, dtype=np.bool_)

    def add(self, pfns: Pfns) -> None:
        self._bits[pfns.astype(np.intp)] = True

    def __len__(self) -> int:
        return int(np.count_nonzero(self._bits))

    def take(self) -> Pfns:
        """The deferred pfns, ascending; the set is empty afterwards."""
        out = np.flatnonzero(self._bits).astype(np.uint64)
        self._bits[:] = False
        return out


def merge(a: Pfns, b: Pfns) -> Pfns:
    """Sorted union of two pfn lists."""
    return np.union1d(a, b).astype(np.uint64)
