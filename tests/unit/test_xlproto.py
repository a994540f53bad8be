"""The xl migration handshake, both sides, against each other and against bad peers."""

from __future__ import annotations

import pytest

from xen_remus import xlproto as X


def test_messages_are_stock_xl_bytes() -> None:
    # xl.h: the banner is sent without its NUL (sizeof-1), the others with it (sizeof).
    assert X.BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert len(X.BANNER) == 54
    assert X.READY.endswith(b"\0") and len(X.READY) == 34
    assert X.GO.endswith(b"\0") and len(X.GO) == 44
    assert X.REPORT.endswith(b"\0") and len(X.REPORT) == 39


def feed_bytewise(side: X.SenderSide | X.ReceiverSide, data: bytes) -> list[X.Message]:
    out: list[X.Message] = []
    for i in range(len(data)):
        out += side.feed(data[i:i + 1])
    return out


@pytest.mark.parametrize("status", [0, 3])
def test_plain_migration_handshake_both_sides(status: int) -> None:
    s, r = X.SenderSide(), X.ReceiverSide()
    assert feed_bytewise(s, r.banner()) == [X.Message("banner")]
    assert s.waiting is False
    s.stream_done()
    assert s.feed(r.ready()) == [X.Message("ready message")]
    assert r.feed(s.go()) == [X.Message("GO message")]
    assert feed_bytewise(s, r.report(status)) == [X.Message("success/failure report", status)]
    if status:
        s.expect_resume_permission()
        assert s.feed(r.resume_permission()) == [X.Message("permission for sender to resume")]
    assert not s.waiting


def test_checkpointed_sender_expects_nothing_after_the_banner() -> None:
    s = X.SenderSide(checkpointed=True)
    s.feed(X.BANNER)
    s.stream_done()
    assert not s.waiting
    s.feed(b"x")
    with pytest.raises(X.HandshakeError, match="end of the handshake"):
        s.eof()
    with pytest.raises(X.HandshakeError, match="end of the handshake"):
        X.SenderSide(checkpointed=True).feed(X.BANNER + b"y" * 300)


def test_message_that_arrived_before_it_was_expected() -> None:
    s = X.SenderSide()
    s.feed(X.BANNER)
    s.stream_done()
    s.feed(X.READY)
    s.go()
    assert s.feed(X.REPORT + b"\x07" + X.GO) == [X.Message("success/failure report", 7)]
    assert s.expect_resume_permission() == [X.Message("permission for sender to resume")]


def test_wrong_banner_names_message_and_offset() -> None:
    s = X.SenderSide()
    with pytest.raises(X.HandshakeError) as ei:
        s.feed(b"xl migration receiver READY")
    assert ei.value.what == "banner" and ei.value.offset == 0
    assert "banner at offset 0" in str(ei.value)


def test_wrong_report_after_ready_has_its_channel_offset() -> None:
    s, r = X.SenderSide(), X.ReceiverSide()
    s.feed(r.banner())
    s.stream_done()
    s.feed(r.ready())
    s.go()
    with pytest.raises(X.HandshakeError) as ei:
        s.feed(b"my copy unpause results are NOT")
    assert ei.value.offset == len(X.BANNER) + len(X.READY)
    assert ei.value.what == "success/failure report"


def test_eof_before_message_is_an_error() -> None:
    r = X.ReceiverSide()
    r.ready()
    r.feed(X.GO[:10])
    with pytest.raises(X.HandshakeError, match="GO message"):
        r.eof()


def test_split_messages_in_one_chunk() -> None:
    s = X.SenderSide()
    s.feed(X.BANNER[:5])
    s.stream_done()
    assert s.feed(X.BANNER[5:] + X.READY) == [X.Message("banner"), X.Message("ready message")]


def test_report_status_must_fit_a_byte() -> None:
    with pytest.raises(ValueError):
        X.ReceiverSide().report(256)
