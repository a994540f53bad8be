"""Both ends of the channel wired back to back through the stream codec: stock bytes with
stock peers, the sink always sees the standard stream, ACKs, heartbeats, stats, errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.negotiate import OFFER_PREFIX, Extensions
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import Acked, Closed, Offered, SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, DomainHeader, EpochEnd, StreamEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import Epoch, synthetic_stream
from xen_remus.xlproto import BANNER, SenderSide


def join(bufs: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def guest_epochs(n: int, pages: int = 64, dirty: int = 12, seed: int = 1) -> list[Epoch]:
    """Epoch 0 sends every page; later epochs re-send a few pages with a few words changed,
    as a running guest dirties them."""
    rng = np.random.default_rng(seed)
    mem = rng.integers(0, 256, (pages, C.PAGE_SIZE), np.uint8)
    mem[::4] = 0  # some zero pages
    out = [Epoch(np.arange(pages, dtype=np.uint64), np.zeros(pages, np.uint8),
                 [m.tobytes() for m in mem])]
    for _ in range(1, n):
        pfns = np.sort(rng.choice(pages, dirty, replace=False)).astype(np.uint64)
        for p in pfns:
            mem[p, rng.integers(0, C.PAGE_SIZE, 4)] ^= 0x11
        out.append(Epoch(pfns, np.zeros(dirty, np.uint8), [mem[p].tobytes() for p in pfns]))
    return out


def std_stream(epochs: int = 5, pv: bool = False, **kw: int) -> bytes:
    return join(synthetic_stream("xl", pv, guest_epochs(epochs, **kw), batch=16))


DEFAULT = Config()


class Pair:
    """A SenderChannel and a ReceiverChannel joined by in-memory channels and a clock."""

    def __init__(self, scfg: Config | None = DEFAULT, rcfg: Config | None = DEFAULT) -> None:
        self.t = 100.0
        self.snd = SenderChannel(scfg, self.t) if scfg else None
        self.rcv = ReceiverChannel(rcfg, self.t) if rcfg else None
        self.dec = Decoder(checkpointed=True)
        self.wire = bytearray()  # primary -> backup
        self.forwarded = bytearray()  # what the receiver gives its sink
        self.back = bytearray()  # backup -> primary, after the banner
        self.events: list[object] = []
        self.epochs_committed: list[int] = []
        self._acks = bytearray()  # in flight to the sender until it reads them

    def start(self) -> None:
        """The receiver's banner (+ offer); the sender reads what it gets."""
        line = self.rcv.offer_line() if self.rcv else b""
        side = SenderSide(checkpointed=True)
        first = BANNER + line
        assert [m.name for m in side.feed(first[:len(BANNER)])] == ["banner"]
        self.to_sender(first[len(BANNER):])

    def to_sender(self, data: bytes) -> None:
        self.back += data
        if self.snd is not None and data:
            self.events += self.snd.feed_back(data, self.t)

    def to_receiver(self, bufs: Sequence[Buffer]) -> None:
        data = join(bufs)
        if not data:
            return  # (an empty feed would be EOF to the decoder)
        self.wire += data
        if self.rcv is not None and data:
            self.rcv.seen(self.t)
        for ev in self.dec.feed(data):
            if isinstance(ev, Record) and self.rcv is not None:
                rep = self.rcv.on_record(ev)
                self.forwarded += bytes(ev.wire) if rep is None else join(rep)
            else:
                self.forwarded += bytes(ev.wire)
            if isinstance(ev, EpochEnd):
                self.epochs_committed.append(ev.epoch)
                if self.rcv is not None:
                    self._acks += self.rcv.committed(ev.epoch, self.t, commit_ms=0.5)

    def deliver_acks(self) -> None:
        data, self._acks = bytes(self._acks), bytearray()
        self.to_sender(data)

    def send_stream(self, std: bytes, idle: float = 0.3,
                    offer_after_epoch: int | None = None) -> None:
        """Re-emit a standard stream as the save engine would through the channel."""
        snd = self.snd
        assert snd is not None
        if offer_after_epoch is None:
            self.start()
        for ev in Decoder(checkpointed=True).feed(std):
            if isinstance(ev, Record) and ev.layer == "libxc" and \
                    ev.rtype == C.REC_TYPE_PAGE_DATA:
                pd = ev.parse()
                self.to_receiver(snd.page_records(pd.pfns, pd.types, pd.page_bytes(), self.t))
            elif len(ev.wire):
                self.to_receiver([ev.wire])
                snd.other_bytes(len(ev.wire), self.t)
            if isinstance(ev, DomainHeader):
                self.to_receiver(snd.pending(self.t))  # the accept, if offered already
            if isinstance(ev, EpochEnd):
                st = snd.epoch_sent(ev.epoch, self.t, pause_ms=1.5, dirty_pages=12,
                                    send_ms=2.5)
                if st is not None:
                    self.events.append(st)
                self.t += 0.002
                self.deliver_acks()  # the engine reads the back channel after the write
                if offer_after_epoch == ev.epoch:
                    self.start()
                self.t += idle  # waiting for the interval: heartbeats both ways
                self.to_receiver(snd.pending(self.t))
                if self.rcv is not None:
                    self.to_sender(self.rcv.pending(self.t))
            if isinstance(ev, StreamEnd):
                break


