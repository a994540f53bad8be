"""The backup's receiver under hostile input: CPU and peak RSS per case, each in a child.

    python -m bench.receive_limits [CASE...] [--ceiling-mib N]

Each case builds a stream (the project's encoder, epoch 0 a small valid copy), then feeds
it to ContinuousRestore in 64 KiB chunks as the driver does, with the xen-remus channel
agreed (compression on, no MAC), and reports the CPU seconds of the feeding, the peak RSS
above what the child had before it (MiB), and how the receive ended. Run it against any
checkout with PYTHONPATH=CHECKOUT (its API must match this one).
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import lz4.block
import numpy as np

from xen_remus.channel import compress, wire
from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.restore_continuous import ContinuousRestore, FailOver

try:  # absent before the receiver refused bad epochs: run against older checkouts too
    from xen_remus.restore_continuous import Refused
except ImportError:
    Refused = FailOver  # type: ignore[misc,assignment]
from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E
from xen_remus.stream import libxc_bodies as XC
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream

CHUNK = 64 << 10


def _join(bufs: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def _prefix(chan: ReceiverChannel) -> tuple[bytes, bytes]:
    """Epoch 0 of a 2-epoch HVM stream with the sender's accept after its first page
    record, and the end of an epoch (CHECKPOINT ... CHECKPOINT_END) to close epoch 1."""
    snd = SenderChannel(Config(mac=False), 0)
    snd.feed_back(chan.offer_line(), 0)
    accept = _join(snd.pending(0))
    eps = [make_epoch([1, 2, 3]), make_epoch([1])]
    data = _join(synthetic_stream("xl", False, eps, end=False))
    # Epoch 0 ends at the first CHECKPOINT_END: cut there, insert the accept after its
    # first PAGE_DATA (our records live in the libxc layer, after the first page record).
    evs = Decoder().feed(data)
    first_page = next(e for e in evs if isinstance(e, Record) and e.name == "PAGE_DATA")
    at = first_page.offset + len(first_page.wire)
    end0 = next(e.offset for e in evs if isinstance(e, EpochEnd))
    ckpt = next(e for e in evs if isinstance(e, Record) and e.name == "CHECKPOINT"
                and e.offset > end0)
    tail = data[ckpt.offset:]
    tail = tail[:next(e.offset for e in evs if isinstance(e, EpochEnd) and e.offset > end0)
                - ckpt.offset]
    return data[:at] + accept + data[at:end0], tail


def _lz4_claim(pages: int, blob: bytes) -> bytes:
    """A REMUS_PAGE_DATA_LZ4XOR record of ``pages`` new pages (pfns 0..pages-1) whose
    checksums say all-zero pages and whose lz4 block is ``blob``."""
    words = np.arange(pages, dtype="<u8")
    zero = compress.checksums(np.zeros((1, C.PAGE_SIZE), np.uint8))[0]
    head = struct.pack("<IIIIQ", pages, compress.FLAG_LZ4, pages * C.PAGE_SIZE, len(blob),
                       compress.words_check(words))
    base = bytes(C.pad8(pages))
    check = np.full(pages, zero, "<u8").tobytes()
    return _join(wire.frame(wire.REC_REMUS_PAGE_DATA_LZ4XOR,
                            [head, words.tobytes(), base, check, blob]))


def case_hvm_params_128m() -> bytes:
    """Epoch 1: one HVM_PARAMS record of 128 MiB (8 Mi pairs), legal."""
    n = (C.REC_LENGTH_MAX - 8) // 16
    body = [struct.pack("<II", n, 0), np.zeros(2 * n, "<u8").tobytes()]
    return _join(E.record(C.REC_TYPE_HVM_PARAMS, body))


def case_lz4_over_2g() -> bytes:
    """A compressed record claiming 2 GiB + 4 KiB of pages (lz4's limit is 2 GiB - 1)."""
    return _lz4_claim((2 << 30 >> C.PAGE_SHIFT) + 1, b"\0" * 16)


def case_lz4_bomb_1g() -> bytes:
    """A valid compressed record: 1 GiB of zero pages in a ~4 MiB lz4 block."""
    pages = 1 << 30 >> C.PAGE_SHIFT
    blob = lz4.block.compress(bytes(pages * C.PAGE_SIZE), store_size=False)
    return _lz4_claim(pages, blob)


def case_lz4_bomb_120m() -> bytes:
    """A valid compressed record under REC_LENGTH_MAX: 120 MiB of zero pages in ~0.5 MiB."""
    pages = 120 << 20 >> C.PAGE_SHIFT
    blob = lz4.block.compress(bytes(pages * C.PAGE_SIZE), store_size=False)
    return _lz4_claim(pages, blob)


def case_tiny_records() -> bytes:
    """32 MiB of empty optional libxc records (4 Mi of them) in one epoch."""
    one = struct.pack("<II", C.REC_TYPE_OPTIONAL | 0x123, 0)
    return one * ((32 << 20) // len(one))


def case_pages_over_ceiling() -> bytes:
    """Plain PAGE_DATA records of 4 MiB each, 1 GiB in one epoch."""
    pages = [bytes([7]) * C.PAGE_SIZE] * C.MAX_BATCH_SIZE
    out = []
    for i in range(256):
        pfns = np.arange(i * C.MAX_BATCH_SIZE, (i + 1) * C.MAX_BATCH_SIZE, dtype=np.uint64)
        out.append(_join(E.record(C.REC_TYPE_PAGE_DATA, XC.PageData.make(pfns, None, pages))))
    return b"".join(out)


CASES: dict[str, Callable[[], bytes]] = {
    "hvm_params_128m": case_hvm_params_128m,
    "lz4_over_2g": case_lz4_over_2g,
    "lz4_bomb_1g": case_lz4_bomb_1g,
    "lz4_bomb_120m": case_lz4_bomb_120m,
    "tiny_records": case_tiny_records,
    "pages_over_ceiling": case_pages_over_ceiling,
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(name: str, ceiling_mib: int) -> dict[str, object]:
    chan = ReceiverChannel(Config(mac=False), 0)
    head, close = _prefix(chan)
    epoch1 = CASES[name]()
    data = head + epoch1 + close
    core = ContinuousRestore(True, ceiling_mib << 20, chan.on_record)
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.thread_time()
    last: object = None
    try:
        for i in range(0, len(data), CHUNK):
            for d in core.feed(data[i:i + CHUNK]):
                last = d  # a Forward: the driver writes it and drops it
            if core.finished:
                break
        if not core.finished:
            last = core.eof()[-1]
        end = (f"{type(last).__name__} (epoch {last.epoch} kept): {last.reason}"
               if isinstance(last, FailOver | Refused) else type(last).__name__)
    except Exception as exc:
        end = f"EXCEPTION {type(exc).__name__}: {exc}"
    del last
    cpu = time.thread_time() - t0
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    return {"case": name, "ceiling_mib": ceiling_mib, "input_mib": round(len(epoch1) / 2**20, 1),
            "cpu_s": round(cpu, 2), "rss_peak_above_start_mib": round((peak[0] - base) / 2**20),
            "committed": core.committed, "end": end[:300]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.receive_limits")
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--ceiling-mib", type=int, default=512)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.cases[0], args.ceiling_mib)))
        return 0
    for name in args.cases:
        r = subprocess.run([sys.executable, __file__, "--child",
                            "--ceiling-mib", str(args.ceiling_mib), name],
                           capture_output=True, text=True, check=False)
        print(r.stdout.strip() or f"{name}: child failed: {r.stderr.strip()[-500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
