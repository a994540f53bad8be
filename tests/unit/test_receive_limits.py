"""The receiver's memory ceiling and CPU bounds, piece by piece: what is held and how it is
counted (restore_held.py), the decoder's reassembly buffers and item limit, compressed
records checked before they expand, large records parsed without per-element objects,
and stock libxl's acceptance of libxl records (stream/libxl_rules.py)."""

from __future__ import annotations

import struct
import time

import lz4.block
import numpy as np
import pytest

from xen_remus.channel import compress
from xen_remus.channel.errors import CompressionError
from xen_remus.channel.pagecache import PageCache
from xen_remus.restore_continuous import ContinuousRestore, EpochTooLarge, Refused
from xen_remus.restore_held import COPY_BELOW, SEGMENT, Held
from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E
from xen_remus.stream import libxc_bodies as XC
from xen_remus.stream import records as R
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import StreamEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream

# -- what is held, and its cost ------------------------------------------------------


def test_small_buffers_are_copied_into_one_segment() -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB read from the sender
    views = [memoryview(chunk)[i:i + 8] for i in range(0, 8000, 8)]
    h = Held()
    for v in views:
        h.add(v)
    assert h.nbytes == 8000 and 8000 <= h.cost < 9100  # not 1000 views pinning 64 KiB
    out = h.take()
    assert len(out) == 1 and bytes(out[0]) == chunk[:8000]
    assert h.cost == h.nbytes == 0 and h.take() == []


def test_a_large_buffer_owning_its_backing_is_kept_as_it_is() -> None:
    own = np.zeros(COPY_BELOW + 8, np.uint8)
    h = Held()
    h.add(b"head")
    h.add(own.data)
    h.add(b"tail")
    assert h.cost >= own.nbytes and h.holds(own)
    out = h.take()
    assert [bytes(b) for b in out] == [b"head", bytes(own.nbytes), b"tail"]
    assert id(memoryview(out[1]).obj) == id(own)  # no copy


def test_a_large_view_of_a_much_larger_buffer_is_copied_and_costs_its_length() -> None:
    big = bytes(4 * COPY_BELOW)
    h = Held()
    h.add(memoryview(big)[:COPY_BELOW])
    assert not h.holds(big) and COPY_BELOW <= h.cost < COPY_BELOW * 9 // 8 + 64
    (one,) = h.take()
    assert bytes(one) == big[:COPY_BELOW]


def test_a_view_larger_than_a_segment_is_copied_alone() -> None:
    big = bytes(3 * SEGMENT)
    h = Held()
    h.add(b"x")
    h.add(memoryview(big)[:SEGMENT + 8])
    out = h.take()
    assert [len(b) for b in out] == [1, SEGMENT + 8] and isinstance(out[1], bytes)


def test_two_views_of_one_backing_count_it_once() -> None:
    own = np.zeros(2 * COPY_BELOW, np.uint8)
    h = Held()
    h.add(own.data[:COPY_BELOW])
    h.add(own.data[COPY_BELOW:])
    assert h.cost == own.nbytes and h.nbytes == own.nbytes


def test_many_tiny_records_cost_about_their_bytes() -> None:
    """An epoch of 256 Ki empty optional records (2 MiB) is held in about 2 MiB (as
    views, about 28 bytes of memory per byte)."""
    one = struct.pack("<II", C.REC_TYPE_OPTIONAL | 0x123, 0)
    data = _epochs_around(one * (1 << 18))
    core = ContinuousRestore(True, 64 << 20)
    peak = 0
    for i in range(0, len(data), 1 << 16):
        core.feed(data[i:i + (1 << 16)])
        peak = max(peak, core.cost())
    assert (2 << 20) <= peak < (5 << 19)


# -- the ceiling, in the core ----------------------------------------------------------


def _epochs_around(epoch1: bytes, pv: bool = True) -> bytes:
    """A valid epoch 0, then ``epoch1`` and the close of an epoch (CHECKPOINT...)."""
    data = b"".join(bytes(b) for b in synthetic_stream(
        "xl", pv, [make_epoch([1, 2]), make_epoch([1])], end=False))
    evs = Decoder().feed(data)
    ends = [e.offset for e in evs if type(e).__name__ == "EpochEnd"]
    ckpt = next(e.offset for e in evs if isinstance(e, Record) and e.name == "CHECKPOINT"
                and e.offset > ends[0])
    return data[:ends[0]] + epoch1 + data[ckpt:ends[1]]


