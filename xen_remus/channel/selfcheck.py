"""`python3 -m xen_remus.channel.selfcheck`: both ends of the channel back to back, in
memory, on this host's numpy and lz4 (e.g. Debian 12's in dom0): a synthetic guest's
checkpointed stream goes through SenderChannel, the stream decoder and ReceiverChannel;
the sink's bytes must equal the standard stream. Prints the figures, exits 1 on mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time

import lz4
import numpy as np

from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import Acked, SenderChannel
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, DomainHeader, EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import Epoch, synthetic_stream


def guest(pages: int, epochs: int, dirty: int, seed: int = 1) -> list[Epoch]:
    """The initial copy, then epochs re-sending ``dirty`` pages with a few words changed."""
    rng = np.random.default_rng(seed)
    mem = rng.integers(0, 256, (pages, C.PAGE_SIZE), np.uint8)
    mem[rng.random(pages) < 0.3] = 0
    out = [Epoch(np.arange(pages, dtype=np.uint64), np.zeros(pages, np.uint8),
                 [m.tobytes() for m in mem])]
    for _ in range(1, epochs):
        pfns = np.sort(rng.choice(pages, dirty, replace=False)).astype(np.uint64)
        for p in pfns:
            mem[p].view("<u8")[rng.integers(0, 512, 4)] += np.uint64(1)
        out.append(Epoch(pfns, np.zeros(dirty, np.uint8), [mem[p].tobytes() for p in pfns]))
    return out


def run_pair(std: bytes, cfg: Config) -> tuple[bytes, int, list[Acked], list[float]]:
    """(sink bytes, wire bytes, ACKs, seconds in the channel code and decoder: for the
    initial copy, then for the later epochs)."""
    t = 0.0
    snd, rcv = SenderChannel(cfg, t), ReceiverChannel(cfg, t)
    acks: list[Acked] = []
    snd.feed_back(rcv.offer_line(), t)
    dec = Decoder(checkpointed=True)
    sink, wire, back = bytearray(), 0, bytearray()
    spent = [0.0, 0.0]

    def deliver(bufs: list[Buffer]) -> None:
        nonlocal wire
        data = b"".join(bytes(b) for b in bufs)
        if not data:
            return
        wire += len(data)
        t0 = time.perf_counter()
        for ev in dec.feed(data):
            rep = rcv.on_record(ev) if isinstance(ev, Record) else None
            sink.extend(bytes(ev.wire) if rep is None else b"".join(bytes(b) for b in rep))
            if isinstance(ev, EpochEnd):
                back.extend(rcv.committed(ev.epoch, t))
        spent[bool(acks)] += time.perf_counter() - t0

    for ev in Decoder(checkpointed=True).feed(std):
        t += 0.001
        t0 = time.perf_counter()
        if isinstance(ev, Record) and ev.layer == "libxc" and ev.rtype == C.REC_TYPE_PAGE_DATA:
            pd = ev.parse()
            out = snd.page_records(pd.pfns, pd.types, pd.page_bytes(), t)
        else:
            out = [ev.wire] if len(ev.wire) else []
            snd.other_bytes(len(ev.wire), t)
            if isinstance(ev, DomainHeader | EpochEnd):  # libxc record boundaries
                out += snd.pending(t)
        spent[bool(acks)] += time.perf_counter() - t0
        deliver(out)
        if isinstance(ev, EpochEnd):
            snd.epoch_sent(ev.epoch, t, 1.0, 0, 1.0)
            acks += [e for e in snd.feed_back(bytes(back), t) if isinstance(e, Acked)]
            back.clear()
    return bytes(sink), wire, acks, spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m xen_remus.channel.selfcheck")
    ap.add_argument("--pages", type=int, default=4096, help="guest pages (default 16 MiB)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dirty", type=int, default=512, help="pages per epoch")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, lz4 {lz4.__version__}")
    std = b"".join(bytes(b) for b in synthetic_stream(
        "xl", False, guest(args.pages, args.epochs, args.dirty)))
    ok = True
    for name, cfg in (("lz4-xor", Config()), ("-u", Config(compression=False))):
        sink, wire, acks, spent = run_pair(std, cfg)
        same = sink == std
        ok &= same and [a.epoch for a in acks] == list(range(args.epochs - 1))
        raw0 = acks[0].stats.raw_bytes
        raw = sum(a.stats.raw_bytes for a in acks[1:])
        ratio = raw / max(1, sum(a.stats.wire_bytes for a in acks[1:]))
        print(f"{name}: sink == standard stream: {same}; {len(acks)} ACKs; stream "
              f"{len(std)} B, wire {wire} B; through both ends (channel + decoder): "
              f"initial copy {raw0 / 1e6 / spent[0]:.1f} MB/s, epochs 1..: "
              f"{raw / 1e6 / spent[1]:.1f} MB/s ({raw / (len(acks) - 1) / 1e3:.0f} kB/epoch,"
              f" x{ratio:.2f})")
    print("selfcheck:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
