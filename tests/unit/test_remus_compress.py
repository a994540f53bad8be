"""lz4-over-XOR page compression: round trips, cache agreement, corruption is named."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xen_remus.channel import wire
from xen_remus.channel.compress import Compressor, Decompressor
from xen_remus.channel.errors import CompressionError
from xen_remus.channel.pagecache import PageCache
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import PageData


def body_of(buffers: list[Buffer]) -> bytes:
    rec = b"".join(bytes(b) for b in buffers)
    rtype, length = struct.unpack_from("<II", rec)
    assert rtype == wire.REC_REMUS_PAGE_DATA_LZ4XOR
    assert len(rec) == C.REC_HDR_SIZE + C.pad8(length)
    return rec[8:8 + length]


def standard(buffers: list[Buffer]) -> PageData:
    rec = b"".join(bytes(b) for b in buffers)
    rtype, length = struct.unpack_from("<II", rec)
    assert rtype == C.REC_TYPE_PAGE_DATA
    return PageData.unpack(rec[8:8 + length])


def same_cache(a: PageCache, b: PageCache) -> None:
    assert a._hand == b._hand and a.used == b.used
    assert np.array_equal(a._owner, b._owner)
    n = max(len(a._slot_of), len(b._slot_of))
    sa = np.full(n, -1, np.int32)
    sb = sa.copy()
    sa[:len(a._slot_of)] = a._slot_of
    sb[:len(b._slot_of)] = b._slot_of
    assert np.array_equal(sa, sb)
    used = a._owner >= 0
    assert np.array_equal(a.data[used], b.data[used])


# A batch: pfns (duplicates allowed), a type each, and page contents built from a few
# kinds: zero pages, random pages, and edits of what the pfn held before.
batch_st = st.lists(
    st.tuples(st.integers(0, 40), st.sampled_from([0, 0, 0, C.PFINFO_L1TAB, C.PFINFO_XTAB]),
              st.sampled_from(["zero", "random", "edit", "same"]), st.integers(0, 2**32)),
    min_size=1, max_size=24)


def build(batch: list[tuple[int, int, str, int]], memory: dict[int, bytes]
          ) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    pfns, types, pages = [], [], []
    for pfn, ty, kind, seed in batch:
        pfns.append(pfn)
        types.append(ty)
        if ty == C.PFINFO_XTAB:
            continue
        rng = np.random.default_rng(seed)
        old = memory.get(pfn, bytes(C.PAGE_SIZE))
        if kind == "zero":
            page = bytes(C.PAGE_SIZE)
        elif kind == "random":
            page = rng.bytes(C.PAGE_SIZE)
        elif kind == "edit":
            a = bytearray(old)
            for i in rng.integers(0, C.PAGE_SIZE, 3):
                a[int(i)] ^= int(rng.integers(1, 256))
            page = bytes(a)
        else:
            page = old
        memory[pfn] = page
        pages.append(page)
    return np.array(pfns, np.uint64), np.array(types, np.uint8), pages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(epochs=st.lists(st.lists(batch_st, min_size=1, max_size=3), min_size=1, max_size=5),
       slots=st.integers(1, 48), plain_every=st.integers(0, 3))
def test_round_trip_and_caches_agree(epochs: list[list[list[tuple[int, int, str, int]]]],
                                     slots: int, plain_every: int) -> None:
    """Any sequence of batches over several epochs comes back exactly, with caches small
    enough to evict, and standard PAGE_DATA mixed in: both caches stay identical."""
    enc, dec = Compressor(PageCache(slots)), Decompressor(PageCache(slots))
    memory: dict[int, bytes] = {}
    n = 0
    for epoch, batches in enumerate(epochs):
        for batch in batches:
            pfns, types, pages = build(batch, memory)
            n += 1
            if plain_every and n % plain_every == 0:
                # A standard PAGE_DATA: both ends remember it the same way.
                enc.observe(pfns, types, pages)
                dec.observe(PageData.make(pfns, types, pages))
                same_cache(enc.cache, dec.cache)
                continue
            e = enc.encode(pfns, types, pages)
            assert e.raw_bytes == 16 + 8 * len(pfns) + C.PAGE_SIZE * len(pages)
            out = standard(dec.decode(body_of(e.buffers), epoch, 1000 + n))
            assert np.array_equal(out.pfns, pfns) and np.array_equal(out.types, types)
            assert bytes(out.page_bytes()) == b"".join(pages)
            same_cache(enc.cache, dec.cache)


def test_delta_shrinks_a_few_changed_words() -> None:
    rng = np.random.default_rng(5)
    mem = rng.integers(0, 256, (256, C.PAGE_SIZE), np.uint8)
    pfns, types = np.arange(256, dtype=np.uint64), np.zeros(256, np.uint8)
    enc, dec = Compressor(PageCache(256)), Decompressor(PageCache(256))
    first = enc.encode(pfns, types, mem.tobytes())
    dec.decode(body_of(first.buffers), 0, 0)
    assert first.wire_bytes > first.raw_bytes  # random pages: stored raw, a little header
    mem[:, ::1024] ^= 0x5A  # four bytes per page change
    second = enc.encode(pfns, types, mem.tobytes())
    assert second.raw_bytes / second.wire_bytes > 20
    out = standard(dec.decode(body_of(second.buffers), 1, 0))
    assert bytes(out.page_bytes()) == mem.tobytes()
    mem[:] = 0  # pages cleared: XORed against zeros, not against their old contents
    third = enc.encode(pfns, types, mem)
    assert third.raw_bytes / third.wire_bytes > 50
    assert body_of(third.buffers)[24 + 8 * 256:24 + 9 * 256] == b"\2" * 256
    out = standard(dec.decode(body_of(third.buffers), 2, 0))
    assert bytes(out.page_bytes()) == bytes(256 * C.PAGE_SIZE)
    same_cache(enc.cache, dec.cache)


def test_cache_is_bounded_and_evicts_fifo() -> None:
    c = PageCache(4)
    pages = np.arange(6, dtype=np.uint8).repeat(C.PAGE_SIZE).reshape(6, C.PAGE_SIZE)
    c.store(np.arange(6, dtype=np.uint64), pages)  # 6 new pages, 4 slots: last 4 kept
    assert list(c.lookup(np.arange(6, dtype=np.uint64)) >= 0) == [0, 0, 1, 1, 1, 1]
    c.store(np.array([9], np.uint64), pages[:1])  # evicts the oldest (pfn 2)
    assert list(c.lookup(np.array([2, 3, 9], np.uint64)) >= 0) == [0, 1, 1]
    assert c.used == 4 and c.data.nbytes == 4 * C.PAGE_SIZE
    c.store(np.array([1 << 40], np.uint64), pages[:1])  # beyond the pfn index: not cached
    assert c.lookup(np.array([1 << 40], np.uint64))[0] == -1 and len(c._slot_of) < 1 << 27


def _record(seed: int) -> tuple[Decompressor, bytes, np.ndarray]:
    """A decoder whose cache holds epoch 0, and the compressed record of epoch 1."""
    rng = np.random.default_rng(seed)
    n = 8
    pfns = np.array(sorted(rng.choice(64, n, replace=False)), np.uint64)
    types = np.zeros(n, np.uint8)
    types[3] = C.PFINFO_XTAB
    mem = rng.integers(0, 256, (n - 1, C.PAGE_SIZE), np.uint8)
    mem[1] = 0
    enc, dec = Compressor(PageCache(64)), Decompressor(PageCache(64))
    dec.decode(body_of(enc.encode(pfns, types, mem.tobytes()).buffers), 0, 0)
    mem[0, :16] ^= 0xFF
    mem[2, 100] ^= 1
    return dec, body_of(enc.encode(pfns, types, mem.tobytes()).buffers), pfns


def check_flip(dec: Decompressor, body: bytes, pfns: np.ndarray, good: bytes, pos: int,
               bit: int) -> bool:
    """A flipped bit is either caught, naming epoch, offset and (for a page's own bytes)
    the pfn, leaving the cache untouched; or it did not change the result (an lz4 match
    re-pointed at identical bytes). Returns whether it was caught."""
    nd = len(pfns) - 1  # data pages (one XTAB)
    bad = bytearray(body)
    bad[pos] ^= 1 << bit
    before = dec.cache.data.copy(), dec.cache._slot_of.copy()
    try:
        out = dec.decode(bytes(bad), 7, 4242)
    except CompressionError as exc:
        msg = str(exc)
        assert "epoch 7" in msg and "offset 4242" in msg
        pad = range(24 + 8 * len(pfns) + nd, 24 + 8 * len(pfns) + C.pad8(nd))
        if pos >= 24 + 8 * len(pfns) and pos not in pad:
            assert exc.pfn is not None and exc.pfn in {int(p) for p in pfns}
            assert f"pfn 0x{exc.pfn:x}" in msg
        assert np.array_equal(dec.cache.data, before[0])
        assert np.array_equal(dec.cache._slot_of, before[1])
        return True
    blob_at = 24 + 8 * len(pfns) + C.pad8(nd) + 8 * nd
    assert pos >= blob_at, "only a flip inside the lz4 block can be harmless"
    assert b"".join(bytes(b) for b in out) == good
    return False


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(4, 10**6), pos=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_bit_flip_is_a_named_error_or_harmless(seed: int, pos: int, bit: int) -> None:
    dec, body, pfns = _record(seed)
    good = b"".join(bytes(b) for b in _record(seed)[0].decode(body, 7, 4242))
    check_flip(dec, body, pfns, good, pos % len(body), bit)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_bit_flip_exhaustively(seed: int) -> None:
    """Every bit of a record, flipped alone; and not vacuous: nearly all are caught."""
    dec, body, pfns = _record(seed)
    good = b"".join(bytes(b) for b in _record(seed)[0].decode(body, 7, 4242))
    caught = sum(check_flip(dec, body, pfns, good, pos, bit)
                 for pos in range(len(body)) for bit in range(8))
    assert caught / (8 * len(body)) > 0.9


def test_cache_out_of_step_names_the_pfn() -> None:
    pfns, types = np.array([5, 6], np.uint64), np.zeros(2, np.uint8)
    enc = Compressor(PageCache(8))
    enc.encode(pfns, types, bytes(2 * C.PAGE_SIZE))
    body = body_of(enc.encode(pfns, types, b"\1" * (2 * C.PAGE_SIZE)).buffers)
    with pytest.raises(CompressionError, match=r"epoch 3, pfn 0x5\).*out of step"):
        Decompressor(PageCache(8)).decode(body, 3, 0)  # a receiver that missed epoch 0


def test_truncated_body() -> None:
    dec, body, _ = _record(1)
    for cut in (0, 10, 23, 40, len(body) - 1):
        with pytest.raises(CompressionError, match="epoch 2"):
            dec.decode(body[:cut], 2, 0)
