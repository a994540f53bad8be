"""Checkpoint compression: PAGE_DATA as lz4 over an XOR delta against the last-sent page.

A page dirtied in an epoch usually differs from what was last sent in a few words; XOR
against that copy leaves mostly zeros, which lz4 squeezes at memory speed. Zero pages and
never-sent pages are XORed against nothing and lz4 takes them as they are.

REMUS_PAGE_DATA_LZ4XOR body (little-endian, like PAGE_DATA):
  u32 count          pfns, as PAGE_DATA's count
  u32 flags          bit 0: ``blob`` is an lz4 block (else the raw delta); others 0
  u32 raw_len        PAGE_SIZE x pages carrying data (the delta's length)
  u32 blob_len
  u64 pfn_check      weighted sum of the pfn words (as ``check`` below)
  u64 pfn[count]     PAGE_DATA's pfn words, type in bits 63-60, unchanged
  u8  base[n]        per data page, what the delta is against: 1 = the cached page;
                     0 = zeros, the sender has no cached copy; 2 = zeros although it
                     has one (the page became zero: XOR with the old copy would not
                     compress). The receiver's cache must agree on having a copy.
  (zero padding to 8 octets)
  u64 check[n]       per data page: weighted sum of the page's u64 words (odd weights,
                     mod 2**64) of the page as it must end up: any single changed word,
                     a wrong base or a bad lz4 block shows, with the pfn
  u8  blob[blob_len]
The receiver rebuilds the standard PAGE_DATA record from it, so its sink sees a standard
stream. Both ends put every data page of every PAGE_DATA they exchange after the accept
(plain or compressed) into their PageCache, in stream order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import lz4.block
import numpy as np
import numpy.typing as npt

from xen_remus.channel import wire
from xen_remus.channel.errors import CompressionError
from xen_remus.channel.pagecache import I64, U8, PageCache
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import PageData, carries_data, valid_types

_HEAD = struct.Struct("<IIIIQ")
# Page contents: one contiguous buffer or array, or one buffer per page.
PagesIn = Buffer | Sequence[Buffer] | U8
_PAGE_HDR = struct.Struct("<II")
FLAG_LZ4 = 1
BASE_NONE, BASE_CACHED, BASE_ZERO_CACHED = 0, 1, 2
_WORDS = C.PAGE_SIZE // 8
# Odd weights (invertible mod 2**64): a change in any one word always changes the sum.
_W = (np.arange(_WORDS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
      + np.uint64(0x632BE59BD9B4E019)) | np.uint64(1)


_W_BATCH = np.resize(_W, C.MAX_BATCH_SIZE)  # the weights of words_check for a whole batch of pfns


def _page_words(pages: U8) -> npt.NDArray[np.uint64]:
    """(k x PAGE_SIZE) bytes as (k x 512) little-endian u64 words (a view)."""
    return pages.reshape(len(pages), C.PAGE_SIZE).view("<u8")


def checksums(pages: U8) -> npt.NDArray[np.uint64]:
    """One u64 per page (k x PAGE_SIZE bytes)."""
    # einsum sums the products as it goes (mod 2**64, as the spec of the sum says):
    # no k x 512 temporary, unlike (words * _W).sum(axis=1).
    return np.asarray(np.einsum("ij,j->i", _page_words(pages), _W), np.uint64)


def nonzero_pages(pages: U8) -> npt.NDArray[np.bool_]:
    """Per page: any byte not zero (over u64 words: an eighth of the elements)."""
    return np.asarray(_page_words(pages).max(axis=1, initial=0) != 0, np.bool_)


def words_check(words: npt.NDArray[np.uint64]) -> int:
    """The same kind of sum over a record's pfn words (weights repeat every 512)."""
    w = _W_BATCH[:len(words)] if len(words) <= len(_W_BATCH) else np.resize(_W, len(words))
    return int(np.dot(words.astype(np.uint64, copy=False), w))


def as_pages(pages: PagesIn, n: int) -> U8:
    """``n`` pages as one (n x PAGE_SIZE) uint8 array: a view of a contiguous buffer, or one
    copy of a list of page buffers."""
    if isinstance(pages, np.ndarray):
        flat = pages.reshape(-1).view(np.uint8)
    elif isinstance(pages, Buffer):
        flat = np.frombuffer(pages, np.uint8)
    else:
        flat = np.frombuffer(b"".join(pages), np.uint8)
    if len(flat) != n * C.PAGE_SIZE:
        raise ValueError(f"{len(flat)} bytes of page data for {n} pages")
    return flat.reshape(n, C.PAGE_SIZE)


