"""The last-sent contents of guest pages, bounded, identical at both ends.

Sender and receiver each keep one and apply the same operations in the same order, so
their contents and evictions agree without any message about them; the compressed record
still says, per page, whether the sender used a cached base, so a disagreement is caught
(and named) instead of silently corrupting the guest.

Eviction is FIFO over a ring of slots: a pfn that misses takes the next slot, evicting
its previous owner; a pfn that hits is rewritten in place. Deterministic, vectorised per
batch, and right for Remus, whose hot pages are re-sent every epoch and stay cached.
Memory: ``slots`` pages (np.zeros: the kernel backs only the slots ever written) plus a
4-byte index per pfn up to the highest pfn seen (pfns from PFN_INDEX_MAX on are never
cached: a 256 GiB guest fits below it; the index is then at most 256 MiB).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C

PFN_INDEX_MAX = 1 << 26
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


class PageCache:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("the page cache needs at least one slot")
        self.slots = slots
        self.data: U8 = np.zeros((slots, C.PAGE_SIZE), np.uint8)
        self._owner: I64 = np.full(slots, -1, np.int64)
        self._slot_of = np.full(0, -1, np.int32)
        self._hand = 0
        self.used = 0

    @classmethod
    def of_mib(cls, mib: int) -> PageCache:
        return cls(mib << 20 >> C.PAGE_SHIFT)

    @property
    def nbytes(self) -> int:
        """Memory the cache may use at most (page slots + pfn index)."""
        return self.data.nbytes + self._owner.nbytes + self._slot_of.nbytes

    def lookup(self, pfns: npt.NDArray[np.uint64]) -> I64:
        """Slot of each pfn, -1 where not cached."""
        p = pfns.astype(np.int64)
        out = np.full(len(p), -1, np.int64)
        ok = p < len(self._slot_of)
        out[ok] = self._slot_of[p[ok]]
        return out

    def store(self, pfns: npt.NDArray[np.uint64], pages: U8, slots: I64 | None = None) -> None:
        """Remember ``pages`` (k x PAGE_SIZE) as the contents of ``pfns``; ``slots`` is this
        batch's ``lookup`` when the caller already has it (nothing stored in between)."""
        p = pfns.astype(np.int64)
        # Ascending pfns (what the save engine sends) cannot repeat: skip the sort.
        if len(p) > 1 and not (p[1:] > p[:-1]).all() and len(np.unique(p)) != len(p):
            # Keep only the last occurrence of a pfn: the content the peer ends up with.
            _, first_rev = np.unique(p[::-1], return_index=True)
            keep = np.sort(len(p) - 1 - first_rev)
            p, pages, slots = p[keep], pages[keep], None
        if slots is None:
            slots = self.lookup(p.astype(np.uint64))
        hit = slots >= 0
        if hit.all():  # the usual epoch: every page rewritten in place, no masked copies
            self.data[slots] = pages
            return
        self.data[slots[hit]] = pages[hit]
        miss = np.flatnonzero(~hit & (p < PFN_INDEX_MAX))
        if len(miss) > self.slots:  # more new pages than slots: the last ones win
            miss = miss[-self.slots:]
        if not len(miss):
            return
        mp = p[miss]
        new = (self._hand + np.arange(len(miss))) % self.slots
        self._hand = int((self._hand + len(miss)) % self.slots)
        old = self._owner[new]
        gone = old[old >= 0]
        self._slot_of[gone] = -1
        self.used += len(miss) - len(gone)
        top = int(mp.max()) + 1
        if top > len(self._slot_of):
            grown = np.full(min(max(top, 2 * len(self._slot_of)), PFN_INDEX_MAX), -1, np.int32)
            grown[:len(self._slot_of)] = self._slot_of
            self._slot_of = grown
        self._slot_of[mp] = new
        self._owner[new] = mp
        # All new (a first copy): no gathered copy of the batch, which can be 128 MiB.
        self.data[new] = pages if len(miss) == len(pages) else pages[miss]