@pytest.mark.parametrize("pv", [False, True])
def test_both_ours_sink_sees_the_standard_stream(pv: bool) -> None:
    std = std_stream(6, pv)
    p = Pair()
    p.send_stream(std)
    assert bytes(p.forwarded) == std  # compressed pages expanded, our records gone
    assert p.snd is not None and p.rcv is not None
    assert p.snd.agreed == p.rcv.agreed == Config().extensions()
    assert isinstance(p.events[0], Offered)
    acks = [e for e in p.events if isinstance(e, Acked)]
    assert [a.epoch for a in acks] == p.epochs_committed == list(range(5))
    assert all(a.stats.ack_ms is not None and a.commit_ms == 0.5 for a in acks)
    # Later epochs re-send edited pages: far fewer wire bytes than the standard stream.
    wire_types = [r.rtype for r in Decoder().feed(bytes(p.wire)) if isinstance(r, Record)]
    assert wire.REC_REMUS_ACCEPT in wire_types and wire.REC_REMUS_EPOCH_STATS in wire_types
    assert wire_types.count(wire.REC_REMUS_PAGE_DATA_LZ4XOR) > 0
    for a in acks[1:]:
        assert a.stats.raw_bytes / a.stats.wire_bytes > 3, a.stats
    # The figures reached the backup (in-band, once the ACK completed them).
    stats = p.rcv.take_stats()
    assert [s.epoch for s in stats] == [0, 1, 2, 3, 4] and p.rcv.take_stats() == []
    got, sent = stats[1], acks[1].stats
    assert (got.raw_bytes, got.wire_bytes, got.dirty_pages) == \
        (sent.raw_bytes, sent.wire_bytes, sent.dirty_pages)
    assert got.ack_ms == pytest.approx(sent.ack_ms, abs=0.001)


def test_our_sender_stock_receiver_sends_standard_bytes() -> None:
    std = std_stream(4)
    p = Pair(rcfg=None)  # stock xl migrate-receive -r: banner only
    p.send_stream(std)
    assert bytes(p.wire) == std
    assert p.snd is not None and p.snd.agreed is None and not p.snd.acks
    assert not p.snd.peer_dead(p.t + 3600) and p.snd.wake_at() is None
    stats = [e for e in p.events if isinstance(e, EpochStats)]
    assert [s.epoch for s in stats] == [0, 1, 2] and stats[1].raw_bytes == stats[1].wire_bytes


def test_stock_sender_our_receiver_back_channel_is_banner_and_offer_only() -> None:
    std = std_stream(4)
    p = Pair(scfg=None)
    p.start()
    p.to_receiver([std])
    assert bytes(p.forwarded) == std
    assert p.rcv is not None and p.rcv.agreed is None
    assert bytes(p.back) == p.rcv.offer_line()  # a stock sender leaves it unread
    assert p.rcv.pending(p.t + 3600) == b"" and p.rcv.close("x") == b""
    assert not p.rcv.peer_dead(p.t + 3600)