def test_a_record_larger_than_the_ceiling_is_refused_at_its_header() -> None:
    hdr = struct.pack("<II", C.REC_TYPE_HVM_CONTEXT, 8 << 20)
    data = _epochs_around(hdr, pv=False)
    core = ContinuousRestore(True, 4 << 20)
    out = core.feed(data[:data.index(hdr) + 8])
    last = out[-1]
    assert isinstance(last, Refused) and isinstance(last.error, StreamError)
    assert "exceeds the receiver's ceiling" in last.reason and "HVM_CONTEXT.length" in last.reason
    assert core.dec.buffers() == [] or all(a.nbytes < 1 << 20 for a in core.dec.buffers())


def test_a_record_being_received_counts_as_it_is_collected() -> None:
    rec = b"".join(bytes(b) for b in E.record(C.REC_TYPE_HVM_CONTEXT, [bytes(3 << 20)]))
    data = _epochs_around(rec + rec, pv=False)
    core = ContinuousRestore(True, 5 << 20)
    out = []
    for i in range(0, len(data), 1 << 16):
        out += core.feed(data[i:i + (1 << 16)])
        if core.finished:
            break
    last = out[-1]
    assert isinstance(last, Refused) and isinstance(last.error, EpochTooLarge)
    assert "HVM_CONTEXT" in last.reason and "epoch 1:" in last.reason


def test_large_reassembly_buffers_are_not_kept_for_reuse() -> None:
    rec = b"".join(bytes(b) for b in E.record(C.REC_TYPE_HVM_CONTEXT, [bytes(12 << 20)]))
    dec = Decoder()
    data = _epochs_around(rec, pv=False)
    for i in range(0, len(data), 1 << 16):
        dec.feed(data[i:i + (1 << 16)])
    assert all(a.nbytes <= 8 << 20 for a in dec.buffers())


# -- compressed records, checked before they expand ----------------------------------


def _claim(pages: int, blob: bytes = b"\0" * 16) -> bytes:
    """The body of a compressed record of ``pages`` new zero pages, pfn checks valid."""
    words = np.arange(pages, dtype="<u8")
    zero = compress.checksums(np.zeros((1, C.PAGE_SIZE), np.uint8))[0]
    return b"".join([struct.pack("<IIIIQ", pages, compress.FLAG_LZ4, pages * C.PAGE_SIZE,
                                 len(blob), compress.words_check(words)),
                     words.tobytes(), bytes(C.pad8(pages)),
                     np.full(pages, zero, "<u8").tobytes(), blob])


