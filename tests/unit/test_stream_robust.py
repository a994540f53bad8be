"""Damaged streams: truncation, bit flips, oversized lengths and fuzzing.

The decoder must reject every damage it can see with a StreamError carrying an offset
inside the stream, never raise anything else, and accept a damaged stream only where the
flipped bit lies in data the spec does not constrain (page contents, blobs, values).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_stream_support import decode, small_stream
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import DomainHeader, EpochEnd, Event, LibxlHeader, StreamEnd, XlHeader
from xen_remus.stream.records import Record

# Between them these two streams carry every record type the layouts use.
STREAMS = [("xl", False, 2), ("libxc", True, 2)]


def _page_offsets(data: bytes) -> set[int]:
    """Offsets inside page contents (PAGE_DATA, SHARED_INFO) but the first of each page."""
    out: set[int] = set()
    for ev in decode(data, checkpointed=True):
        if isinstance(ev, Record) and ev.name in ("PAGE_DATA", "SHARED_INFO"):
            start = ev.offset + 8
            if ev.name == "PAGE_DATA":
                start += 8 + 8 * ev.parse().count
            out.update(range(start, ev.offset + 8 + ev.length))
            out.difference_update(range(start, ev.offset + 8 + ev.length, C.PAGE_SIZE))
    return out


@pytest.mark.parametrize("fmt,pv,epochs", STREAMS)
def test_truncation_at_every_offset(fmt: str, pv: bool, epochs: int) -> None:
    data = small_stream(fmt, pv, epochs)
    for n in range(len(data)):
        with pytest.raises(StreamError) as ei:
            decode(data[:n])
        assert 0 <= ei.value.offset <= n


def test_truncation_of_checkpointed_stream_expected_checkpointed() -> None:
    """With checkpointed=True exactly the epoch boundaries are valid ends (failover)."""
    data = small_stream("libxl", False, 3, end=False)
    boundaries = {e.offset for e in decode(data, checkpointed=True)
                  if isinstance(e, EpochEnd)}
    accepted = set()
    inside_pages = _page_offsets(data)  # same code path as the page's first byte
    for n in range(len(data) + 1):
        if n in inside_pages:
            continue
        try:
            ev = decode(data[:n], checkpointed=True)
        except StreamError as exc:
            assert 0 <= exc.offset <= n
            continue
        assert isinstance(ev[-1], StreamEnd) and not ev[-1].complete
        accepted.add(n)
    assert accepted == boundaries and len(boundaries) == 3


def _free_bits(data: bytes) -> tuple[set[tuple[int, int]], set[int]]:
    """(byte, bit) positions the spec leaves unconstrained in ``data``, and the offsets of
    record headers (whose flips may turn a record into another valid one)."""
    free: set[tuple[int, int]] = set()
    type_fields: set[int] = set()

    def span(a: int, b: int) -> None:
        free.update((i, bit) for i in range(a, b) for bit in range(8))

    for ev in decode(data, checkpointed=True):
        o = ev.offset
        if isinstance(ev, XlHeader):
            span(o + 40, o + 44)  # optional_flags
            free.add((o + 36, 0))  # clearing the JSON flag leaves a valid header
            span(o + 52, o + 52 + len(ev.config) - 1)  # JSON text (re-checked when parsed)
        elif isinstance(ev, LibxlHeader):
            free.add((o + 15, 1))  # legacy-converted flag
        elif isinstance(ev, DomainHeader):
            span(o + 8, o + 16)  # xen_major/minor
        elif isinstance(ev, Record):
            type_fields.update(range(o, o + 8))
            b = o + 8
            body = ev.parse()
            name = ev.name
            if name == "PAGE_DATA":
                n = body.count
                for i in range(n):
                    w = b + 8 + 8 * i
                    span(w, w + 6)
                    free.update((w + 6, bit) for bit in range(4))
                    t = int(body.types[i])
                    for bit in range(4):
                        nt = t ^ (1 << bit)
                        if nt not in C.PFINFO_INVALID and \
                                (nt in C.PFINFO_NO_DATA) == (t in C.PFINFO_NO_DATA):
                            free.add((w + 7, 4 + bit))
                span(b + 8 + 8 * n, b + ev.length)
            elif name in ("X86_TSC_INFO",):
                span(b, b + 20)
            elif name in ("HVM_CONTEXT", "SHARED_INFO", "X86_CPUID_POLICY", "X86_MSR_POLICY"):
                span(b, b + ev.length)
            elif name == "HVM_PARAMS":
                span(b + 8, b + ev.length)
            elif name.startswith("X86_PV_VCPU"):
                span(b, b + 4)
                span(b + 8, b + ev.length)
            elif name == "X86_PV_P2M_FRAMES":
                span(b + 8, b + ev.length)
                for byte in range(8):
                    for bit in range(8):
                        v = list(struct.unpack_from("<II", data, b))
                        v[byte // 4] ^= 1 << (8 * (byte % 4) + bit)
                        if v[0] <= v[1]:
                            free.add((b + byte, bit))
            elif name in ("EMULATOR_CONTEXT", "EMULATOR_XENSTORE_DATA"):
                for bit in range(8):
                    if body.emulator_id ^ (1 << bit) in C.EMULATOR_IDS:
                        free.add((b, bit))
                span(b + 4, b + 8)
                if name == "EMULATOR_CONTEXT":
                    span(b + 8, b + ev.length)
                else:
                    for i in range(b + 8, b + ev.length):
                        for bit in range(8):
                            if data[i] and data[i] ^ (1 << bit):
                                free.add((i, bit))
    return free, type_fields


def _shape(events: list[Event]) -> list[tuple[str, int, int]]:
    return [(type(e).__name__ + getattr(e, "name", ""), e.offset, len(e.wire))
            for e in events]


@pytest.mark.parametrize("fmt,pv,epochs", STREAMS)
def test_bit_flips(fmt: str, pv: bool, epochs: int) -> None:
    """Every bit outside page contents, and a sample of page bits, flipped in turn."""
    data = small_stream(fmt, pv, epochs)
    orig = decode(data, checkpointed=True)
    free, type_fields = _free_bits(data)
    rng = np.random.default_rng(1)
    inside_pages = _page_offsets(data)
    free_bytes = {i for i, _bit in free if all((i, b) in free for b in range(8))}
    # Every byte that has a constrained bit; a sample of wholly free bytes.
    positions = [i for i in range(len(data)) if i not in free_bytes
                 or (i not in inside_pages and rng.random() < 0.2) or rng.random() < 0.002]
    accepted_free = 0
    for i in positions:
        for bit in range(8):
            b = bytearray(data)
            b[i] ^= 1 << bit
            try:
                ev = decode(bytes(b), checkpointed=True)
            except StreamError as exc:
                assert 0 <= exc.offset <= len(data)
                assert (i, bit) not in free or _constrained_anyway(data, i, bit), \
                    f"flip of free bit {bit} at {i} rejected: {exc}"
                continue
            if (i, bit) in free:
                accepted_free += 1
                assert _shape(ev) == _shape(orig), f"flip at {i}.{bit} changed framing"
            else:
                # Only a record header may turn into another valid one (a blob's length
                # reaching a later record boundary, a type into another of that size),
                # and then the decoder must report the new type or length.
                assert i in type_fields, f"flip of constrained bit {bit} at {i} accepted"
                rec = next(e for e in ev if e.offset <= i < e.offset + 8
                           and isinstance(e, Record))
                old = next(e for e in orig if e.offset == rec.offset and isinstance(e, Record))
                assert (rec.rtype, rec.length) != (old.rtype, old.length)
    assert accepted_free > 50


def _constrained_anyway(data: bytes, i: int, bit: int) -> bool:
    """Free bits whose flip the decoder may still reject: JSON text."""
    return data[:4] == C.XL_MAGIC[:4] and 52 <= i < 52 + struct.unpack_from("<I", data, 48)[0]


@pytest.mark.parametrize("fmt", ["xl", "libxc"])
def test_oversized_lengths(fmt: str) -> None:
    data = small_stream(fmt, False, 2)
    recs = [e for e in decode(data) if isinstance(e, Record)]
    for rec in recs:
        for length in (C.REC_LENGTH_MAX + 1, 0xFFFFFFFF):
            b = bytearray(data)
            struct.pack_into("<I", b, rec.offset + 4, length)
            dec = Decoder()
            with pytest.raises(StreamError) as ei:
                dec.feed(bytes(b[:rec.offset + 16]))  # fails on the header alone
            assert (ei.value.record, ei.value.field, ei.value.offset) == \
                (rec.name, "length", rec.offset + 4)
        # A length that over-reaches the stream is a clean truncation.
        b = bytearray(data)
        struct.pack_into("<I", b, rec.offset + 4, C.REC_LENGTH_MAX)
        with pytest.raises(StreamError):
            decode(bytes(b))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_decoder(data: st.DataObject) -> None:
    """Random edits (overwrite, insert, delete) of valid streams, random chunking."""
    fmt = data.draw(st.sampled_from(["xl", "libxl", "libxc"]))
    base = bytearray(small_stream(fmt, data.draw(st.booleans()), data.draw(st.integers(1, 3))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base)))
        op = data.draw(st.sampled_from(["set", "ins", "del", "u32"]))
        if op == "set" and pos < len(base):
            base[pos] = data.draw(st.integers(0, 255))
        elif op == "ins":
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "del":
            del base[pos:pos + data.draw(st.integers(1, 16))]
        elif pos + 4 <= len(base):
            struct.pack_into("<I", base, pos, data.draw(st.sampled_from(
                [0, 1, 7, 8, 0xFFFFFFFF, C.REC_LENGTH_MAX, 0x80000000, 4096])))
    chunk = data.draw(st.sampled_from([0, 1, 5, 64, 4096]))
    try:
        ev = decode(bytes(base), chunk, checkpointed=data.draw(st.sampled_from(
            [None, True, False])))
    except StreamError as exc:
        assert 0 <= exc.offset <= len(base)
        assert str(exc.offset) in str(exc)
        return
    assert isinstance(ev[-1], StreamEnd)
    assert b"".join(bytes(e.wire) for e in ev) == bytes(base)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([None, "xl", "libxl", "libxc"]))
def test_fuzz_random_bytes(blob: bytes, fmt: str | None) -> None:
    try:
        decode(blob, 7, fmt=fmt)
    except StreamError as exc:
        assert 0 <= exc.offset <= len(blob)