def test_offer_is_invisible_to_a_stock_sender() -> None:
    """xl_migrate.c reads exactly the banner's bytes; the offer stays behind them."""
    line = ReceiverChannel(Config(), 0).offer_line()
    sent = BANNER + line
    assert sent[:len(BANNER)] == BANNER and line.startswith(OFFER_PREFIX)
    assert line.endswith(b"\n") and b"\n" not in line[:-1] and len(line) < 512


def test_compression_off_both_ways() -> None:
    std = std_stream(4)
    for scfg, rcfg in ((Config(compression=False), Config()),
                       (Config(), Config(compression=False))):
        p = Pair(scfg, rcfg)
        p.send_stream(std)
        assert bytes(p.forwarded) == std
        assert p.snd is not None and p.snd.agreed is not None
        assert p.snd.agreed.lz4_xor_mib is None and p.snd.agreed.ack
        types = [r.rtype for r in Decoder().feed(bytes(p.wire)) if isinstance(r, Record)]
        assert wire.REC_REMUS_PAGE_DATA_LZ4XOR not in types


def test_late_offer_is_accepted_at_a_later_boundary() -> None:
    std = std_stream(5)
    p = Pair()
    p.send_stream(std, offer_after_epoch=1)
    assert bytes(p.forwarded) == std
    acks = [e.epoch for e in p.events if isinstance(e, Acked)]
    assert acks == [2, 3]  # epochs sent after the accept


def test_negotiated_values() -> None:
    mine = Config(heartbeat_timeout_ms=3000, cache_mib=64).extensions()
    theirs = Extensions.parse("version=3 ack heartbeat=100:1000 lz4-xor=128 disk=drbd9 "
                              "future", "offer")
    assert theirs.other == ("disk=drbd9", "future")
    got = mine.agree(theirs)
    assert got == Extensions(1, True, (100, 3000), 64)
    assert Extensions.parse(got.tokens(), "accept") == got
    for bad in ("ack", "version=1 heartbeat=500:100", "version=1 heartbeat=x",
                "version=1 lz4-xor=0"):
        with pytest.raises(ChannelError, match="offer"):
            Extensions.parse(bad, "offer")


def test_offer_split_anywhere() -> None:
    line = ReceiverChannel(Config(), 0).offer_line()
    for cut in range(len(line) + 1):
        snd = SenderChannel(Config(), 0)
        ev = snd.feed_back(line[:cut], 0) + snd.feed_back(line[cut:], 0)
        assert [type(e) for e in ev] == [Offered] and snd.agreed is None
        assert join(snd.pending(0))[8:].decode().rstrip("\0") == Config().extensions().tokens()
        beats = wire.heartbeat(1) + wire.heartbeat(2)  # frames come after the accept only
        assert snd.feed_back(beats[:cut % 32], 0) + snd.feed_back(beats[cut % 32:], 0) == []


def test_sender_rejects_a_bad_receiver_channel() -> None:
    with pytest.raises(ChannelError, match="expected the xen-remus offer line"):
        SenderChannel(Config(), 0).feed_back(b"domain received", 0)
    with pytest.raises(ChannelError, match="longer than 512"):
        SenderChannel(Config(), 0).feed_back(OFFER_PREFIX + b"x" * 600, 0)
    line = ReceiverChannel(Config(), 0).offer_line()
    snd = SenderChannel(Config(), 0)
    with pytest.raises(ChannelError, match="REMUS_HEARTBEAT at offset .*before our accept"):
        snd.feed_back(line + wire.heartbeat(1), 0)
    snd = SenderChannel(Config(), 0)
    snd.feed_back(line, 0)
    snd.pending(0)
    off = len(line)
    with pytest.raises(ChannelError, match=f"REMUS_ACK at offset {off}: ACK of epoch 5, but "
                       "the epochs awaiting one are none"):
        snd.feed_back(wire.ack(5, 0), 0)
    snd = SenderChannel(Config(), 0)
    snd.feed_back(line, 0)
    snd.pending(0)
    with pytest.raises(ChannelError, match=f"bad frame header at offset {off}"):
        snd.feed_back(b"\x01" * 16, 0)
    snd = SenderChannel(Config(), 0)
    snd.feed_back(line, 0)
    snd.pending(0)
    assert snd.feed_back(wire.close("disk full"), 0) == [Closed("disk full")]


