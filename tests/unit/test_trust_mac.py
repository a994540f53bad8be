"""Authenticated control frames (channel/mac.py wired into the channel ends): both ends
agree on mac=hmac-sha256 and a key (sent in the accept, or pre-shared), every control
frame is sealed and checked, and a frame that is forged, replayed, reflected or from
another protection is refused by name and never acted on. Stock peers see none of it."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_remus_channel import Pair, _feed_records, join, std_stream
from xen_remus.channel import mac, wire
from xen_remus.channel.ends import Config
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.mac import MacError
from xen_remus.channel.negotiate import Accept, Extensions
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import Acked, Closed, SenderChannel
from xen_remus.errors import XenRemusError
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.records import Record

MAC = Config(mac=True, generation=7)
PSK = b"a pre-shared key of the two hosts"


def accept_of(p: Pair) -> Accept:
    recs = [r for r in Decoder().feed(bytes(p.wire)) if isinstance(r, Record)
            and r.rtype == wire.REC_REMUS_ACCEPT]
    assert len(recs) == 1
    return Accept.parse(bytes(recs[0].body).decode(), "accept")


def agreed_sender(cfg: Config = MAC, rcfg: Config = MAC) -> tuple[SenderChannel, int]:
    """A sender that read a MAC-offering receiver's offer and wrote its accept; and the
    offset of the next back-channel frame."""
    snd = SenderChannel(cfg, 0)
    line = ReceiverChannel(rcfg, 0).offer_line()
    snd.feed_back(line, 0)
    snd.pending(0)
    return snd, len(line)


def test_authenticated_stream_is_the_standard_one_and_acks_flow() -> None:
    std = std_stream(5)
    p = Pair(MAC, MAC)
    p.send_stream(std)
    assert bytes(p.forwarded) == std
    assert p.snd is not None and p.rcv is not None
    assert p.snd.agreed == p.rcv.agreed and p.snd.agreed is not None
    assert p.snd.agreed.mac == mac.ALGORITHM and not p.snd.agreed.psk
    assert [e.epoch for e in p.events if isinstance(e, Acked)] == list(range(4))
    acc = accept_of(p)
    assert acc.generation == 7 and acc.key is not None and acc.session is not None
    assert p.rcv.accepted == acc
    # The key never shows where the agreed extensions are shown (the status file).
    assert acc.key.hex() not in p.snd.agreed.tokens() and "key" not in p.snd.agreed.tokens()
    # Every control frame in both directions carries the trailer.
    back = wire.FrameDecoder("back")
    frames = back.feed(bytes(p.back)[len(p.rcv.offer_line()):])
    assert {f.rtype for f in frames} == {wire.REC_REMUS_ACK, wire.REC_REMUS_HEARTBEAT}
    acks = [f for f in frames if f.rtype == wire.REC_REMUS_ACK]
    assert all(len(f.body) == 16 + mac.TRAILER_SIZE for f in acks)
    stats = [r for r in Decoder().feed(bytes(p.wire)) if isinstance(r, Record)
             and r.rtype == wire.REC_REMUS_EPOCH_STATS]
    assert stats and len(p.rcv.take_stats()) == len(stats)


def test_pre_shared_key_is_not_sent() -> None:
    std = std_stream(4)
    cfg = Config(mac=True, key=PSK, generation=1)
    p = Pair(cfg, Config(mac=True, key=PSK))
    p.send_stream(std)
    assert bytes(p.forwarded) == std
    acc = accept_of(p)
    assert acc.key is None and acc.ext.psk and b"key=" not in bytes(p.wire)
    assert [e.epoch for e in p.events if isinstance(e, Acked)] == [0, 1, 2]


def test_different_pre_shared_keys_are_refused_at_the_first_frame() -> None:
    p = Pair(Config(mac=True, key=PSK), Config(mac=True, key=b"another key, not the same"))
    with pytest.raises(MacError, match=r"REMUS_ACK at offset \d+ \(epoch 0\): bad MAC.*"
                       "different --key-file"):
        p.send_stream(std_stream(3))


@pytest.mark.parametrize("snd_key,rcv_key,msg", [
    (None, PSK, "the backup has a pre-shared key"),
    (PSK, None, "this end has a pre-shared key"),
])
def test_a_key_file_at_one_end_only_is_refused_by_the_sender(
        snd_key: bytes | None, rcv_key: bytes | None, msg: str) -> None:
    line = ReceiverChannel(Config(mac=True, key=rcv_key), 0).offer_line()
    with pytest.raises(ChannelError, match=f"offer line: {msg}.*same --key-file"):
        SenderChannel(Config(mac=True, key=snd_key), 0).feed_back(line, 0)


def test_each_end_requires_authentication_of_a_xen_remus_peer() -> None:
    # Our sender and an older receiver (no mac offered): its ACKs could be forged.
    with pytest.raises(ChannelError, match="does not authenticate its frames.*older"):
        SenderChannel(MAC, 0).feed_back(ReceiverChannel(Config(), 0).offer_line(), 0)
    # A receiver that wants an algorithm this version does not know.
    line = ReceiverChannel(Config(), 0).offer_line().replace(b"\n", b" mac=blake3\n")
    with pytest.raises(ChannelError, match=r"requires authenticated control frames "
                       r"\(mac=blake3\)"):
        SenderChannel(MAC, 0).feed_back(line, 0)
    # Our receiver and an older sender (no mac in its accept).
    rcv = ReceiverChannel(MAC, 0)
    accept = wire.frame(wire.REC_REMUS_ACCEPT, [Config().extensions().tokens().encode()])
    with pytest.raises(ChannelError, match="sender does not authenticate.*requires it"):
        _feed_records(rcv, [accept])


def test_stock_peers_see_none_of_it() -> None:
    std = std_stream(4)
    p = Pair(MAC, None)  # stock xl migrate-receive -r: banner only
    p.send_stream(std)
    assert bytes(p.wire) == std and p.snd is not None and p.snd.agreed is None
    p = Pair(None, MAC)  # stock xl remus: leaves the offer unread, never accepts
    p.start()
    p.to_receiver([std])
    assert bytes(p.forwarded) == std and p.rcv is not None
    assert bytes(p.back) == p.rcv.offer_line() and p.rcv.close("x") == b""


def _epoch0_sent(snd: SenderChannel) -> None:
    assert snd.epoch_sent(0, 1.0, 1, 1, 1) is None  # awaits its ACK


@pytest.mark.parametrize("forged,msg", [
    (wire.ack(0, 0), "no MAC"),  # an ACK as before authentication
    (wire.frame_bytes(wire.REC_REMUS_ACK,
                      mac.Sealer(bytes(32), mac.BACK).seal(wire.REC_REMUS_ACK,
                                                           wire.ack_body(0, 0))),
     "bad MAC"),  # sealed under a guessed key
])
def test_a_forged_ack_is_refused_by_name_and_commits_nothing(forged: bytes, msg: str
                                                              ) -> None:
    snd, off = agreed_sender()
    _epoch0_sent(snd)
    with pytest.raises(MacError, match=re.escape(
            f"receiver channel (after the banner), REMUS_ACK at offset {off} (epoch 0): "
            f"{msg}")):
        snd.feed_back(forged, 2.0)
    assert snd.acked is None and snd.take_early() == []


def test_a_replayed_ack_is_refused() -> None:
    p = Pair(MAC, MAC)
    p.send_stream(std_stream(3))
    assert p.snd is not None and p.rcv is not None
    ack1 = next(f for f in wire.FrameDecoder("b").feed(bytes(p.back)[len(p.rcv.offer_line()):])
                if f.rtype == wire.REC_REMUS_ACK)  # the real ACK of epoch 0
    p.snd.epoch_sent(2, p.t, 1, 1, 1)
    with pytest.raises(MacError, match=r"REMUS_ACK .*\(epoch 2\): sequence number 1, "
                       r"expected \d+: refused \(a replayed"):
        p.snd.feed_back(wire.frame_bytes(ack1.rtype, ack1.body), p.t)
    assert p.snd.acked == 1


def test_a_frame_of_the_other_direction_or_protection_does_not_verify() -> None:
    # Reflection: the sender's own (sealed) heartbeat sent back to it.
    snd, _ = agreed_sender()
    beat = join(snd.pending(10.0))
    assert wire.FrameDecoder("f").feed(beat)[0].rtype == wire.REC_REMUS_HEARTBEAT
    with pytest.raises(MacError, match="REMUS_HEARTBEAT.*bad MAC"):
        snd.feed_back(beat, 10.0)
    # Another protection under the same pre-shared key: its ACK of epoch 0 is refused.
    cfg = Config(mac=True, key=PSK, generation=3)
    old = Pair(cfg, Config(mac=True, key=PSK))
    old.send_stream(std_stream(2))
    assert old.rcv is not None
    first = bytes(old.back)[len(old.rcv.offer_line()):]
    snd, _ = agreed_sender(cfg, Config(mac=True, key=PSK))
    _epoch0_sent(snd)
    with pytest.raises(MacError, match="bad MAC"):
        snd.feed_back(first, 1.0)


def test_the_receiver_refuses_unauthenticated_forward_frames() -> None:
    for forged, msg in [(wire.heartbeat(1), "no MAC"),
                        (wire.frame_bytes(wire.REC_REMUS_EPOCH_STATS, bytes(64)), "bad MAC")]:
        rcv = ReceiverChannel(MAC, 0)
        snd = SenderChannel(MAC, 0)
        snd.feed_back(rcv.offer_line(), 0)
        accept = join(snd.pending(0))
        with pytest.raises(MacError, match=rf"REMUS_\w+ at offset \d+ \(epoch 0\): {msg}"):
            _feed_records(rcv, [[accept], [forged]])
        assert rcv.take_stats() == []


def test_the_receiver_close_frame_is_authenticated() -> None:
    rcv, snd = ReceiverChannel(MAC, 0), SenderChannel(MAC, 0)
    snd.feed_back(rcv.offer_line(), 0)
    _feed_records(rcv, [[join(snd.pending(0))]])  # the accept
    assert snd.feed_back(rcv.close("disk full"), 0) == [Closed("disk full")]
    with pytest.raises(MacError, match="REMUS_CLOSE.*bad MAC"):
        snd.feed_back(wire.close("a forged reason, long enough for a trailer"), 0)


def test_accept_parsing() -> None:
    ext = Config(mac=True).extensions()
    acc = Accept(ext, 2**64 - 1, bytes(range(16)), bytes(32))
    assert Accept.parse(acc.body().decode(), "a") == acc
    assert Extensions.parse(ext.tokens(), "x") == ext
    for body, msg in [
        (f"{ext.tokens()} session={'00' * 16}", "without psk, but no key was sent"),
        (f"{ext.tokens()} psk session={'00' * 16} key={'00' * 32}", "a key was sent too"),
        (f"{ext.tokens()} key={'00' * 32}", "without a session nonce"),
        (f"{ext.tokens()} session=00 key={'00' * 32}", "bad token session=...: 1 bytes"),
        ("version=1 generation=-1", "bad token generation"),
        ("version=1 generation=18446744073709551616", "bad token generation"),
    ]:
        with pytest.raises(ChannelError, match=re.escape(msg)):
            Accept.parse(body, "accept")
    # A bad key's value is not repeated in the error.
    with pytest.raises(ChannelError) as exc:
        Accept.parse(f"{ext.tokens()} session={'00' * 16} key=secretsecret", "a")
    assert "secret" not in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(frames=st.binary(max_size=300), body=st.binary(max_size=120),
       rtype=st.sampled_from(sorted(wire.NAMES)))
def test_any_bytes_under_mac_are_named_errors(frames: bytes, body: bytes, rtype: int) -> None:
    """Whatever arrives once mac is agreed: our errors, naming where, never a crash."""
    snd, _ = agreed_sender()
    _epoch0_sent(snd)
    try:
        snd.feed_back(frames, 1.0)
    except XenRemusError as exc:
        assert "receiver channel" in str(exc)
    rcv = ReceiverChannel(MAC, 0)
    snd = SenderChannel(MAC, 0)
    snd.feed_back(rcv.offer_line(), 0)
    frame = join(snd.pending(0))
    (length,) = struct.unpack_from("<I", frame, 4)
    rcv.on_record(Record(layer="libxc", rtype=wire.REC_REMUS_ACCEPT, length=length,
                         body=frame[8:8 + length], offset=900, epoch=3))
    assert rcv.agreed is not None and rcv.agreed.mac == mac.ALGORITHM
    try:
        rcv.on_record(Record(layer="libxc", rtype=rtype, length=len(body), body=body,
                             offset=1000, epoch=3))
    except XenRemusError as exc:
        assert "offset 1000" in str(exc) and "epoch 3" in str(exc)
