"""Pages of a save: dirty bitmaps to pfn lists, batches, page types, deferred pages.

Page types are the spec's XEN_DOMCTL_PFINFO_* values (0..15, as in the top nibble of a
PAGE_DATA pfn entry), not the domctl's in-place ``type << 28`` form.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
MAX_BATCH_SIZE = 1024  # pages per PAGE_DATA record, as libxc (4 MiB of data)

# XEN_DOMCTL_PFINFO_* (libxc-migration-stream.pandoc, PAGE_DATA)
NOTAB = 0x0
L1TAB, L2TAB, L3TAB, L4TAB = 0x1, 0x2, 0x3, 0x4
L1TAB_PIN, L2TAB_PIN, L3TAB_PIN, L4TAB_PIN = 0x9, 0xA, 0xB, 0xC
BROKEN, XALLOC, XTAB = 0xD, 0xE, 0xF
LTAB_MASK = 0x7  # type & LTAB_MASK: 1..4 = pagetable level, pin bit (0x8) ignored

Pfns = npt.NDArray[np.uint64]
Types = npt.NDArray[np.uint8]


def valid_types(types: Types) -> npt.NDArray[np.bool_]:
    """The spec's invalid types are 5..8; anything else in 0..15 is known."""
    t = types.astype(np.uint8)
    return (t <= 0xF) & ~((t >= 5) & (t <= 8))


def carries_data(types: Types) -> npt.NDArray[np.bool_]:
    """PAGE_DATA has no data for BROKEN, XALLOC and XTAB pages."""
    return types < BROKEN


def pagetable_level(types: Types) -> npt.NDArray[np.uint8]:
    """1..4 for pagetable pages (pinned or not), 0 for every other type."""
    lvl = (types & LTAB_MASK).astype(np.uint8)
    lvl[(types >= BROKEN) | (types == NOTAB)] = 0
    return lvl


def pfns_of_bitmap(bitmap: npt.NDArray[np.uint8] | npt.NDArray[np.uint64], nr_pfns: int) -> Pfns:
    """Set bits of a Xen bitmap (little-endian bit order, as log-dirty returns) as pfns."""
    raw = np.ascontiguousarray(bitmap).view(np.uint8).reshape(-1)
    bits = np.unpackbits(raw, bitorder="little")[:nr_pfns]
    return np.flatnonzero(bits).astype(np.uint64)


def batches(pfns: Pfns, size: int = MAX_BATCH_SIZE) -> Iterator[Pfns]:
    """Consecutive slices of at most ``size`` pfns (views, no copy)."""
    if size < 1 or size > MAX_BATCH_SIZE:
        raise ValueError(f"batch size {size} outside 1..{MAX_BATCH_SIZE}")
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