@pytest.mark.parametrize("pages,room,msg", [
    ((2 << 30 >> C.PAGE_SHIFT) + 1, None, "over REC_LENGTH_MAX"),  # lz4's 2 GiB limit
    (C.REC_LENGTH_MAX // C.PAGE_SIZE, None, "over REC_LENGTH_MAX"),
    (1024, 1 << 20, "only 1048576 are left under the ceiling"),
])
def test_expansion_is_checked_before_lz4_runs(pages: int, room: int | None, msg: str) -> None:
    dec = compress.Decompressor(PageCache(4))
    t0 = time.process_time()
    with pytest.raises(CompressionError, match=msg) as exc:
        dec.decode(_claim(pages), 5, 4096, room)
    assert time.process_time() - t0 < 1
    assert "offset 4096" in str(exc.value) and "epoch 5" in str(exc.value)


def test_a_valid_record_within_the_room_expands() -> None:
    blob = lz4.block.compress(bytes(8 * C.PAGE_SIZE), store_size=False)
    bufs = compress.Decompressor(PageCache(16)).decode(_claim(8, blob), 1, 0, 1 << 20)
    assert sum(len(b) for b in bufs) == 8 + 8 + 8 * 8 + 8 * C.PAGE_SIZE
    assert struct.unpack_from("<I", bytes(bufs[0]))[0] == C.REC_TYPE_PAGE_DATA


# -- large records parse in time --------------------------------------------------------


@pytest.mark.parametrize("rtype,body", [
    (C.REC_TYPE_HVM_PARAMS, lambda n: struct.pack("<II", (n - 8) // 16, 0) + bytes(n - 8)),
    (C.REC_TYPE_PAGE_DATA, lambda n: struct.pack("<II", 32000, 0) + bytes(8 * 32000)
     + bytes(C.PAGE_SIZE * 32000)),
    (C.REC_TYPE_X86_PV_P2M_FRAMES, lambda n: struct.pack("<II", 0, 1) + bytes(n - 8)),
    (C.REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST, bytes),
    (C.REC_TYPE_HVM_CONTEXT, bytes),
])
def test_a_record_of_128_mib_parses_within_a_second(rtype: int, body: object) -> None:
    n = C.REC_LENGTH_MAX - 8
    data = body(n)  # type: ignore[operator]
    t0 = time.process_time()
    parsed = R.unpack_body("libxc", rtype, data)
    assert time.process_time() - t0 < 1.0
    if rtype == C.REC_TYPE_HVM_PARAMS:
        assert isinstance(parsed, XC.HvmParams) and len(parsed.params) == (n - 8) // 16


def test_hvm_params_round_trip_as_pairs() -> None:
    p = XC.HvmParams([(1, 0x1234), (2, 0xFEED)])
    body = b"".join(bytes(b) for b in p.pack())
    back = XC.HvmParams.unpack(body)
    assert back.params.tolist() == [[1, 0x1234], [2, 0xFEED]]  # type: ignore[union-attr]


# -- stock libxl's acceptance of libxl records ------------------------------------------


def _wire(rtype: int, body: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in E.record(rtype, [body] if body else []))


def _with_libxl_record_at_end(pv: bool, rtype: int, body: bytes, config: str | None = None
                              ) -> bytes:
    """A plain stream with one libxl record inserted before libxl END."""
    data = b"".join(bytes(b) for b in synthetic_stream("xl", pv, [make_epoch([1])]))
    if config is not None:
        old = b'{"c_info": {"name": "guest"}}'
        assert old in data
        data = data.replace(old, config.encode().ljust(len(old)))
    end = len(data) - 8  # libxl END, the last record
    return data[:end] + _wire(rtype, body) + data[end:]


EMU = struct.pack("<II", 2, 0) + b"ctx!"


@pytest.mark.parametrize("pv,rtype,body,config,why", [
    (True, C.LIBXL_EMULATOR_CONTEXT, EMU, None, "for a PV guest"),
    (True, C.LIBXL_EMULATOR_XENSTORE_DATA, struct.pack("<II", 2, 0), None, "for a PV guest"),
    (False, C.LIBXL_EMULATOR_CONTEXT, EMU, '{"b_info": {"type.pvh": {}}}', "PVH guest"),
    (False, C.LIBXL_CHECKPOINT_STATE, struct.pack("<I", 0), None, "COLO's back channel"),
    (False, 0x80000007, b"", None, "optional or not"),
    (False, 0x00000006, b"", None, "optional or not"),
])
def test_what_stock_libxl_refuses_is_refused_in_relay_mode(
        pv: bool, rtype: int, body: bytes, config: str | None, why: str) -> None:
    data = _with_libxl_record_at_end(pv, rtype, body, config)
    with pytest.raises(StreamError, match=why) as exc:
        Decoder(relay=True).feed(data)
    if config is None:  # else the stream's own emulator records are refused first
        assert f"at offset {len(data) - 8 - len(_wire(rtype, body))}" in str(exc.value)


def test_an_hvm_guest_emulator_record_is_taken() -> None:
    for config in (None, '{"c_info": {"type": "hvm"}}', '{"b_info": {"type.hvm": {}}}'):
        data = _with_libxl_record_at_end(False, C.LIBXL_EMULATOR_CONTEXT, EMU, config)
        last = Decoder(relay=True).feed(data)[-1]
        assert isinstance(last, StreamEnd) and last.complete and last.offset == len(data)


def test_verify_keeps_to_the_spec() -> None:
    """``stream verify`` (no relay) takes an optional libxl record, as the spec allows."""
    data = _with_libxl_record_at_end(False, 0x80000007, b"")
    assert Decoder().feed(data)


def test_an_emulator_record_in_a_pv_checkpoint_is_never_acked() -> None:
    data = b"".join(bytes(b) for b in synthetic_stream(
        "xl", True, [make_epoch([1]), make_epoch([1]), make_epoch([2])], end=False))
    evs = Decoder().feed(data)
    ckpt_end = [e.offset for e in evs if isinstance(e, Record) and e.name == "CHECKPOINT_END"]
    at = ckpt_end[1]  # inside epoch 1's checkpoint, before its CHECKPOINT_END
    bad = data[:at] + _wire(C.LIBXL_EMULATOR_CONTEXT, EMU) + data[at:]
    out = ContinuousRestore(True).feed(bad)
    assert [type(d).__name__ for d in out if type(d).__name__ == "Committed"] == ["Committed"]
    assert isinstance(out[-1], Refused) and "for a PV guest" in out[-1].reason
