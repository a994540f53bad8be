"""Whatever a peer sends, the channel answers with our errors (named), never a crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.negotiate import OFFER_PREFIX, Extensions
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.errors import XenRemusError
from xen_remus.stream.records import Record

OURS = sorted(wire.NAMES)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_extension_tokens(text: str) -> None:
    try:
        ext = Extensions.parse(text, "offer")
    except XenRemusError as exc:
        assert str(exc).startswith("offer")
        return
    assert Extensions.parse(ext.tokens(), "again").tokens() == ext.tokens()


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=120), frames=st.binary(max_size=200),
       prefixed=st.booleans())
def test_receiver_channel_bytes(line: bytes, frames: bytes, prefixed: bool) -> None:
    """An offer line of any content, then any bytes as frames."""
    snd = SenderChannel(Config(), 0)
    try:
        snd.feed_back((OFFER_PREFIX if prefixed else b"") + line + b"\n", 0)
        snd.pending(0)
        snd.epoch_sent(0, 0, 1, 1, 1)
        snd.feed_back(frames, 0)
    except XenRemusError as exc:
        assert "receiver channel" in str(exc) or "offer" in str(exc)


@settings(max_examples=300, deadline=None)
@given(recs=st.lists(st.tuples(st.sampled_from(OURS), st.binary(max_size=300)),
                     max_size=6), accept_first=st.booleans())
def test_our_records_with_any_body(recs: list[tuple[int, bytes]], accept_first: bool) -> None:
    rcv = ReceiverChannel(Config(), 0)
    if accept_first:
        recs.insert(0, (wire.REC_REMUS_ACCEPT, Config().extensions().tokens().encode()))
    try:
        for i, (rtype, body) in enumerate(recs):
            rcv.on_record(Record(layer="libxc", rtype=rtype, length=len(body), body=body,
                                 offset=1000 + i, epoch=3))
    except XenRemusError as exc:
        assert "epoch 3" in str(exc) and "offset 10" in str(exc)