def _bases(cache: PageCache, slots: I64, use: npt.NDArray[np.bool_]) -> U8:
    """A new array of the pages each delta is against: cached copies where ``use``, else
    zeros (one gather, no scatter: faster than XORing a subset in place)."""
    if use.all():
        return cache.data[slots]
    out = cache.data[np.where(use, slots, 0)]
    out[~use] = 0
    return out


def _undo_delta(new: U8, cache: PageCache, slots: I64, use: npt.NDArray[np.bool_]) -> None:
    """XOR the cached bases into ``new`` where ``use``, a batch of pages at a time: the
    gathered bases then take at most a batch of memory, not a second copy of the record."""
    for i in range(0, len(new), C.MAX_BATCH_SIZE):
        idx = np.flatnonzero(use[i:i + C.MAX_BATCH_SIZE]) + i
        if len(idx) == len(use[i:i + C.MAX_BATCH_SIZE]):
            sl = slice(i, i + len(idx))
            np.bitwise_xor(new[sl], cache.data[slots[sl]], out=new[sl])
        elif len(idx):
            new[idx] ^= cache.data[slots[idx]]


@dataclass
class Encoded:
    """One compressed record: buffers for writev and the byte counts for the stats."""

    buffers: list[Buffer]
    raw_bytes: int  # the standard PAGE_DATA record it replaces
    wire_bytes: int


class Compressor:
    """The sender's side: PAGE_DATA contents in, REMUS_PAGE_DATA_LZ4XOR records out."""

    def __init__(self, cache: PageCache, accel: int = 1) -> None:
        self.cache = cache
        self.accel = accel

    def observe(self, pfns: npt.NDArray[np.uint64], types: npt.NDArray[np.uint8],
                pages: PagesIn) -> None:
        """A standard PAGE_DATA was sent: remember its pages as the receiver will."""
        has = carries_data(types)
        self.cache.store(pfns[has], as_pages(pages, int(has.sum())))

    def encode(self, pfns: npt.NDArray[np.uint64], types: npt.NDArray[np.uint8],
               pages: PagesIn) -> Encoded:
        if len(pfns) == 0 or len(pfns) != len(types):
            raise ValueError("PAGE_DATA needs pfns, one type each")
        has = carries_data(types)
        dp = pfns[has]
        new = as_pages(pages, len(dp))
        slots = self.cache.lookup(dp)
        hit = slots >= 0
        base = hit.astype(np.uint8)
        base[hit & ~nonzero_pages(new)] = BASE_ZERO_CACHED
        delta = _bases(self.cache, slots, base == BASE_CACHED)
        np.bitwise_xor(new, delta, out=delta)
        check = checksums(new)
        raw = delta.reshape(-1).data
        blob: Buffer = lz4.block.compress(raw, mode="fast", acceleration=self.accel,
                                          store_size=False) if len(raw) else b""
        flags = FLAG_LZ4
        if len(blob) >= len(raw):
            blob, flags = raw, 0
        self.cache.store(dp, new, slots)
        words = (pfns.astype("<u8") | (types.astype("<u8") << np.uint64(C.PFN_TYPE_SHIFT)))
        nb = len(base)
        parts: list[Buffer] = [_HEAD.pack(len(pfns), flags, len(raw), len(blob),
                                          words_check(words)),
                               words.tobytes(), base.tobytes(), bytes(C.pad8(nb) - nb),
                               check.astype("<u8").tobytes(), blob]
        out = wire.frame(wire.REC_REMUS_PAGE_DATA_LZ4XOR, parts)
        plain = C.REC_HDR_SIZE + 8 + 8 * len(pfns) + len(raw)
        return Encoded(out, plain, sum(len(b) for b in out))


