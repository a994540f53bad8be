"""The sans-IO NBD server core: handshake, options, requests, refusals, framing errors."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.disk_helpers import (
    client_flags,
    go_data,
    option,
    parse_option_replies,
    parse_reply,
    request,
    write_req,
)
from xen_remus.disk import nbd
from xen_remus.disk.nbd import (
    NEED_DATA,
    Closed,
    Event,
    Flush,
    NeedData,
    Read,
    Ready,
    Send,
    ServerConnection,
    Write,
)

SIZE = 1 << 20


def drain(conn: ServerConnection, data: bytes = b"", limit: int = 10_000) -> list[Event]:
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    for _ in range(limit):
        ev = conn.next_event()
        if isinstance(ev, NeedData):
            assert ev is NEED_DATA
            return out
        out.append(ev)
    raise AssertionError("next_event never returned NEED_DATA")


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def in_transmission(size: int = SIZE) -> ServerConnection:
    conn = ServerConnection(size)
    evs = drain(conn, client_flags() + option(nbd.OPT_GO, go_data()))
    assert any(isinstance(e, Ready) for e in evs)
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    evs = drain(ServerConnection(SIZE))
    assert evs == [Send(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT,
                                    nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))]


def test_go_reports_size_and_flush_fua_then_starts_transmission() -> None:
    conn = ServerConnection(SIZE)
    drain(conn)
    evs = drain(conn, client_flags() + option(nbd.OPT_GO, go_data("", (nbd.INFO_BLOCK_SIZE,))))
    replies = parse_option_replies(sent(evs))
    flags = nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA
    assert replies[0] == (nbd.OPT_GO, nbd.REP_INFO,
                          struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, flags))
    assert replies[1] == (nbd.OPT_GO, nbd.REP_INFO, struct.pack(
        ">HIII", nbd.INFO_BLOCK_SIZE, 1, nbd.PREFERRED_BLOCK, nbd.MAX_REQUEST))
    assert replies[2] == (nbd.OPT_GO, nbd.REP_ACK, b"")
    assert evs[-1] == Ready("", SIZE, flags)


def test_info_stays_in_haggling_then_export_name_with_and_without_zeroes() -> None:
    for cflags, tail in ((nbd.FLAG_C_FIXED_NEWSTYLE, bytes(124)),
                         (nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, b"")):
        conn = ServerConnection(SIZE, export="disk0")
        drain(conn)
        evs = drain(conn, client_flags(cflags) + option(nbd.OPT_INFO, go_data("disk0")))
        assert [r[1] for r in parse_option_replies(sent(evs))] == [nbd.REP_INFO, nbd.REP_ACK]
        assert not any(isinstance(e, Ready) for e in evs)
        evs = drain(conn, option(nbd.OPT_EXPORT_NAME, b"disk0"))
        assert sent(evs) == struct.pack(">QH", SIZE, nbd.TRANSMISSION_FLAGS) + tail
        assert evs[-1] == Ready("disk0", SIZE, nbd.TRANSMISSION_FLAGS)


def test_every_other_option_is_unsupported_and_haggling_goes_on() -> None:
    conn = ServerConnection(SIZE)
    drain(conn, client_flags())
    for opt in (3, 4, 5, 8, 9, 10, 11, 12, 0xDEAD):
        evs = drain(conn, option(opt, b"xyz"))
        [(o, rep, _msg)] = parse_option_replies(sent(evs))
        assert (o, rep) == (opt, nbd.REP_ERR_UNSUP)
    assert isinstance(drain(conn, option(nbd.OPT_GO, go_data()))[-1], Ready)


def test_unknown_export_and_malformed_go() -> None:
    conn = ServerConnection(SIZE, export="disk0")
    drain(conn, client_flags())
    evs = drain(conn, option(nbd.OPT_GO, go_data("other")))
    assert [r[1] for r in parse_option_replies(sent(evs))] == [nbd.REP_ERR_UNKNOWN]
    for bad in (b"", b"\0\0\0\x09ab\0\0", go_data("", (0,))[:-1], b"\xff" * 6):
        evs = drain(conn, option(nbd.OPT_GO, bad))
        assert [r[1] for r in parse_option_replies(sent(evs))] == [nbd.REP_ERR_INVALID]
    evs = drain(conn, option(nbd.OPT_EXPORT_NAME, b"other"))
    assert isinstance(evs[-1], Closed) and evs[-1].error and "unknown export" in evs[-1].reason


def test_oversized_option_data_is_skipped_and_refused() -> None:
    conn = ServerConnection(SIZE)
    drain(conn, client_flags())
    big = nbd.MAX_OPTION_DATA + 5
    evs = drain(conn, option(nbd.OPT_GO, b"\0" * big))
    assert [r[1] for r in parse_option_replies(sent(evs))] == [nbd.REP_ERR_INVALID]
    assert isinstance(drain(conn, option(nbd.OPT_GO, go_data()))[-1], Ready)


def test_abort_acks_and_closes_cleanly() -> None:
    conn = ServerConnection(SIZE)
    drain(conn)
    evs = drain(conn, client_flags() + option(nbd.OPT_ABORT))
    assert parse_option_replies(sent(evs)) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]
    assert isinstance(evs[-1], Closed) and not evs[-1].error
    assert drain(conn, b"anything") == []


def test_unknown_client_flags_close() -> None:
    conn = ServerConnection(SIZE)
    drain(conn)
    evs = drain(conn, client_flags(0x80))
    assert isinstance(evs[-1], Closed) and evs[-1].error and "unknown bits" in evs[-1].reason


def test_bad_option_magic_names_its_offset() -> None:
    conn = ServerConnection(SIZE)
    drain(conn)
    evs = drain(conn, client_flags() + b"X" * 16)
    assert isinstance(evs[-1], Closed) and evs[-1].error
    assert "at stream offset 4" in evs[-1].reason


def test_read_write_flush_disc_events() -> None:
    conn = in_transmission()
    data = bytes(range(256)) * 16
    evs = drain(conn, request(nbd.Command.READ, 4096, 512, handle=7)
                + write_req(8192, data, handle=8)
                + write_req(0, b"x" * 512, handle=9, fua=True)
                + request(nbd.Command.FLUSH, handle=10)
                + request(nbd.Command.FLUSH, handle=11, flags=nbd.CMD_FLAG_FUA)
                + request(nbd.Command.DISC, handle=12)
                + request(nbd.Command.READ, 0, 512, handle=13))  # after DISC: ignored
    assert evs == [Read(7, 4096, 512), Write(8, 8192, data, False),
                   Write(9, 0, b"x" * 512, True), Flush(10), Flush(11),
                   Closed("client disconnected (NBD_CMD_DISC)", False)]


def test_refused_requests_get_the_specs_error_and_the_stream_stays_in_sync() -> None:
    conn = in_transmission()
    cases = [
        (request(nbd.Command.READ, SIZE - 512, 1024, handle=1), nbd.EINVAL),  # read past end
        (write_req(SIZE - 512, b"y" * 1024, handle=2), nbd.ENOSPC),  # write past end
        (request(nbd.Command.READ, 0, 0, handle=3), nbd.EINVAL),  # empty
        (request(nbd.Command.READ, 0, 512, handle=4, flags=1 << 2), nbd.EINVAL),  # DF flag
        (request(4, 0, 512, handle=5), nbd.EINVAL),  # TRIM: not advertised
        (request(7, 0, 512, handle=6), nbd.EINVAL),  # BLOCK_STATUS
        (request(0x4242, 0, 0, handle=7), nbd.EINVAL),  # unknown
        (request(nbd.Command.READ, 0, nbd.MAX_REQUEST + 1, handle=8), nbd.EINVAL),
        (request(nbd.Command.FLUSH, handle=9, flags=1 << 5), nbd.EINVAL),
        (request(nbd.Command.READ, 2**64 - 512, 1024, handle=10), nbd.EINVAL),  # wraps
    ]
    for msg, err in cases:
        evs = drain(conn, msg)
        assert len(evs) == 1 and isinstance(evs[0], Send), (msg[:28].hex(), evs)
        assert parse_reply(evs[0].data) == (err, struct.unpack_from(">Q", msg, 8)[0])
    # The refused write's payload was consumed: the next request parses.
    assert drain(conn, request(nbd.Command.READ, 0, 512, handle=99)) == [Read(99, 0, 512)]


def test_an_oversized_write_is_skipped_not_held_then_refused() -> None:
    conn = in_transmission(size=2**40)
    n = nbd.MAX_REQUEST + 4096
    conn.receive_data(request(nbd.Command.WRITE, 0, n, handle=5))
    assert drain(conn) == []
    chunk = b"\0" * (1 << 20)
    fed = 0
    while fed + len(chunk) <= n:
        conn.receive_data(chunk)
        fed += len(chunk)
        assert drain(conn) == []
        assert len(conn._buf) <= 2 * len(chunk)  # skipped, not accumulated
    evs = drain(conn, b"\0" * (n - fed) + request(nbd.Command.READ, 0, 512, handle=6))
    assert len(evs) == 2 and isinstance(evs[0], Send)
    assert parse_reply(evs[0].data) == (nbd.EINVAL, 5)
    assert evs[1] == Read(6, 0, 512)


def test_read_only_export_refuses_writes_with_eperm() -> None:
    conn = ServerConnection(SIZE, flags=nbd.TRANSMISSION_FLAGS | nbd.FLAG_READ_ONLY)
    drain(conn, client_flags() + option(nbd.OPT_GO, go_data()))
    [ev] = drain(conn, write_req(0, b"z" * 512, handle=3))
    assert isinstance(ev, Send) and parse_reply(ev.data) == (nbd.EPERM, 3)


def test_bad_request_magic_closes_naming_the_offset() -> None:
    conn = ServerConnection(SIZE)
    hs = client_flags() + option(nbd.OPT_GO, go_data())
    first = write_req(0, b"a" * 1000, handle=1)
    bad = b"\xde\xad\xbe\xef" + request(nbd.Command.READ, 0, 512)[4:]
    evs = drain(conn, hs + first + bad)
    assert isinstance(evs[-1], Closed) and evs[-1].error
    assert "0xdeadbeef" in evs[-1].reason
    assert f"at stream offset {len(hs) + len(first)}" in evs[-1].reason


def test_eof_inside_a_request_is_an_error_at_a_boundary_it_is_not() -> None:
    conn = in_transmission()
    evs = drain(conn, write_req(0, b"q" * 4096)[:100])
    assert evs == []
    conn.receive_data(b"")
    [ev] = drain(conn)
    assert isinstance(ev, Closed) and ev.error and "inside a message" in ev.reason
    conn = in_transmission()
    conn.receive_data(b"")
    [ev] = drain(conn)
    assert isinstance(ev, Closed) and not ev.error


_REQS = st.one_of(
    st.builds(lambda o, n, h: request(nbd.Command.READ, o, n, h),
              st.integers(0, SIZE), st.integers(0, 8192), st.integers(0, 2**64 - 1)),
    st.builds(lambda o, d, h, f: write_req(o, d, h, f),
              st.integers(0, SIZE), st.binary(min_size=0, max_size=3000),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(lambda h, f: request(nbd.Command.FLUSH, 0, 0, h, f),
              st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1)),
    st.builds(lambda c, o, n, h: request(c, o, n, h),
              st.integers(4, 2**16 - 1), st.integers(0, 2**64 - 1), st.integers(0, 4096),
              st.integers(0, 2**64 - 1)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_REQS, max_size=12), st.data())
def test_any_chunking_gives_the_same_events(reqs: list[bytes], data: st.DataObject) -> None:
    stream = client_flags() + option(nbd.OPT_GO, go_data()) + b"".join(reqs)
    whole = ServerConnection(SIZE)
    expected = drain(whole, stream)
    conn = ServerConnection(SIZE)
    got = drain(conn)
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, max(1, len(stream) - pos)))
        got += drain(conn, stream[pos:pos + n])
        pos += n
    assert got == expected
    # Every request is accounted for: an event for the caller or a reply of its own.
    answered = [e for e in got if isinstance(e, Read | Write | Flush)]
    replies = [e for e in got if isinstance(e, Send)][2:]  # greeting, GO replies
    assert len(answered) + len(replies) == len(reqs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_never_raises(junk: bytes, after_handshake: bool) -> None:
    conn = in_transmission() if after_handshake else ServerConnection(SIZE)
    evs = drain(conn, junk)
    conn.receive_data(b"")
    evs += drain(conn)
    assert isinstance(evs[-1], Closed)
    assert sum(isinstance(e, Closed) for e in evs) == 1
