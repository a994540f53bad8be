"""Benchmark section: the stream codec on a 256 MiB PAGE_DATA stream.

encode: build the writev buffers of every PAGE_DATA record (1024 pages each, as Xen
batches) and gather them into one output buffer, as writev copies into the kernel.
decode: feed the stream in 1 MiB chunks (as read from a socket), so every 4 MiB record is
reassembled once; every record is validated and its pfns parsed into numpy arrays.
decode_zero_copy: the stream fed as one buffer (e.g. mmap): records are views.
Baseline for each: a plain copy of the same bytes in the same chunking, same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from xen_remus.stream import Decoder, Record
from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E

STREAM_MIB = 256
BATCH = 1024  # pages per PAGE_DATA record (Xen's MAX_BATCH_SIZE)
CHUNK = 1 << 20
TARGETS = {"encode_vs_copy": (">=", 0.5), "decode_vs_copy": (">=", 0.5)}


def _best(fn: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run() -> dict[str, float]:
    npages = STREAM_MIB << 20 >> C.PAGE_SHIFT
    mem = memoryview(np.random.default_rng(1).bytes(npages * C.PAGE_SIZE))
    pages = [mem[i * C.PAGE_SIZE:(i + 1) * C.PAGE_SIZE] for i in range(npages)]
    pfns = np.arange(npages, dtype=np.uint64)
    size = sum(len(b) for rec in E.page_data_batches(pfns, pages, BATCH) for b in rec)
    out = bytearray(size)
    outv = memoryview(out)

    def encode() -> None:
        pos = 0
        for rec in E.page_data_batches(pfns, pages, BATCH):
            for b in rec:
                n = len(b)
                outv[pos:pos + n] = b
                pos += n
        assert pos == size

    def copy_pages() -> None:
        step = BATCH * C.PAGE_SIZE
        for i in range(0, len(mem), step):
            outv[i:i + step] = mem[i:i + step]

    t_copy = _best(copy_pages)
    t_enc = _best(encode)  # last, so that ``out`` holds the encoded records
    stream = b"".join(E.libxc_headers())
    stream += b"".join(bytes(b) for b in E.empty(C.REC_TYPE_STATIC_DATA_END))
    stream += bytes(out) + b"".join(bytes(b) for b in E.end_of_stream(False))
    sv = memoryview(stream)
    sink = bytearray(CHUNK * 8)

    def decode(chunk: int) -> None:
        dec = Decoder("libxc")
        pages_seen = 0
        for i in range(0, len(sv), chunk):
            for ev in dec.feed(sv[i:i + chunk]):
                if isinstance(ev, Record) and ev.rtype == C.REC_TYPE_PAGE_DATA:
                    pages_seen += ev.parse().count
        dec.feed(b"")
        assert dec.done and pages_seen == npages

    def copy_chunks() -> None:
        # The baseline reassembly: every byte copied once out of its chunk.
        buf = memoryview(sink)
        for i in range(0, len(sv), CHUNK):
            piece = sv[i:i + CHUNK]
            buf[:len(piece)] = piece

    t_dec = _best(lambda: decode(CHUNK))
    t_dec_whole = _best(lambda: decode(len(sv)))
    t_copy_chunks = _best(copy_chunks)
    gb = len(stream) / 1e9
    return {
        "encode_GBps": size / 1e9 / t_enc,
        "copy_GBps": size / 1e9 / t_copy,
        "encode_vs_copy": t_copy / t_enc,
        "decode_GBps": gb / t_dec,
        "chunk_copy_GBps": gb / t_copy_chunks,
        "decode_vs_copy": t_copy_chunks / t_dec,
        "decode_zero_copy_GBps": gb / t_dec_whole,
    }