class Decompressor:
    """The receiver's side: REMUS_PAGE_DATA_LZ4XOR bodies in, standard PAGE_DATA out."""

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache

    def observe(self, page_data: PageData) -> None:
        """A standard PAGE_DATA arrived: remember its pages as the sender did."""
        has = carries_data(page_data.types)
        self.cache.store(page_data.pfns[has],
                         as_pages(page_data.page_bytes(), int(has.sum())))

    def decode(self, body: Buffer, epoch: int, offset: int,
               room: int | None = None) -> list[Buffer]:
        """The standard PAGE_DATA record (buffers) that ``body`` stands for; ``offset``
        (of the record in the stream) and ``epoch`` only name the place in errors.
        ``room``: the bytes the caller can still hold; a record that would expand to
        more is refused before anything is expanded."""

        def fail(msg: str, pfn: int | None = None) -> CompressionError:
            return CompressionError(msg, epoch, pfn, offset)

        n = len(body)
        if n < _HEAD.size:
            raise fail(f"body of {n} bytes is shorter than its header")
        count, flags, raw_len, blob_len, wcheck = _HEAD.unpack_from(body)
        if count == 0 or flags & ~FLAG_LZ4:
            raise fail(f"count {count} / flags 0x{flags:x} invalid")
        at = _HEAD.size
        if at + 8 * count > n:
            raise fail(f"{count} pfns do not fit in {n} bytes")
        words = np.frombuffer(body, "<u8", count, at)
        at += 8 * count
        if words_check(words) != wcheck:
            raise fail("pfn words do not match their checksum")
        types = (words >> np.uint64(C.PFN_TYPE_SHIFT)).astype(np.uint8)
        pfns = words & np.uint64(C.PFN_MASK)
        first = int(pfns[0])
        # The rules of PAGE_DATA itself (the sink would reject the rebuilt record).
        bad = np.flatnonzero((words & np.uint64(C.PFN_RESERVED_MASK) != 0) | ~valid_types(types))
        if len(bad):
            raise fail("pfn word with reserved bits 59-52 set or an invalid page type",
                       int(pfns[int(bad[0])]))
        has = carries_data(types)
        dp = pfns[has]
        nd = len(dp)
        if raw_len != nd * C.PAGE_SIZE:
            raise fail(f"raw_len {raw_len}, expected {nd * C.PAGE_SIZE} for {nd} data pages",
                       first)
        need = at + C.pad8(nd) + 8 * nd + blob_len
        if need != n:
            raise fail(f"length {n}, expected {need}", first)
        # What it expands to, before expanding it: a few MiB of lz4 can claim 4 GiB.
        plain = 8 + 8 * count + raw_len
        if plain > C.REC_LENGTH_MAX:
            raise fail(f"would expand to a PAGE_DATA of {plain} bytes, over REC_LENGTH_MAX "
                       f"({C.REC_LENGTH_MAX})", first)
        if room is not None and plain > room:
            raise fail(f"would expand to {plain} bytes, but only {room} are left under the "
                       "ceiling (--max-epoch-mib)", first)
        base8 = np.frombuffer(body, np.uint8, C.pad8(nd), at)
        if base8[:nd].max(initial=0) > BASE_ZERO_CACHED or base8[nd:].any():
            i = int(np.flatnonzero(base8 > BASE_ZERO_CACHED)[0]) \
                if base8[:nd].max(initial=0) > BASE_ZERO_CACHED else nd
            raise fail("base flag not 0, 1 or 2, or padding not zero",
                       int(dp[i]) if i < nd else None)
        base = base8[:nd]
        at += C.pad8(nd)
        check = np.frombuffer(body, "<u8", nd, at)
        at += 8 * nd
        blob = memoryview(body)[at:at + blob_len]
        if flags & FLAG_LZ4:
            try:
                raw = lz4.block.decompress(blob, uncompressed_size=raw_len,
                                           return_bytearray=True)
            except (lz4.block.LZ4BlockError, ValueError, OverflowError, MemoryError) as exc:
                raise fail(f"lz4 block of pfns 0x{first:x}.. does not decompress ({exc})",
                           first) from None
            if len(raw) != raw_len:
                raise fail(f"lz4 block expands to {len(raw)} bytes, expected {raw_len}",
                           first)
        else:
            if blob_len != raw_len:
                raise fail(f"raw delta of {blob_len} bytes, expected {raw_len}", first)
            raw = bytearray(blob)
        new = np.frombuffer(raw, np.uint8).reshape(nd, C.PAGE_SIZE)
        slots = self.cache.lookup(dp)
        hit = slots >= 0
        bad = np.flatnonzero(hit != (base != BASE_NONE))
        if len(bad):
            i = int(bad[0])
            theirs, ours = ("had", "does not have") if base[i] else ("had no", "has")
            raise fail(f"page cache out of step: the sender {theirs} a cached copy, ours "
                       f"{ours} one", int(dp[i]))
        _undo_delta(new, self.cache, slots, base == BASE_CACHED)
        bad = np.flatnonzero(checksums(new) != check)
        if len(bad):
            raise fail("page contents do not match their checksum (corrupt record or "
                       "page cache)", int(dp[int(bad[0])]))
        self.cache.store(dp, new, slots)
        return wire.frame(C.REC_TYPE_PAGE_DATA, [_PAGE_HDR.pack(count, 0), words.tobytes(), raw])
