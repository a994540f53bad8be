"""The engine's output through the real emitter: a stream the codec's decoder accepts,
whose PAGE_DATA records rebuild the guest's memory; writev copes with short writes."""

from __future__ import annotations

import os
import socket
import threading

from tests.fakes import FakeDomain, FakeGuest
from xen_remus.save.emit import FdEmitter, writev_all
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.stream import consts as C
from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Buffer, StreamEnd, XlHeader
from xen_remus.stream.records import Record


def save_to_bytes(dom: FakeDomain, policy: PrecopyPolicy, config: str | None) -> bytes:
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=drain)
    t.start()
    try:
        out = FdEmitter(w, config, what="test stream")
        SaveEngine(dom, FakeGuest(dom), out, policy).run()
    finally:
        os.close(w)
        t.join(10)
        os.close(r)
    return b"".join(chunks)


def decode(data: bytes, step: int = 7919) -> list[object]:
    dec = Decoder()
    events: list[object] = []
    for i in range(0, len(data), step):  # odd chunk size: records split across feeds
        events += dec.feed(data[i:i + step])
    events += dec.feed(b"")
    return events


def test_live_save_stream_decodes_and_rebuilds_memory() -> None:
    dom = FakeDomain(2100)
    dom.types[[4, 5]] = [0xD, 0xF]

    def guest_runs(r: int) -> None:
        for p in range(0, 2100, 5 + 10 * r):
            dom.write(p, 50 + r)

    dom.on_clean = guest_runs
    data = save_to_bytes(dom, PrecopyPolicy(max_rounds=3, target_dirty=20),
                         '{"c_info": {"name": "g"}}')
    events = decode(data)
    assert isinstance(events[0], XlHeader) and events[0].config_json() == {"c_info": {"name": "g"}}
    assert isinstance(events[-1], StreamEnd)
    mem: dict[int, bytes] = {}
    libxl = [e.name for e in events if isinstance(e, Record) and e.layer == "libxl"]
    assert libxl == ["LIBXC_CONTEXT", "END"]
    for e in events:
        if isinstance(e, Record) and e.rtype == C.REC_TYPE_PAGE_DATA and e.layer == "libxc":
            pd = e.parse()
            pages = pd.page_bytes()
            n = 0
            for pfn, t in zip(pd.pfns, pd.types, strict=True):
                if t < 0xD:
                    mem[int(pfn)] = bytes(pages[n * PAGE_SIZE:(n + 1) * PAGE_SIZE])
                    n += 1
    for pfn in range(2100):
        if pfn in (4, 5):
            assert pfn not in mem
            continue
        assert mem[pfn] == bytes(dom.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]), pfn


def test_writev_all_survives_short_writes_and_many_buffers() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bufs: list[Buffer] = [
        bytes([i % 256]) * (1 + i % 3000) for i in range(2500)]
    want = b"".join(bufs)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(want):
            chunk = b.recv(1000)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    writev_all(a.fileno(), bufs)
    t.join(10)
    a.close()
    b.close()
    assert bytes(got) == want


def test_writev_error_names_offset() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        writev_all(w, [b"x" * 10], offset=123, what="file F")
    except Exception as exc:
        assert type(exc).__name__ == "StreamWriteError"
        assert "file F at offset 123" in str(exc) and "errno 32" in str(exc)
    else:
        raise AssertionError("writing to a closed pipe succeeded")
    finally:
        os.close(w)