def test_acks_come_in_epoch_order_and_latency_is_measured() -> None:
    """Pipelined epochs: several await their ACK at once; each is ACKed on its own, oldest
    first, and an ACK out of that order is refused naming both epochs."""
    snd = SenderChannel(Config(), 0)
    snd.feed_back(ReceiverChannel(Config(), 0).offer_line(), 0)
    snd.pending(0)
    snd.epoch_sent(0, 1.0, 1, 1, 1)
    snd.epoch_sent(1, 2.0, 1, 1, 1)
    snd.epoch_sent(2, 2.5, 1, 1, 1)
    assert snd.awaiting == [0, 1, 2]
    with pytest.raises(ChannelError, match=r"ACK of epoch 1 before that of epoch 0 \(the "
                       r"epochs awaiting one are \[0, 1, 2\]"):
        snd.feed_back(wire.ack(1, 0), 1.5)
    (ev,) = snd.feed_back(wire.ack(0, 0), 1.5)
    assert isinstance(ev, Acked) and ev.epoch == 0 and snd.awaiting == [1, 2]
    evs = snd.feed_back(wire.ack(1, 250) + wire.ack(2, 0), 2.040)
    assert [e.epoch for e in evs if isinstance(e, Acked)] == [1, 2] and snd.acked == 2
    assert isinstance(evs[0], Acked) and evs[0].stats.ack_ms == pytest.approx(40)
    assert evs[0].commit_ms == 0.25 and snd.awaiting == []
    with pytest.raises(ChannelError, match="ACK of epoch 0, but the epochs awaiting one are "
                       "none"):
        snd.feed_back(wire.ack(0, 0), 3)
    with pytest.raises(ValueError, match="next epoch is 3"):
        snd.epoch_sent(5, 3, 1, 1, 1)


def test_early_ack_of_a_later_epoch_is_out_of_order() -> None:
    """The ACK of the epoch being written cannot be taken as early while an older one
    still awaits its ACK."""
    snd = SenderChannel(Config(), 0)
    snd.feed_back(ReceiverChannel(Config(), 0).offer_line(), 0)
    snd.pending(0)
    snd.epoch_sent(0, 1.0, 1, 1, 1)
    with pytest.raises(ChannelError, match=r"ACK of epoch 1, but the epochs awaiting one "
                       r"are \[0\]"):
        snd.feed_back(wire.ack(1, 0), 1.5)


def test_ack_before_epoch_sent_is_kept_for_it() -> None:
    """A fast backup (or the heartbeat thread reading) can see the ACK of epoch N before
    the engine called epoch_sent(N): a protect has died on that race."""
    snd = SenderChannel(Config(), 0)
    snd.feed_back(ReceiverChannel(Config(), 0).offer_line(), 0)
    snd.pending(0)
    assert snd.feed_back(wire.ack(0, 100), 1.0) == []  # epoch 0 still being written
    assert snd.take_early() == [] and snd.acked is None
    assert snd.epoch_sent(0, 1.5, 1, 1, 1) is None
    (ev,) = snd.take_early()
    assert isinstance(ev, Acked) and ev.epoch == 0 and snd.acked == 0
    assert ev.stats.ack_ms == 0 and ev.commit_ms == 0.1
    assert snd.take_early() == []
    with pytest.raises(ChannelError, match="ACK of epoch 2, but the epochs awaiting one"):
        snd.feed_back(wire.ack(2, 0), 2)  # epoch 1 is the one in flight


def _feed_records(rcv: ReceiverChannel, recs: list[list[Buffer]]) -> None:
    std = join(synthetic_stream("xl", False, guest_epochs(1, pages=2), end=False))
    dec = Decoder(checkpointed=True)
    for ev in dec.feed(std):
        if isinstance(ev, Record):
            rcv.on_record(ev)
    for r in recs:
        for ev in dec.feed(join(r)):
            assert isinstance(ev, Record)
            rcv.on_record(ev)


