"""Round trips and the spec's rules, record by record (xen_remus.stream)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_stream_support import decode, small_stream
from xen_remus.stream import bodies as B
from xen_remus.stream import consts as C
from xen_remus.stream import encoder as E
from xen_remus.stream import libxc_bodies as XC
from xen_remus.stream import libxl_bodies as XL
from xen_remus.stream import records as R
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import (
    DomainHeader,
    EpochEnd,
    ImageHeader,
    LibxlHeader,
    StreamEnd,
    XlHeader,
)
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=64)


def _roundtrip(layer: str, rtype: int, body: Any) -> Any:
    wire = b"".join(bytes(b) for b in E.record(rtype, body))
    assert len(wire) % 8 == 0
    t, length = struct.unpack_from("<II", wire)
    assert t == rtype and len(wire) == 8 + C.pad8(length)
    assert not any(wire[8 + length:])
    return R.unpack_body(layer, rtype, wire[8:8 + length])


def _norm(obj: Any) -> Any:
    """Comparable form of a body (numpy arrays and memoryviews to lists/bytes)."""
    out = {}
    for k, v in vars(obj).items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, memoryview | bytearray):
            v = bytes(v)
        elif isinstance(v, list) and (not v or not isinstance(v[0], tuple)) and k == "data":
            v = b"".join(bytes(x) for x in v)
        out[k] = v
    return out


page_types = st.sampled_from(sorted(C.PFINFO_NAMES))


@st.composite
def page_data(draw: Any) -> XC.PageData:
    n = draw(st.integers(1, 12))
    pfns = draw(st.lists(st.integers(0, C.PFN_MASK), min_size=n, max_size=n))
    types = draw(st.lists(page_types, min_size=n, max_size=n))
    ndata = sum(1 for t in types if t not in C.PFINFO_NO_DATA)
    pages = [bytes([draw(st.integers(0, 255))]) * 4096 for _ in range(ndata)]
    return XC.PageData.make(pfns, types, pages)


BODIES: list[tuple[str, int, Any]] = [
    ("libxc", C.REC_TYPE_PAGE_DATA, page_data()),
    ("libxc", C.REC_TYPE_X86_PV_INFO,
     st.sampled_from([(4, 3), (8, 4)]).map(lambda wl: XC.X86PvInfo(*wl))),
    ("libxc", C.REC_TYPE_X86_PV_P2M_FRAMES,
     st.tuples(u32, u32, st.lists(u64, min_size=1, max_size=8)).map(
         lambda t: XC.X86PvP2mFrames(min(t[:2]), max(t[:2]), np.array(t[2], np.uint64)))),
    *[("libxc", rt, st.builds(XC.X86PvVcpu, u32, blob)) for rt in (
        C.REC_TYPE_X86_PV_VCPU_BASIC, C.REC_TYPE_X86_PV_VCPU_EXTENDED,
        C.REC_TYPE_X86_PV_VCPU_XSAVE)],
    ("libxc", C.REC_TYPE_X86_PV_VCPU_MSRS, st.builds(
        XC.X86PvVcpuMsrs, u32, st.binary(max_size=4).map(lambda b: b * 16))),
    ("libxc", C.REC_TYPE_SHARED_INFO, st.binary(min_size=1, max_size=8).map(
        lambda b: XC.SharedInfo((b * 4096)[:4096]))),
    ("libxc", C.REC_TYPE_X86_TSC_INFO, st.builds(XC.X86TscInfo, u32, u32, u64, u32)),
    ("libxc", C.REC_TYPE_HVM_CONTEXT, st.binary(min_size=1, max_size=64).map(XC.HvmContext)),
    ("libxc", C.REC_TYPE_HVM_PARAMS, st.lists(st.tuples(u64, u64), max_size=6).map(
        XC.HvmParams)),
    ("libxc", C.REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST,
     st.lists(u64, max_size=8).map(lambda p: XC.PfnList(np.array(p, np.uint64)))),
    ("libxc", C.REC_TYPE_X86_CPUID_POLICY, st.binary(max_size=3).map(
        lambda b: XC.X86CpuidPolicy(b * 24))),
    ("libxc", C.REC_TYPE_X86_MSR_POLICY, st.binary(max_size=3).map(
        lambda b: XC.X86MsrPolicy(b * 16))),
    *[("libxc", rt, st.just(B.Empty())) for rt in (
        C.REC_TYPE_END, C.REC_TYPE_VERIFY, C.REC_TYPE_CHECKPOINT, C.REC_TYPE_STATIC_DATA_END)],
    ("libxl", C.LIBXL_EMULATOR_XENSTORE_DATA, st.builds(
        XL.EmulatorXenstoreData.from_pairs,
        st.lists(st.tuples(st.text("abc/", min_size=1, max_size=8),
                           st.text("xyz0", max_size=8)), max_size=4),
        st.sampled_from(C.EMULATOR_IDS), u32)),
    ("libxl", C.LIBXL_EMULATOR_CONTEXT, st.builds(
        XL.Emulator, st.sampled_from(C.EMULATOR_IDS), u32, blob)),
    ("libxl", C.LIBXL_CHECKPOINT_STATE, st.sampled_from(sorted(C.CHECKPOINT_STATES)).map(
        XL.CheckpointState)),
    *[("libxl", rt, st.just(B.Empty())) for rt in (
        C.LIBXL_END, C.LIBXL_LIBXC_CONTEXT, C.LIBXL_CHECKPOINT_END)],
]


def test_every_record_type_has_a_round_trip() -> None:
    covered = {(layer, rt) for layer, rt, _ in BODIES}
    assert covered == set(R.BODY_TYPES) - {("libxc", C.REC_TYPE_TOOLSTACK)}


@pytest.mark.parametrize("layer,rtype,strategy", BODIES,
                         ids=[f"{layer}-{R.record_name(layer, rt)}" for layer, rt, _ in BODIES])
@FAST
@given(data=st.data())
def test_record_round_trip(layer: str, rtype: int, strategy: Any, data: Any) -> None:
    body = data.draw(strategy)
    back = _roundtrip(layer, rtype, body)
    assert type(back) is type(body)
    assert _norm(back) == _norm(body)


@FAST
@given(config=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
       optf=u32)
def test_headers_round_trip(config: dict[str, int], optf: int) -> None:
    import json
    xl = XlHeader.with_config(json.dumps(config))
    xl.optional_flags = optf
    back = XlHeader.unpack(xl.pack())
    assert back == xl and back.config_json() == config
    for hdr in (LibxlHeader(options=C.LIBXL_OPT_LEGACY), ImageHeader(version=2),
                ImageHeader(version=3), DomainHeader(type=C.DHDR_TYPE_X86_PV, xen_major=4,
                                                     xen_minor=optf & 0xFFFF)):
        assert type(hdr).unpack(hdr.pack()) == hdr


@st.composite
def streams(draw: Any) -> tuple[bytes, dict[str, Any]]:
    fmt = draw(st.sampled_from(["xl", "libxl", "libxc"]))
    pv = draw(st.booleans())
    version = draw(st.sampled_from([2, 3]))
    nep = draw(st.integers(1, 4))
    eps = []
    for n in range(nep):
        pfns = sorted(draw(st.sets(st.integers(0, 5000), min_size=0 if n else 1,
                                   max_size=20)))
        types = draw(st.lists(page_types, min_size=len(pfns), max_size=len(pfns)))
        eps.append(make_epoch(pfns, types, seed=n))
    end = draw(st.booleans()) if nep > 1 else True
    batch = draw(st.integers(1, 8))
    data = b"".join(bytes(b) for b in synthetic_stream(fmt, pv, eps, version, end=end,
                                                       batch=batch))
    return data, {"fmt": fmt, "epochs": eps, "end": end}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=streams(), chunk=st.sampled_from([0, 1, 3, 8, 100, 4096, 5000]))
def test_stream_round_trip(s: tuple[bytes, dict[str, Any]], chunk: int) -> None:
    data, info = s
    events = decode(data, chunk, checkpointed=True)
    # Every byte belongs to exactly one event, in order, at its offset.
    pos = 0
    for ev in events:
        assert ev.offset == pos
        pos += len(ev.wire)
    assert b"".join(bytes(ev.wire) for ev in events) == data
    assert isinstance(events[-1], StreamEnd) and events[-1].complete == info["end"]
    eps = info["epochs"]
    nckpt = len(eps) - 1 if info["end"] else len(eps)
    if len(eps) == 1:
        nckpt = 0
    assert [e.epoch for e in events if isinstance(e, EpochEnd)] == list(range(nckpt))
    # Pages per epoch come back exactly.
    for n, ep in enumerate(eps):
        pds = [e.parse() for e in events if isinstance(e, Record) and e.epoch == n
               and e.layer == "libxc" and e.rtype == C.REC_TYPE_PAGE_DATA]
        got_pfns = np.concatenate([p.pfns for p in pds]) if pds else np.zeros(0, np.uint64)
        got_types = np.concatenate([p.types for p in pds]) if pds else np.zeros(0, np.uint8)
        assert got_pfns.tolist() == ep.pfns.tolist()
        assert got_types.tolist() == ep.types.tolist()
        assert b"".join(bytes(p.page_bytes()) for p in pds) == b"".join(ep.pages)


def test_zero_copy_when_a_record_fits_in_the_chunk() -> None:
    data = small_stream("libxc", epochs=1)
    events = Decoder().feed(data)
    page = next(e for e in events if isinstance(e, Record) and e.name == "PAGE_DATA")
    assert isinstance(page.body, memoryview) and page.body.obj is data
    assert page.parse().page_bytes().obj is data


# -- the spec's rules, each with the record, field and offset it must name ---------------

def _records(data: bytes) -> list[Record]:
    return [e for e in decode(data, checkpointed=True) if isinstance(e, Record)]


def _at(data: bytes, name: str, nth: int = 0) -> int:
    return [r.offset for r in _records(data) if r.name == name][nth]


def _expect(data: bytes, record: str | None, field: str | None, offset: int,
            checkpointed: bool | None = None, fmt: str | None = None) -> StreamError:
    with pytest.raises(StreamError) as ei:
        decode(data, fmt=fmt, checkpointed=checkpointed)
    err = ei.value
    assert (err.record, err.field, err.offset) == (record, field, offset), str(err)
    assert str(offset) in str(err) and (field or "") in str(err)
    return err


def _patch(data: bytes, off: int, fmt: str, *vals: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, *vals)
    return bytes(b)


def _insert(data: bytes, off: int, buffers: list[Any]) -> bytes:
    return data[:off] + b"".join(bytes(b) for b in buffers) + data[off:]


def test_header_rules() -> None:
    xl = small_stream("xl")
    _expect(b"Z" + xl[1:], None, "magic", 0)
    _expect(xl[:5] + b"?" + xl[6:], "xl header", "magic", 0)
    _expect(_patch(xl, 32, "<I", 0x04030201), "xl header", "byteorder", 32)
    _expect(_patch(xl, 36, "<I", 0x7), "xl header", "mandatory_flags", 36)
    _expect(_patch(xl, 36, "<I", 0x1), "xl header", "mandatory_flags", 36)
    _expect(_patch(xl, 44, "<I", C.REC_LENGTH_MAX + 1), "xl header", "optional_data_len", 44)
    bad_json = xl.replace(b'{"c_info"', b'{"c_info"'.replace(b"{", b"["), 1)
    _expect(bad_json, "xl header", "config", 52)
    lx = small_stream("libxl")
    _expect(_patch(lx, 8, ">I", 3), "libxl header", "version", 8)
    _expect(_patch(lx, 12, ">I", 4), "libxl header", "options", 12)
    _expect(_patch(lx, 12, ">I", 1), "libxl header", "options", 12)
    xc = small_stream("libxc")
    _expect(_patch(xc, 0, ">Q", 0), "image header", "marker", 0, fmt="libxc")
    _expect(_patch(xc, 8, ">I", 0x58454E47), "image header", "id", 8)
    _expect(_patch(xc, 12, ">I", 4), "image header", "version", 12)
    _expect(_patch(xc, 16, ">H", 2), "image header", "options", 16)
    _expect(_patch(xc, 20, ">I", 1), "image header", "reserved", 20)
    _expect(_patch(xc, 24, "<I", 3), "domain header", "type", 24)
    _expect(_patch(xc, 28, "<H", 13), "domain header", "page_shift", 28)
    _expect(_patch(xc, 30, "<H", 1), "domain header", "reserved", 30)


def test_body_rules() -> None:
    hvm = small_stream("libxc", epochs=1)
    pd = _at(hvm, "PAGE_DATA")
    _expect(_patch(hvm, pd + 8, "<I", 0), "PAGE_DATA", "count", pd + 8)
    _expect(_patch(hvm, pd + 12, "<I", 1), "PAGE_DATA", "reserved", pd + 12)
    _expect(_patch(hvm, pd + 16 + 8, "<Q", 2 | 1 << 52), "PAGE_DATA", "pfn[1]", pd + 24)
    _expect(_patch(hvm, pd + 16 + 8, "<Q", 2 | 5 << 60), "PAGE_DATA", "pfn[1]", pd + 24)
    # XTAB -> NOTAB: the record now lacks one page of data.
    _expect(_patch(hvm, pd + 16 + 8, "<Q", 2), "PAGE_DATA", "length", pd + 4)
    _expect(_patch(hvm, pd + 8, "<I", 4000), "PAGE_DATA", "count", pd + 8)
    tsc = _at(hvm, "X86_TSC_INFO")
    _expect(_patch(hvm, tsc + 8 + 20, "<I", 9), "X86_TSC_INFO", "reserved", tsc + 28)
    par = _at(hvm, "HVM_PARAMS")
    _expect(_patch(hvm, par + 8, "<I", 3), "HVM_PARAMS", "count", par + 8)
    _expect(_patch(hvm, par + 12, "<I", 3), "HVM_PARAMS", "reserved", par + 12)
    ctx = _at(hvm, "HVM_CONTEXT")  # 16-byte blob, so its padding is the next record's head
    _expect(_patch(hvm, ctx + 4, "<I", 13), "HVM_CONTEXT", "padding", ctx + 8 + 13)
    pol = _at(hvm, "X86_CPUID_POLICY")
    _expect(_patch(hvm, pol + 4, "<I", 44), "X86_CPUID_POLICY", "padding", pol + 52)
    _expect(_patch(hvm, pol + 4, "<I", 32), "X86_CPUID_POLICY", "length", pol + 4)
    pv = small_stream("libxc", pv=True, epochs=1)
    info = _at(pv, "X86_PV_INFO")
    _expect(_patch(pv, info + 8, "<BB", 8, 3), "X86_PV_INFO", "guest_width", info + 8)
    _expect(_patch(pv, info + 10, "<B", 1), "X86_PV_INFO", "reserved", info + 10)
    p2m = _at(pv, "X86_PV_P2M_FRAMES")
    _expect(_patch(pv, p2m + 8, "<I", 600), "X86_PV_P2M_FRAMES", "p2m_start_pfn", p2m + 8)
    vb = _at(pv, "X86_PV_VCPU_BASIC")
    _expect(_patch(pv, vb + 12, "<I", 1), "X86_PV_VCPU_BASIC", "reserved", vb + 12)
    msr = _at(pv, "X86_PV_VCPU_MSRS")
    _expect(_patch(pv, msr + 4, "<I", 16), "X86_PV_VCPU_MSRS", "length", msr + 4)
    shi = _at(pv, "SHARED_INFO")
    _expect(_patch(pv, shi + 4, "<I", 4088), "SHARED_INFO", "length", shi + 4)
    lx = small_stream("libxl", epochs=2)
    emu = _at(lx, "EMULATOR_CONTEXT")
    _expect(_patch(lx, emu + 8, "<I", 7), "EMULATOR_CONTEXT", "emulator_id", emu + 8)
    xs = _at(lx, "EMULATOR_XENSTORE_DATA")
    n = struct.unpack_from("<I", lx, xs + 4)[0]
    _expect(_patch(lx, xs + 8 + n - 1, "<B", 0x41), "EMULATOR_XENSTORE_DATA", "data",
            xs + 8 + n - 1)


def test_type_and_ordering_rules() -> None:
    hvm = small_stream("libxc", epochs=1)
    pd = _at(hvm, "PAGE_DATA")
    _expect(_insert(hvm, pd, E.record(0x13)), "UNKNOWN_0x00000013", "type", pd)
    # An unknown optional record is skipped and reported.
    names = [r.name for r in _records(_insert(hvm, pd, E.record(0x80000013, [b"x"])))]
    assert "OPTIONAL_0x80000013" in names
    _expect(_insert(hvm, pd, E.record(C.REC_TYPE_TOOLSTACK, [b"x"])), "TOOLSTACK", "type", pd)
    _expect(_insert(hvm, pd, E.record(C.REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST)),
            "CHECKPOINT_DIRTY_PFN_LIST", "type", pd)
    _expect(_insert(hvm, pd, E.record(C.REC_TYPE_X86_PV_INFO, XC.X86PvInfo())),
            "X86_PV_INFO", "type", pd)
    _expect(_insert(hvm, pd, E.record(C.REC_TYPE_X86_MSR_POLICY, XC.X86MsrPolicy())),
            "X86_MSR_POLICY", "type", pd)
    _expect(_insert(hvm, pd, E.empty(C.REC_TYPE_STATIC_DATA_END)), "STATIC_DATA_END",
            "type", pd)
    sde = _at(hvm, "STATIC_DATA_END")
    _expect(hvm[:sde] + hvm[sde + 8:], "PAGE_DATA", "type", sde)  # v3 needs it
    pv = small_stream("libxc", pv=True, epochs=1)
    pd = _at(pv, "PAGE_DATA")
    _expect(_insert(pv, pd, E.record(C.REC_TYPE_HVM_CONTEXT, XC.HvmContext(b"x"))),
            "HVM_CONTEXT", "type", pd)
    p2m = _at(pv, "X86_PV_P2M_FRAMES")
    _expect(pv[:p2m] + pv[pd:], "PAGE_DATA", "type", p2m)
    vb = _at(pv, "X86_PV_VCPU_BASIC")
    info = _at(pv, "X86_PV_INFO")
    # v2: no STATIC_DATA_END; dropping PV_INFO makes P2M_FRAMES come first.
    pv2 = small_stream("libxc", pv=True, epochs=1, version=2)
    info2 = _at(pv2, "X86_PV_INFO")
    _expect(pv2[:info2] + pv2[info2 + 16:], "X86_PV_P2M_FRAMES", "type", info2)
    _expect(_insert(pv, vb, E.record(C.REC_TYPE_X86_PV_INFO, XC.X86PvInfo())), "X86_PV_INFO",
            "type", vb)
    assert info < vb
    # VCPU state before any memory.
    _expect(_insert(pv, pd, E.record(C.REC_TYPE_X86_PV_VCPU_BASIC, XC.X86PvVcpu(0, b"c"))),
            "X86_PV_VCPU_BASIC", "type", pd)


def test_layering_rules() -> None:
    lx = small_stream("libxl", epochs=2)
    cpe = _at(lx, "CHECKPOINT_END")
    ck = _at(lx, "CHECKPOINT")
    end = _at(lx, "END", 1)  # libxl END
    # Without its CHECKPOINT, the libxl records that follow are read as libxc records.
    _expect(lx[:ck] + lx[ck + 8:], "X86_PV_INFO", "type", ck)
    # CHECKPOINT_END outside a checkpoint; END inside one; a second LIBXC_CONTEXT.
    _expect(_insert(lx, end, E.empty(C.LIBXL_CHECKPOINT_END)), "CHECKPOINT_END", "type", end)
    _expect(_insert(lx, cpe, E.empty(C.LIBXL_END)), "END", "type", cpe)
    _expect(_insert(lx, cpe, E.empty(C.LIBXL_LIBXC_CONTEXT)), "LIBXC_CONTEXT", "type", cpe)
    _expect(_insert(lx, end + 8, [b"\0" * 8]), None, None, end + 8)
    plain = small_stream("libxl", epochs=1)
    _expect(lx, "CHECKPOINT", "type", ck, checkpointed=False)
    assert isinstance(decode(plain, checkpointed=False)[-1], StreamEnd)
    assert isinstance(decode(plain, checkpointed=True)[-1], StreamEnd)
    # A format given by the caller is enforced.
    _expect(plain, "xl header", "magic", 0, fmt="xl")
    _expect(plain, "image header", "marker", 0, fmt="libxc")


def test_errata_are_accepted() -> None:
    hvm = small_stream("libxc", epochs=1)
    par = _at(hvm, "HVM_PARAMS")
    ctx = _at(hvm, "HVM_CONTEXT")
    tsc = _at(hvm, "X86_TSC_INFO")
    nxt = _at(hvm, "END")
    # HVM_PARAMS before HVM_CONTEXT (the spec's order) as well as Xen's actual order.
    swapped = hvm[:ctx] + hvm[par:nxt] + hvm[ctx:par] + hvm[nxt:]
    assert [r.name for r in _records(swapped)][-3:] == ["HVM_PARAMS", "HVM_CONTEXT", "END"]
    zero = hvm[:par] + b"".join(E.record(C.REC_TYPE_HVM_PARAMS, [])) + hvm[nxt:]
    assert len(_records(zero)[-2].parse().params) == 0
    pv = small_stream("libxc", pv=True, epochs=1)
    vb = _at(pv, "X86_PV_VCPU_BASIC")
    zero_vcpu = _insert(pv, vb, E.record(C.REC_TYPE_X86_PV_VCPU_XSAVE, []))
    assert any(r.name == "X86_PV_VCPU_XSAVE" and r.parse().vcpu_id is None
               for r in _records(zero_vcpu))
    assert tsc < ctx
    # v2 streams: STATIC_DATA_END implied.
    for pv_ in (False, True):
        ev = decode(small_stream("xl", pv=pv_, version=2), checkpointed=True)
        assert isinstance(ev[-1], StreamEnd)


def test_checkpointed_eof() -> None:
    lx = small_stream("libxl", epochs=3, end=False)
    ev = decode(lx, checkpointed=True)
    assert isinstance(ev[-1], StreamEnd) and not ev[-1].complete
    assert [e.epoch for e in ev if isinstance(e, EpochEnd)] == [0, 1, 2]
    err = _expect(lx, None, None, len(lx))
    assert "epoch 2" in str(err)
    dec = Decoder()
    dec.feed(lx)
    assert dec.checkpointed


def test_error_state_is_sticky() -> None:
    dec = Decoder()
    data = small_stream("xl")
    with pytest.raises(StreamError) as e1:
        dec.feed(b"junk")
    with pytest.raises(StreamError) as e2:
        dec.feed(data)
    assert e1.value is e2.value
    # Events decoded before an error in the same feed are kept on the error.
    bad = data + b"\0" * 8
    with pytest.raises(StreamError) as e3:
        Decoder().feed(bad)
    assert isinstance(e3.value.events[-1], StreamEnd)
    assert e3.value.offset == len(data)


@pytest.mark.parametrize("chunk", [3, 1000, 5000])
def test_reassembly_buffer_reuse(chunk: int) -> None:
    """Events dropped at once let the decoder reuse its buffer; events kept stay intact."""
    data = small_stream("libxl", epochs=3)
    dec = Decoder()
    kept = []
    for i in range(0, len(data), chunk):
        for ev in dec.feed(data[i:i + chunk]):
            assert bytes(ev.wire) == data[ev.offset:ev.offset + len(ev.wire)]
            if isinstance(ev, Record) and ev.name == "PAGE_DATA":
                kept.append(ev)  # every other PAGE_DATA event is dropped right away
        if len(kept) % 2:
            kept.pop()
    dec.feed(b"")
    for ev in kept:
        assert bytes(ev.wire) == data[ev.offset:ev.offset + len(ev.wire)]
