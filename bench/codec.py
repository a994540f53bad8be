"""Benchmark section: the stream codec on a 256 MiB PAGE_DATA stream.

encode: build the writev buffers of every PAGE_DATA record (1024 pages each, as Xen
batches) and gather them into one output buffer in C (BytesIO.writelines), as writev
copies into the kernel; encode_buffers_only: the buffers alone (pages are not copied).
decode: feed the stream in 1 MiB chunks (as read from a socket), so every 4 MiB record is
reassembled once; every record is validated and its pfns parsed into numpy arrays.
decode_zero_copy: the stream fed as one buffer (e.g. mmap): records are views.
Baseline for each: a plain copy of the same bytes in the same chunking, same run.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np

from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Event
from xen_remus.stream.records import Record

STREAM_MIB = 256
BATCH = C.MAX_BATCH_SIZE  # pages per PAGE_DATA record
CHUNK = 1 << 20
TARGETS = {"encode_vs_copy": (">=", 0.5), "decode_vs_copy": (">=", 0.5)}


def _best(*fns: Callable[[], object], runs: int = 5) -> list[float]:
    """Best time of each function, runs interleaved so that both sides of a ratio see
    the same machine load."""
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _pages(events: list[Event]) -> int:
    return sum(ev.parse().count for ev in events
               if isinstance(ev, Record) and ev.rtype == C.REC_TYPE_PAGE_DATA)


def run() -> dict[str, float]:
    npages = STREAM_MIB << 20 >> C.PAGE_SHIFT
    mem = memoryview(np.random.default_rng(1).bytes(npages * C.PAGE_SIZE))
    pages = [mem[i * C.PAGE_SIZE:(i + 1) * C.PAGE_SIZE] for i in range(npages)]
    pfns = np.arange(npages, dtype=np.uint64)
    size = sum(len(b) for rec in E.page_data_batches(pfns, pages, BATCH) for b in rec)
    out = io.BytesIO(bytes(size))

    def encode() -> None:
        out.seek(0)
        for rec in E.page_data_batches(pfns, pages, BATCH):
            out.writelines(rec)
        assert out.tell() == size

    def buffers_only() -> None:
        for _rec in E.page_data_batches(pfns, pages, BATCH):
            pass

    def copy_pages() -> None:
        out.seek(0)
        step = BATCH * C.PAGE_SIZE
        for i in range(0, len(mem), step):
            out.write(mem[i:i + step])

    t_copy, t_buf, t_enc = _best(copy_pages, buffers_only, encode)  # ``out``: encoded
    stream = b"".join(E.libxc_headers())
    stream += b"".join(bytes(b) for b in E.empty(C.REC_TYPE_STATIC_DATA_END))
    stream += out.getvalue() + b"".join(bytes(b) for b in E.end_of_stream(False))
    sv = memoryview(stream)
    record_size = 16 + 8 * BATCH + BATCH * C.PAGE_SIZE
    sink = bytearray(2 * record_size)  # the decoder's footprint: two record buffers

    def decode(chunk: int) -> None:
        dec = Decoder("libxc")
        pages_seen = 0
        for i in range(0, len(sv), chunk):
            # A consumer done with its events lets the decoder reuse its buffer.
            pages_seen += _pages(dec.feed(sv[i:i + chunk]))
        dec.feed(b"")
        assert dec.done and pages_seen == npages

    def copy_chunks() -> None:
        # The baseline reassembly: every byte copied once out of its chunk, into the same
        # amount of destination memory as the decoder uses.
        buf = memoryview(sink)
        at = 0
        for i in range(0, len(sv), CHUNK):
            piece = sv[i:i + CHUNK]
            if at + len(piece) > len(buf):
                at = 0
            buf[at:at + len(piece)] = piece
            at += len(piece)

    t_copy_chunks, t_dec, t_dec_whole = _best(copy_chunks, lambda: decode(CHUNK),
                                              lambda: decode(len(sv)))
    gb = len(stream) / 1e9
    return {
        "encode_GBps": size / 1e9 / t_enc,
        "copy_GBps": size / 1e9 / t_copy,
        "encode_vs_copy": t_copy / t_enc,
        "encode_buffers_only_GBps": size / 1e9 / t_buf,
        "decode_GBps": gb / t_dec,
        "chunk_copy_GBps": gb / t_copy_chunks,
        "decode_vs_copy": t_copy_chunks / t_dec,
        "decode_zero_copy_GBps": gb / t_dec_whole,
    }