def test_receiver_rejects_what_was_not_agreed() -> None:
    def accept(tokens: str) -> list[Buffer]:
        return wire.frame(wire.REC_REMUS_ACCEPT, [tokens.encode()])

    ok = Config().extensions().tokens()
    cases = [
        ([wire.frame(wire.REC_REMUS_HEARTBEAT, [bytes(8)])], "before REMUS_ACCEPT"),
        ([accept(ok), accept(ok)], "second REMUS_ACCEPT"),
        ([accept("version=1 ack heartbeat=250:500")], r"not offered \(heartbeat\)"),
        ([accept("version=1 lz4-xor=4096")], r"not offered \(lz4-xor\)"),
        ([accept("version=2")], r"not offered \(version\)"),
        ([accept("version=1"), wire.frame(wire.REC_REMUS_PAGE_DATA_LZ4XOR, [bytes(8)])],
         "compression was not agreed"),
        ([accept(ok), wire.frame(wire.REC_REMUS_ACK, [bytes(16)])],
         "not a record of this direction"),
        ([accept(ok), wire.frame(wire.REC_REMUS_EPOCH_STATS, [bytes(5)])],
         "REMUS_EPOCH_STATS body of 5 bytes"),
    ]
    for recs, msg in cases:
        rcv = ReceiverChannel(Config(), 0)
        with pytest.raises(ChannelError, match=msg):
            _feed_records(rcv, recs)
    rcv = ReceiverChannel(Config(), 0)
    _feed_records(rcv, [accept("version=1")])  # nothing but the version: fine
    assert rcv.agreed == Extensions(1, False, None, None) and rcv.committed(0, 0) == b""


def test_heartbeats_and_failure_detection_in_time() -> None:
    """Timeout 1 s, interval 250 ms: each end hears from the other at least every 250 ms
    while both live; a peer that goes silent (powered off: no reset, no EOF) is declared
    dead just after 1 s of silence, by both ends."""
    p = Pair()
    p.start()
    snd, rcv = p.snd, p.rcv
    assert snd is not None and rcv is not None
    std = join(synthetic_stream("xl", False, guest_epochs(2, pages=2, dirty=1), end=False))
    p.to_receiver([std])
    p.to_receiver(snd.pending(p.t))  # accept
    t0 = p.t
    beats_fwd = beats_back = 0
    for i in range(1, 201):  # 2 s in 10 ms steps, both alive
        p.t = t0 + i * 0.01
        fwd = snd.pending(p.t)
        beats_fwd += len(fwd)
        p.to_receiver(fwd)
        back = rcv.pending(p.t)
        beats_back += bool(back)
        p.to_sender(back)
        assert not snd.peer_dead(p.t) and not rcv.peer_dead(p.t)
    assert beats_fwd == beats_back == 8
    # The primary's host dies: nothing more from it. The backup notices after 1 s.
    last = p.t
    while not rcv.peer_dead(p.t):
        p.t += 0.01
        p.to_sender(rcv.pending(p.t))
        assert p.t - last < 1.1
    assert p.t - last == pytest.approx(1.0, abs=0.02)
    wake = rcv.wake_at()
    assert wake is not None and wake <= p.t
    # The backup's heartbeats kept the primary's detector happy meanwhile.
    assert not snd.peer_dead(p.t)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=60))
def test_receiver_is_independent_of_chunking(cuts: list[int]) -> None:
    """The same wire bytes, read in arbitrary pieces, give the sink the same stream."""
    std, wire_bytes = _WIRE
    rcv = ReceiverChannel(Config(), 0)
    dec = Decoder(checkpointed=True)
    out = bytearray()
    at, i = 0, 0
    while at < len(wire_bytes):
        n = cuts[i % len(cuts)]
        i += 1
        for ev in dec.feed(wire_bytes[at:at + n]):
            rep = rcv.on_record(ev) if isinstance(ev, Record) else None
            out += bytes(ev.wire) if rep is None else join(rep)
        at += n
    assert bytes(out) == std


def _wire_once() -> tuple[bytes, bytes]:
    std = std_stream(4, pages=48, dirty=9, seed=3)
    p = Pair()
    p.send_stream(std)
    return std, bytes(p.wire)


_WIRE = _wire_once()
