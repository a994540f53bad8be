"""P2M tree and linear walks over synthetic guest memory (a fake ForeignMemory)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from xen_remus.xen.errors import GuestStateError
from xen_remus.xen.memory import ForeignMemory
from xen_remus.xen.p2m import P2M, SharedInfoArch
from xen_remus.xen.vcpu import mfn_to_cr3

PRESENT_RW = 0x3


@dataclass
class FakeMapping:
    view: memoryview
    errors: npt.NDArray[np.int32]

    def close(self) -> None:
        self.view.release()


class FakeMemory:
    """Guest frames as a dict mfn -> page; absent frames map with errno 22."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.mapped: list[int] = []

    def page(self, mfn: int) -> bytearray:
        return self.pages.setdefault(mfn, bytearray(4096))

    def put(self, mfn: int, index: int, value: int, width: int = 8) -> None:
        struct.pack_into("<Q" if width == 8 else "<I", self.page(mfn), index * width, value)

    def map(self, domid: int, frames: npt.ArrayLike) -> FakeMapping:
        fr = [int(f) for f in np.asarray(frames, dtype=np.uint64)]
        self.mapped.extend(fr)
        data = b"".join(bytes(self.pages.get(f, bytes(4096))) for f in fr)
        errs = np.array([0 if f in self.pages else 22 for f in fr], dtype=np.int32)
        return FakeMapping(memoryview(data), errs)


def guest_p2m(n: int, width: int, seed: int = 0) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    return rng.choice(np.arange(10_000, 60_000), size=n, replace=False).astype(np.uint64)


def write_leaves(mem: FakeMemory, p2m: npt.NDArray[np.uint64], width: int,
                 first_leaf_mfn: int) -> list[int]:
    per = 4096 // width
    leaves: list[int] = []
    for i in range(0, len(p2m), per):
        mfn = first_leaf_mfn + len(leaves)
        leaves.append(mfn)
        for j, v in enumerate(p2m[i:i + per]):
            mem.put(mfn, j, int(v), width)
    return leaves


@pytest.mark.parametrize("width", [8, 4])
def test_tree(width: int) -> None:
    mem = FakeMemory()
    p2m = guest_p2m(3000, width)
    leaves = write_leaves(mem, p2m, width, 500)
    for i, leaf in enumerate(leaves):
        mem.put(200, i, leaf, width)  # one frame list holds them all
    mem.put(100, 0, 200, width)  # frame-list-list
    si = SharedInfoArch(3000, 100, 0, 0, 0, 0)
    got = P2M(cast(ForeignMemory, mem), 1, si, width)
    assert got.method == "tree"
    assert got.frames.tolist() == leaves
    assert got.table.astype(np.uint64).tolist() == p2m.tolist()
    got.close()


def build_linear(mem: FakeMemory, vaddr: int, leaves: list[int], pse_at: int | None = None
                 ) -> int:
    """4-level tables mapping ``leaves`` at ``vaddr``; returns the L4 mfn."""
    l4, next_mfn = 300, 301
    tables: dict[tuple[int, int], int] = {}  # (level, prefix) -> mfn
    for i, leaf in enumerate(leaves):
        va = vaddr + i * 4096
        parent = l4
        for level, shift in ((4, 39), (3, 30), (2, 21)):
            key = (level - 1, va >> shift)
            if key not in tables:
                tables[key] = next_mfn
                next_mfn += 1
            flags = PRESENT_RW | (0x80 if pse_at == level else 0)
            mem.put(parent, (va >> shift) & 511, (tables[key] << 12) | flags)
            parent = tables[key]
        mem.put(parent, (va >> 12) & 511, (leaf << 12) | PRESENT_RW)
    return l4


def test_linear_walk_across_table_boundaries() -> None:
    mem = FakeMemory()
    p2m = guest_p2m(3000, 8, seed=1)
    leaves = write_leaves(mem, p2m, 8, 700)
    vaddr = 0xFFFFC90000000000 + 509 * 4096  # the 6 leaf pages straddle two L1 tables
    l4 = build_linear(mem, vaddr, leaves)
    si = SharedInfoArch(3000, 0, 0, mfn_to_cr3(l4, 8), vaddr, 4)
    got = P2M(cast(ForeignMemory, mem), 1, si, 8)
    assert got.method == "linear"
    assert got.frames.tolist() == leaves
    assert np.array_equal(got.table, p2m)


def test_linear_walk_rejects_holes_and_superpages() -> None:
    mem = FakeMemory()
    leaves = write_leaves(mem, guest_p2m(1024, 8), 8, 700)
    vaddr = 0xFFFFC90000000000
    l4 = build_linear(mem, vaddr, leaves[:1])  # the second leaf page is not mapped
    si = SharedInfoArch(1024, 0, 0, mfn_to_cr3(l4, 8), vaddr, 0)
    with pytest.raises(GuestStateError, match=r"va 0xffffc90000001000 not mapped at L1"):
        P2M(cast(ForeignMemory, mem), 1, si, 8)
    mem = FakeMemory()
    l4 = build_linear(mem, vaddr, write_leaves(mem, guest_p2m(512, 8), 8, 700), pse_at=2)
    with pytest.raises(GuestStateError, match="superpage at L2"):
        P2M(cast(ForeignMemory, mem), 1, SharedInfoArch(512, 0, 0, l4 << 12, vaddr, 0), 8)


def test_unmappable_p2m_page_is_reported() -> None:
    mem = FakeMemory()
    mem.put(100, 0, 200)
    mem.put(200, 0, 999)  # leaf frame that does not exist
    with pytest.raises(GuestStateError, match=r"1 p2m pages unmappable, first mfn 0x3e7"):
        P2M(cast(ForeignMemory, mem), 1, SharedInfoArch(10, 100, 0, 0, 0, 0), 8)


def test_linear_walk_of_a_pae_guest_has_three_levels() -> None:
    """32-bit PAE: cr3 (folded) -> 4-entry L3 -> L2 -> L1 -> p2m pages of 32-bit entries."""
    mem = FakeMemory()
    p2m = guest_p2m(2500, 4, seed=2)  # 3 p2m pages of 1024 entries
    leaves = write_leaves(mem, p2m, 4, 700)
    vaddr = 0xC0000000 + 511 * 4096  # straddles two L1 tables
    l3, l2, l1s = (1 << 20) + 1, 301, [302, 303]  # the L3 above 4 GiB: cr3 folds it
    mem.put(l3, vaddr >> 30, (l2 << 12) | 1)
    for i, leaf in enumerate(leaves):
        va = vaddr + i * 4096
        l1 = l1s[((va >> 21) & 511) - ((vaddr >> 21) & 511)]
        mem.put(l2, (va >> 21) & 511, (l1 << 12) | PRESENT_RW)
        mem.put(l1, (va >> 12) & 511, (leaf << 12) | PRESENT_RW)
    si = SharedInfoArch(2500, 0, 0, mfn_to_cr3(l3, 4), vaddr, 1)
    got = P2M(cast(ForeignMemory, mem), 1, si, 4)
    assert got.method == "linear" and got.frames.tolist() == leaves
    assert got.table.dtype == np.uint32 and got.table.tolist() == p2m.tolist()
