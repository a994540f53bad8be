"""The backup's receive under mutated input: a bounded, deterministic fuzz run.

Seeds are valid streams from the project's own encoder (PV and HVM, plain records and the
xen-remus channel with compressed pages); each is mutated by a seeded generator (bit
flips, hostile lengths, cuts, splices, inserted records) and fed to ContinuousRestore in
random chunks. Whatever the input: no exception escapes, every error is one of ours and
names its offset, nothing of an epoch the core rejects is forwarded or ACKed (what was
forwarded decodes, independently, into exactly the epochs committed), and what the core
keeps alive never exceeds its ceiling.
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest

from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.errors import XenRemusError
from xen_remus.restore_continuous import (
    Abort,
    Committed,
    ContinuousRestore,
    Decision,
    FailOver,
    Forward,
    PartialDropped,
    Refused,
)
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream

CEILING = 1 << 20
CHAN = Config(cache_mib=1)  # the page cache is the channel's own, agreed memory
ROUNDS = 3000  # mutations per seed; the whole file runs in ~20 s on the dev host
TRACED = 10  # every TRACED-th run under tracemalloc (Python and numpy allocations)
HOSTILE = [0, 1, 7, 0xFF, 0xFFFF, C.REC_LENGTH_MAX, C.REC_LENGTH_MAX + 1, 0x7FFFFFFF,
           0x80000000, 0xFFFFFFFF, 1 << 19, 1 << 21]


def _plain(pv: bool) -> bytes:
    eps = [make_epoch(range(1, 9), seed=0)]
    eps += [make_epoch([1 + n, 3 + n, 200 + n], seed=n) for n in range(1, 4)]
    return b"".join(bytes(b) for b in synthetic_stream("xl", pv, eps, end=False))


def _channel(pv: bool) -> bytes:
    """The same layout with the sender's accept after the first PAGE_DATA and every later
    PAGE_DATA compressed, as a xen-remus primary sends it."""
    rcv = ReceiverChannel(CHAN, 0)
    snd = SenderChannel(CHAN, 0)
    snd.feed_back(rcv.offer_line(), 0)
    out: list[bytes] = []
    for ev in Decoder().feed(_plain(pv)):
        if isinstance(ev, Record) and ev.name == "PAGE_DATA":
            pd = ev.parse()
            out += [bytes(b) for b in snd.page_records(pd.pfns, pd.types, bytes(pd.data), 0)]
        else:
            out.append(bytes(ev.wire))
    return b"".join(out)


SEEDS: dict[str, tuple[bytes, bool]] = {
    "pv": (_plain(True), False), "hvm": (_plain(False), False),
    "pv-channel": (_channel(True), True), "hvm-channel": (_channel(False), True)}


def _record_starts(data: bytes) -> list[int]:
    return [e.offset for e in Decoder().feed(data) if isinstance(e, Record)]


def mutate(data: bytes, rnd: random.Random, starts: list[int]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        kind = rnd.randrange(7)
        at = rnd.randrange(len(buf))
        if kind == 0:  # a bit flip anywhere
            buf[at] ^= 1 << rnd.randrange(8)
        elif kind == 1:  # a hostile record length
            r = rnd.choice(starts)
            buf[r + 4:r + 8] = struct.pack("<I", rnd.choice(HOSTILE))
        elif kind == 2:  # a record of another (or unknown, or optional) type
            r = rnd.choice(starts)
            t = rnd.choice([rnd.randrange(0x20), 0x80000000 | rnd.randrange(0x20),
                            0x80585200 | rnd.randrange(0x12), rnd.getrandbits(32)])
            buf[r:r + 4] = struct.pack("<I", t)
        elif kind == 3:  # a hostile u32 in a record body (counts, claimed sizes)
            r = rnd.choice(starts) + 8 + 4 * rnd.randrange(6)
            buf[r:r + 4] = struct.pack("<I", rnd.choice(HOSTILE))
        elif kind == 4:  # cut
            del buf[at:]
        elif kind == 5:  # a span moved elsewhere (records out of order, repeated)
            a, b = sorted(rnd.sample(starts, 2))
            buf[at:at] = buf[a:b]
        else:  # a whole record inserted: random type, body, at a record boundary
            body = rnd.randbytes(rnd.choice([0, 8, 16, 24, 4104]))
            t = rnd.choice([0x80000000 | rnd.randrange(0x20), rnd.randrange(0x20),
                            0x80585202, 0x80585203])
            r = rnd.choice(starts)
            buf[r:r] = struct.pack("<II", t, len(body)) + body
        if not buf:
            break
    return bytes(buf)


def check_run(data: bytes, channel: bool, rnd: random.Random) -> tuple[str, int]:
    """Feed ``data``; check the invariants; return how the receive ended and the memory
    of the channel's page cache (outside the ceiling: see page_cache_memory)."""
    rewrite: Callable[[Record, int], object] | None = None
    chan = ReceiverChannel(CHAN, 0)
    if channel:
        rewrite = chan.on_record
    core = ContinuousRestore(True, CEILING, rewrite)  # type: ignore[arg-type]
    decisions: list[Decision] = []
    pos = 0
    while pos < len(data) and not core.finished:
        n = rnd.choice([1, 7, 64, 1000, 4096, 65536])
        decisions += core.feed(data[pos:pos + n])
        pos += n
        if not core.finished:
            assert core.cost() <= CEILING
    if not core.finished:
        decisions += core.eof()
    # What was forwarded is valid, decoded by a decoder of its own: records only up to
    # the first bad one while the initial copy streams through (an Abort then tears the
    # copy down), whole epochs only after it, exactly those committed.
    forwarded = b"".join(bytes(b) for d in decisions if isinstance(d, Forward) for b in d.bufs)
    committed = [d.epoch for d in decisions if isinstance(d, Committed)]
    assert committed == list(range(len(committed)))
    last = decisions[-1]
    check = Decoder(checkpointed=True, relay=True)
    try:
        evs = check.feed(forwarded) if forwarded else []
        if committed:
            evs += check.feed(b"")  # ends at an epoch boundary
    except StreamError as exc:
        raise AssertionError(f"forwarded bytes do not decode: {exc}") from None
    assert sum(isinstance(e, EpochEnd) for e in evs) == len(committed)
    assert isinstance(last, FailOver | Refused | Abort) or type(last).__name__ == "Complete"
    for d in decisions:
        if isinstance(d, Refused | Abort | FailOver) and d.error is not None:
            assert isinstance(d.error, XenRemusError) and "offset" in str(d.error)
        if isinstance(d, Refused):  # nothing of the refused epoch, no ACK of it
            assert d.epoch == committed[-1]
        if isinstance(d, PartialDropped):
            assert d.epoch == committed[-1] + 1
    dec = chan._decompressor
    return type(last).__name__, dec.cache.nbytes if dec is not None else 0


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_mutated_streams(seed: str) -> None:
    data, channel = SEEDS[seed]
    assert check_run(data, channel, random.Random(0))[0] == "FailOver"  # the seed is valid
    starts = _record_starts(data)
    rnd = random.Random(seed)
    ends: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(ROUNDS):
        bad = mutate(data, rnd, starts)
        if i % TRACED:
            end, _ = check_run(bad, channel, rnd)
        else:
            # What is allocated, not just what is counted, stays within twice the ceiling
            # (held records, reassembly buffers, expanded pages), whatever a length claims.
            tracemalloc.start()
            try:
                end, cache = check_run(bad, channel, rnd)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak <= 2 * CEILING + (1 << 20) + cache, (peak, cache, i)
        ends[end] = ends.get(end, 0) + 1
    assert time.monotonic() - t0 < 15, "the fuzz run outgrew its time budget"
    # The mutations reach every outcome: refused epochs, aborts and failovers.
    assert {"Refused", "Abort", "FailOver"} <= set(ends), ends
