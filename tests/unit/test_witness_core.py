"""The witness's sans-IO parts: frames and their authentication (proto.py), the lease
rules (core.py), the records on disk (store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xen_remus.witness import proto as P
from xen_remus.witness.core import Saved, WitnessCore
from xen_remus.witness.store import WitnessStore, WitnessStoreError

KEY = b"k" * 32


def handshake(key_c: bytes = KEY, key_s: bytes = KEY
              ) -> tuple[P.ClientSession, P.ServerSession]:
    c, s = P.ClientSession(key_c), P.ServerSession(key_s, "test")
    assert s.receive(c.hello()) == []
    assert c.receive(s.take_output()) == []
    return c, s


def test_request_and_response_round_trip() -> None:
    c, s = handshake()
    assert c.ready
    req = P.Request(P.ACQUIRE, "gü", 7, "host-b", 10_000)
    assert s.receive(c.request(req)) == [req]
    resp = P.Response(P.BUSY, 0, P.Record("host-a", 6, 1234), "free in 3 s")
    s.respond(resp)
    assert c.receive(s.take_output()) == [resp]


def test_frames_split_anywhere_and_garbage_before_a_magic_is_skipped() -> None:
    c, s = handshake()
    req = P.Request(P.QUERY, "g")
    data = b"junk\x00XRW" + c.request(req) + c.request(req)
    got = []
    for i in range(len(data)):
        got += s.receive(data[i:i + 1])
    assert got == [req, req]
    assert s.reader.skipped == 8


def test_a_replayed_request_is_refused_and_ends_the_session() -> None:
    c, s = handshake()
    frame = c.request(P.Request(P.RENEW, "g", 1, "a", 1000))
    assert len(s.receive(frame)) == 1
    with pytest.raises(P.WitnessProtocolError, match="sequence number 1, expected 2"):
        s.receive(frame)
    with pytest.raises(P.WitnessProtocolError, match="before any HELLO"):
        s.receive(c.request(P.Request(P.QUERY, "g")))


def test_a_request_recorded_in_one_session_does_not_verify_in_another() -> None:
    c1, s = handshake()
    old = c1.request(P.Request(P.RELEASE, "g", 1, "a"))
    c2 = P.ClientSession(KEY)
    s.receive(c2.hello())
    c2.receive(s.take_output())
    with pytest.raises(P.WitnessProtocolError, match="bad MAC"):
        s.receive(old)


def test_a_forged_request_or_response_is_refused() -> None:
    c, s = handshake()
    frame = bytearray(c.request(P.Request(P.ACQUIRE, "g", 1, "a", 1000)))
    frame[12] ^= 1  # the generation
    with pytest.raises(P.WitnessProtocolError, match="bad MAC"):
        s.receive(bytes(frame))
    c, s = handshake()
    s.receive(c.request(P.Request(P.QUERY, "g")))
    s.respond(P.Response(P.GRANTED, 5000))
    out = bytearray(s.take_output())
    out[9] ^= 1
    with pytest.raises(P.WitnessProtocolError, match="bad MAC"):
        c.receive(bytes(out))


def test_another_key_gets_no_session() -> None:
    c, s = P.ClientSession(b"x" * 32), P.ServerSession(KEY, "test")
    with pytest.raises(P.WitnessProtocolError, match="bad MAC"):
        s.receive(c.hello())
    assert s.take_output() == b""


def test_the_client_skips_an_earlier_clients_welcome_and_response() -> None:
    """One stream, many clients one after another (QEMU's chardev): what was meant for a
    killed client reaches the next one first and must not be taken for its own."""
    old, s = handshake()
    s.receive(old.request(P.Request(P.QUERY, "g")))
    s.respond(P.Response(P.GRANTED, 9999))
    stale = s.take_output()
    new = P.ClientSession(KEY)
    s.receive(new.hello())
    assert new.receive(stale[:5] + stale + s.take_output()) == []
    assert new.ready and new.ignored == 1
    s.receive(new.request(P.Request(P.QUERY, "g")))
    s.respond(P.Response(P.INFO))
    assert new.receive(s.take_output()) == [P.Response(P.INFO)]


def test_another_version_is_named() -> None:
    c, s = handshake()
    frame = bytearray(c.request(P.Request(P.QUERY, "g")))
    frame[4] = 2
    with pytest.raises(P.WitnessProtocolError, match="version 2 at offset 48; .* version 1"):
        s.receive(bytes(frame))
    assert s.receive(b"") == []  # skipped: the stream goes on


def test_a_hello_inside_a_frame_cut_short_starts_a_new_session() -> None:
    """A client killed in the middle of a request; the next one's HELLO comes right after
    the partial frame, whose length swallows it: the witness finds it all the same."""
    c, s = handshake()
    partial = c.request(P.Request(P.QUERY, "g"))[:-10]
    c2 = P.ClientSession(KEY)
    with pytest.raises(P.WitnessProtocolError):
        s.receive(partial + c2.hello())
    s.receive(b"")
    assert c2.receive(s.take_output()) == [] and c2.ready


def test_bad_messages_are_named() -> None:
    with pytest.raises(P.WitnessProtocolError, match="REQUEST: ends at offset 3"):
        P.decode_request(b"\x01\x00\x00")
    with pytest.raises(P.WitnessProtocolError, match="unknown op 9"):
        P.decode_request(bytes([9]) + bytes(12) + b"\x01\x00g\x00\x00")
    with pytest.raises(P.WitnessProtocolError, match="no guest name"):
        P.decode_request(bytes([1]) + bytes(12) + b"\x00\x00\x00\x00")
    with pytest.raises(P.WitnessProtocolError, match="guest name of 256 bytes"):
        P.encode_request(P.Request(P.QUERY, "g" * 256))


# -- the lease rules ----------------------------------------------------------------------
def ask(core: WitnessCore, now: float, op: int, gen: int, holder: str,
        dur: int = 10_000) -> P.Response:
    return core.handle(P.Request(op, "g", gen, holder, dur), now)[0]


def test_first_acquire_renew_and_the_granted_duration() -> None:
    core = WitnessCore(grace_s=2.0, cap_ms=20_000)
    r = ask(core, 0.0, P.ACQUIRE, 1, "A", 60_000)
    assert r.status == P.GRANTED and r.duration_ms == 20_000
    assert r.record == P.Record("A", 1, 20_000)
    assert ask(core, 5.0, P.RENEW, 1, "A", 100).duration_ms == 1_000  # at least 1 s
    assert core.handle(P.Request(P.QUERY, "g"), 5.5)[0].record == P.Record("A", 1, 500)


def test_takeover_needs_a_higher_generation_and_the_lease_run_out_plus_grace() -> None:
    core = WitnessCore(grace_s=2.0)
    ask(core, 0.0, P.ACQUIRE, 3, "A")
    busy = ask(core, 5.0, P.ACQUIRE, 4, "B")
    assert busy.status == P.BUSY and "free in 7000 ms" in busy.message
    assert ask(core, 11.9, P.ACQUIRE, 4, "B").status == P.BUSY  # expired, in the grace
    assert ask(core, 12.0, P.ACQUIRE, 4, "B").status == P.GRANTED
    # A never renews or re-takes generation 3 or claims 4 after that.
    assert ask(core, 12.1, P.RENEW, 3, "A").status == P.STALE
    assert ask(core, 12.1, P.ACQUIRE, 3, "A").status == P.STALE
    assert ask(core, 12.1, P.ACQUIRE, 4, "A").status == P.STALE


def test_a_renewing_holder_is_never_overtaken() -> None:
    core = WitnessCore(grace_s=2.0)
    ask(core, 0.0, P.ACQUIRE, 3, "A")
    for t in range(0, 60, 3):
        assert ask(core, float(t), P.RENEW, 3, "A").status == P.GRANTED
        assert ask(core, t + 0.5, P.ACQUIRE, 4, "B").status == P.BUSY


def test_the_primary_claims_the_next_generation_first_and_the_backup_loses() -> None:
    core = WitnessCore()
    ask(core, 0.0, P.ACQUIRE, 3, "A")
    assert ask(core, 1.0, P.ACQUIRE, 4, "A").status == P.GRANTED  # at once: the holder
    late = ask(core, 100.0, P.ACQUIRE, 4, "B")  # even long after A's lease ran out
    assert late.status == P.STALE and late.record is not None and late.record.holder == "A"


def test_a_lower_generation_is_refused_and_an_expired_holder_may_take_it_again() -> None:
    core = WitnessCore()
    ask(core, 0.0, P.ACQUIRE, 5, "A")
    assert ask(core, 1.0, P.ACQUIRE, 4, "A").status == P.STALE
    assert ask(core, 1.0, P.ACQUIRE, 4, "B").status == P.STALE
    assert ask(core, 50.0, P.RENEW, 5, "A").status == P.GRANTED  # nobody took it


def test_release_frees_the_lease_at_once_but_not_its_generation() -> None:
    core = WitnessCore(grace_s=2.0)
    ask(core, 0.0, P.ACQUIRE, 1, "A")
    assert ask(core, 1.0, P.RELEASE, 1, "B").status == P.STALE
    assert ask(core, 1.0, P.RELEASE, 0, "A").status == P.STALE
    resp, saved = core.handle(P.Request(P.RELEASE, "g", 1, "A"), 1.0)
    assert resp.status == P.GRANTED and saved == Saved("A", 1, 10_000, True)
    assert ask(core, 1.0, P.ACQUIRE, 1, "B").status == P.STALE
    assert ask(core, 1.0, P.ACQUIRE, 2, "B").status == P.GRANTED


def test_renew_without_a_lease_is_denied() -> None:
    core = WitnessCore()
    assert ask(core, 0.0, P.RENEW, 1, "A").status == P.DENIED
    assert ask(core, 0.0, P.ACQUIRE, 1, "").status == P.DENIED


def test_only_changes_that_must_outlive_a_restart_are_persisted() -> None:
    core = WitnessCore()
    assert core.handle(P.Request(P.ACQUIRE, "g", 1, "A", 10_000), 0.0)[1] is not None
    assert core.handle(P.Request(P.RENEW, "g", 1, "A", 10_000), 1.0)[1] is None
    assert core.handle(P.Request(P.RENEW, "g", 1, "A", 20_000), 2.0)[1] is not None
    assert core.handle(P.Request(P.ACQUIRE, "g", 2, "A", 20_000), 3.0)[1] is not None


def test_a_restarted_witness_counts_a_restored_lease_from_the_restart() -> None:
    core = WitnessCore(grace_s=2.0)
    core.restore({"g": Saved("A", 3, 10_000)}, 500.0)
    assert ask(core, 511.9, P.ACQUIRE, 4, "B").status == P.BUSY
    assert ask(core, 512.0, P.ACQUIRE, 4, "B").status == P.GRANTED


# -- the store ----------------------------------------------------------------------------
def test_store_round_trip_and_odd_names(tmp_path: Path) -> None:
    store = WitnessStore(tmp_path / "w")
    assert store.load() == {}
    store.put("a/b c", Saved("host A", 2, 5000))
    store.put("g", Saved("B", 9, 1000, True))
    store.put("g", Saved("B", 10, 1000))
    assert WitnessStore(tmp_path / "w").load() == {"a/b c": Saved("host A", 2, 5000),
                                                     "g": Saved("B", 10, 1000)}
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["a%2Fb%20c.lease",
                                                                   "g.lease"]


def test_a_damaged_record_stops_the_witness_naming_it(tmp_path: Path) -> None:
    (tmp_path / "g.lease").write_text("{not json")
    with pytest.raises(WitnessStoreError, match=r"g\.lease"):
        WitnessStore(tmp_path).load()
