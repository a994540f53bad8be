"""An HVM guest's device model in the save: the real DeviceModel against a fake qemu-xen
QMP socket, the refusals, and the engine and epoch loop with a fake device model: where
QEMU stops and runs again relative to the guest, and where its records go in the stream."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any, cast

import pytest

from tests.fakes import (
    BufferingEmitter,
    FakeDeviceModel,
    FakeDomain,
    FakeGuest,
    FakeQmpServer,
    NoDevices,
    RecordingEmitter,
)
from tests.unit.test_protect_loop import Sink, primary, start_backup
from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.restore_continuous import Outcome
from xen_remus.save.devmodel import (
    DeviceModel,
    DeviceModelError,
    UnsupportedGuest,
    check_hvm_guest,
    physmap_data,
)
from xen_remus.save.emit import FdEmitter
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import RemusLoop
from xen_remus.stream import consts as C
from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import EpochEnd, StreamEnd
from xen_remus.stream.libxl_bodies import Emulator, EmulatorXenstoreData
from xen_remus.stream.records import Record
from xen_remus.xen import structs as S
from xen_remus.xen.qmp import QmpCommandError, QmpError

HVM_CONFIG = '{"c_info": {"name": "g", "type": "hvm"}}'


def parse(rec: Any) -> tuple[int, Emulator]:
    """(type, body) of one framed emulator record."""
    raw = b"".join(bytes(b) for b in rec)
    rtype, length = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:8], "little")
    assert len(raw) == 8 + (length + 7) // 8 * 8
    body = raw[8:8 + length]
    cls = EmulatorXenstoreData if rtype == C.LIBXL_EMULATOR_XENSTORE_DATA else Emulator
    return rtype, cls.unpack(body)


class Store:
    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys

    def read(self, path: str) -> str | None:
        return self.keys.get(path)

    def list(self, path: str) -> list[str]:
        pre = path.rstrip("/") + "/"
        return sorted({k[len(pre):].split("/")[0] for k in self.keys if k.startswith(pre)})


PHYSMAP = {
    "/local/domain/0/device-model/5/physmap/f0000000/start_addr": "f0000000",
    "/local/domain/0/device-model/5/physmap/f0000000/size": "800000",
    "/local/domain/0/device-model/5/physmap/f0000000/name": "vga.vram",
    "/local/domain/0/device-model/5/state": "running",
}


# -- DeviceModel over QMP --------------------------------------------------------------------

@pytest.fixture
def qemu(tmp_path: Path) -> Any:
    srv = FakeQmpServer(str(tmp_path / "qmp-libxl-5"), state=b"QEVM\0\0\0\3" + bytes(5000))
    yield srv
    srv.close()


def devmodel(tmp_path: Path, store: Store | None = None) -> DeviceModel:
    return DeviceModel(5, store or Store(PHYSMAP), socket=str(tmp_path / "qmp-libxl-5"),
                       save_path=tmp_path / "run" / "qemu-save.5", timeout=5)


@pytest.mark.parametrize("handover", [False, True])
def test_suspend_stops_saves_and_frames_the_records(tmp_path: Path, qemu: Any,
                                                    handover: bool) -> None:
    dm = devmodel(tmp_path)
    dm.handover = handover
    dm.logdirty(True)
    dm.suspend()
    assert not qemu.running and dm.stopped
    assert [c for c in qemu.commands if c[0] != "qmp_capabilities"] == [
        ("xen-set-global-dirty-log", {"enable": True}), ("stop", {}), ("add-fd", {}),
        ("xen-save-devices-state", {"filename": "/dev/fdset/0", "live": handover}),
        ("remove-fd", {"fdset-id": 0})]
    assert not qemu.fdsets, "the fdset stays in QEMU"
    recs = [parse(r) for r in dm.records()]
    assert [t for t, _ in recs] == [C.LIBXL_EMULATOR_XENSTORE_DATA, C.LIBXL_EMULATOR_CONTEXT]
    xs = cast(EmulatorXenstoreData, recs[0][1])
    assert xs.emulator_id == C.EMULATOR_QEMU_UPSTREAM and xs.index == 0
    assert xs.pairs() == [("physmap/f0000000/start_addr", "f0000000"),
                          ("physmap/f0000000/size", "800000"),
                          ("physmap/f0000000/name", "vga.vram")]
    ctx = recs[1][1]
    assert ctx.emulator_id == 2 and bytes(ctx.data) == qemu.state
    dm.resume()
    assert qemu.running and not dm.stopped
    dm.close()
    assert not (tmp_path / "run" / "qemu-save.5").exists()


def test_each_checkpoint_saves_the_state_anew(tmp_path: Path, qemu: Any) -> None:
    dm = devmodel(tmp_path, Store({}))
    dm.suspend()
    qemu.state = b"short"  # a shorter state: nothing of the longer one may remain
    dm.resume()
    dm.suspend()
    [rec] = dm.records()  # no physmap keys: no EMULATOR_XENSTORE_DATA
    assert bytes(parse(rec)[1].data) == b"short"
    assert qemu.connections == 3  # one short connection per step


def test_a_failed_save_names_the_command_and_removes_the_fdset(tmp_path: Path,
                                                               qemu: Any) -> None:
    qemu.fail["xen-save-devices-state"] = ("GenericError", "An IO error has occurred")
    dm = devmodel(tmp_path)
    with pytest.raises(QmpCommandError, match="xen-save-devices-state failed: GenericError: "
                       "An IO error has occurred"):
        dm.suspend()
    assert dm.stopped and not qemu.fdsets


def test_an_empty_state_is_an_error(tmp_path: Path, qemu: Any) -> None:
    qemu.state = b""
    with pytest.raises(DeviceModelError, match="domain 5: the device model saved an empty "
                       "state"):
        devmodel(tmp_path).suspend()


def test_no_qemu_is_named(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="qmp-libxl-5"):
        devmodel(tmp_path).suspend()


def test_an_incomplete_physmap_entry_is_refused() -> None:
    keys = dict(PHYSMAP)
    del keys["/local/domain/0/device-model/5/physmap/f0000000/size"]
    with pytest.raises(DeviceModelError, match="physmap/f0000000/size is missing"):
        physmap_data(Store(keys), 5)
    assert physmap_data(Store({}), 5) == b""


# -- which HVM guests ------------------------------------------------------------------------

def params(callback: int = 0x0200000000000005, s_state: int = 0) -> Any:
    values = {S.HVM_PARAM_CALLBACK_IRQ: callback, S.HVM_PARAM_ACPI_S_STATE: s_state}
    return values.__getitem__


QEMU_XEN = {"/libxl/5/dm-version": "qemu_xen"}


def test_a_guest_with_pv_drivers_and_qemu_xen_is_taken() -> None:
    check_hvm_guest(5, "h1", Store(QEMU_XEN), params())
    check_hvm_guest(5, "h1", Store(QEMU_XEN | {"/local/domain/5/image/device-model-domid":
                                               "0"}), params())


@pytest.mark.parametrize("keys, p, why", [
    ({}, params(), r"domain 5 \(h1\) is an HVM guest whose device model is not recorded"),
    ({"/libxl/5/dm-version": "qemu_xen_traditional"}, params(),
     "device model is qemu_xen_traditional .* only qemu-xen"),
    (QEMU_XEN | {"/local/domain/5/image/device-model-domid": "6"}, params(),
     "device model in stub domain 6"),
    (QEMU_XEN, params(callback=0), r"domain 5 \(h1\) is an HVM guest without PV drivers "
     r"\(HVM_PARAM_CALLBACK_IRQ is 0"),
    (QEMU_XEN, params(s_state=3), "in ACPI sleep state S3"),
])
def test_refused_hvm_guests(keys: dict[str, str], p: Any, why: str) -> None:
    with pytest.raises(UnsupportedGuest, match=why):
        check_hvm_guest(5, "h1", Store(keys), p)


# -- the engine ------------------------------------------------------------------------------

def hvm_engine(live: bool, fail: str = "") -> tuple[FakeDomain, FakeDeviceModel,
                                                      RecordingEmitter, SaveEngine]:
    dom = FakeDomain(300)
    dm = FakeDeviceModel(dom.calls, fail=fail)
    out = RecordingEmitter()
    policy = PrecopyPolicy(2, 4) if live else PrecopyPolicy(0)
    return dom, dm, out, SaveEngine(dom, FakeGuest(dom), out, policy, dm=dm)


def test_live_save_orders_qemu_around_the_guest() -> None:
    dom, dm, out, eng = hvm_engine(live=True)
    eng.run()
    assert dom.calls == ["logdirty_enable", "dm_logdirty(True)", "clean(final=False)",
                         "suspend", "dm_stop", "dm_save", "clean(final=True)",
                         "logdirty_off", "dm_logdirty(False)"]
    assert out.events[-2:] == [("end", 0), ("libxl", C.LIBXL_EMULATOR_CONTEXT)]
    assert out.emulator == [_ctx(b"dm-state-1")]
    assert dom.suspended and not dm.running  # left as xl save leaves it, for destroy
    eng.resume()  # -c: QEMU runs again before the guest
    assert dom.calls[-2:] == ["dm_cont", "resume"] and dm.running


def _ctx(state: bytes) -> bytes:
    return (2).to_bytes(4, "little") + bytes(4) + state


def test_plain_save_stops_qemu_without_dirty_logging() -> None:
    """And the holes of an HVM guest's pfn space (here the VGA hole, 0xA0-0xBF) go as
    XTAB, without data, as libxc sends them."""
    dom, dm, out, eng = hvm_engine(live=False)
    dom.types[0xA0:0xC0] = C.PFINFO_XTAB
    eng.run()
    assert dom.calls == ["suspend", "dm_stop", "dm_save"]
    assert sorted(out.types) == list(range(300))
    assert {p for p, t in out.types.items() if t == C.PFINFO_XTAB} == set(range(0xA0, 0xC0))
    assert sorted(out.pages) == [p for p in range(300) if not 0xA0 <= p < 0xC0]


def test_qemu_writes_before_it_stops_are_in_the_final_pages() -> None:
    """QEMU may still write guest memory (an I/O completing) after the guest suspended,
    until it stops: those pages must reach the stream with the state that wrote them."""
    dom, dm, out, eng = hvm_engine(live=True)
    stop = dm.suspend

    def dma_then_stop() -> None:
        dom.mem[77 * PAGE_SIZE:78 * PAGE_SIZE] = b"\xee" * PAGE_SIZE
        dom.dirty.add(77)  # QEMU's write is logged dirty (xen-set-global-dirty-log)
        stop()

    dm.suspend = dma_then_stop  # type: ignore[method-assign]
    eng.run()
    assert out.pages[77] == b"\xee" * PAGE_SIZE


@pytest.mark.parametrize("fail", ["dm_stop", "dm_save", "dm_logdirty(True)"])
def test_a_device_model_failure_leaves_guest_and_qemu_running(fail: str) -> None:
    dom, dm, out, eng = hvm_engine(live=True, fail=fail)
    with pytest.raises(QmpCommandError, match=re.escape(fail)):
        eng.run()
    assert not dom.suspended and dm.running and not dom.logdirty and not dm.dirty_log
    if fail != "dm_logdirty(True)":
        assert dom.calls[-4:] == ["logdirty_off", "dm_logdirty(False)", "dm_cont", "resume"]


def test_the_guest_resumes_even_if_qemu_does_not() -> None:
    dom, dm, out, eng = hvm_engine(live=False, fail="dm_cont")
    dom.fail_suspend = False
    eng.suspend()
    eng.undo()  # a later failure: QEMU refuses cont, the guest is resumed all the same
    assert dom.calls[-2:] == ["dm_cont", "resume"] and not dom.suspended


def test_each_epoch_stops_qemu_and_carries_its_state() -> None:
    dom = FakeDomain(64)
    dm = FakeDeviceModel(dom.calls)
    out = BufferingEmitter()
    eng = SaveEngine(dom, FakeGuest(dom), out, PrecopyPolicy(1, 4), dm=dm)
    link = _StockLink()
    loop = RemusLoop(eng, out, link, NoDevices(), 0.0,
                     on_epoch=lambda st: loop.stop() if st.epoch == 2 else None)
    loop.run()
    ends = [i for i, e in enumerate(out.events) if e == ("checkpoint", 0)]
    assert len(ends) == 3
    for i in ends:  # CHECKPOINT, then the emulator record, before CHECKPOINT_END
        assert out.events[i + 1] == ("libxl", C.LIBXL_EMULATOR_CONTEXT)
    assert out.emulator == [_ctx(b"dm-state-%d" % n) for n in (1, 2, 3)]
    epoch = ["suspend", "dm_stop", "dm_save", "clean(final=True)", "dm_cont", "resume"]
    assert dom.calls[:3] == ["logdirty_enable", "dm_logdirty(True)", "clean(final=False)"]
    assert [c for c in dom.calls if c in epoch] == epoch * 3
    assert dom.calls[-2:] == ["logdirty_off", "dm_logdirty(False)"] and dm.running


class _StockLink:
    """A stock backup: no ACKs, every epoch released once sent."""

    def start_heartbeats(self) -> None:
        pass

    def stop_heartbeats(self) -> None:
        pass

    def idle(self, until: float) -> None:
        pass

    def epoch_sent(self, epoch: int, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats:
        return EpochStats(epoch, pause_ms, dirty_pages, 0, 0, send_ms)

    def next_ack(self, until: float | None) -> None:
        return None


# -- through the real emitters and the real receiver ---------------------------------------

def test_one_shot_stream_ends_as_libxl_writes_it(tmp_path: Path) -> None:
    dom = FakeDomain(50)
    dm = FakeDeviceModel()
    path = tmp_path / "s"
    with open(path, "wb") as f:
        SaveEngine(dom, FakeGuest(dom), FdEmitter(f.fileno(), HVM_CONFIG),
                   PrecopyPolicy(1, 4), dm=dm).run()
    data = path.read_bytes()
    evs = Decoder(relay=True).feed(data)
    names = [e.name for e in evs if isinstance(e, Record)]
    assert names[-4:] == ["X86_TSC_INFO", "END", "EMULATOR_CONTEXT", "END"]
    assert isinstance(evs[-1], StreamEnd) and evs[-1].complete


def test_protect_epochs_reach_the_backup_with_their_device_state(tmp_path: Path,
                                                                 monkeypatch: Any) -> None:
    """Our channel and receiver over a socket pair, into a fake sink: each committed epoch
    holds, between CHECKPOINT and CHECKPOINT_END, the device state of its own suspend."""
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path))
    dom = FakeDomain(96)
    dm = FakeDeviceModel()
    sink, result = Sink(), list[Outcome]()
    a, b = socket.socketpair()
    th = start_backup(b, sink, ReceiverChannel(Config(), time.monotonic()), result)
    engine, out, link = primary(a, dom, Config(), 5.0)
    engine.dm = dm
    loop = RemusLoop(engine, out, link, NoDevices(), 0.005,
                     on_epoch=lambda st: loop.stop() if st.epoch == 3 else None)
    loop.run()
    a.close()
    th.join(20)
    assert result and result[0].kind == "failover" and result[0].epoch == 3
    per_epoch: dict[int, list[bytes]] = {}
    current: list[bytes] = []
    inside = False
    for ev in Decoder(checkpointed=True).feed(bytes(sink.data)):
        if isinstance(ev, Record) and ev.name == "CHECKPOINT":
            inside = True
        elif isinstance(ev, Record) and ev.name == "EMULATOR_CONTEXT":
            assert inside, "EMULATOR_CONTEXT outside CHECKPOINT .. CHECKPOINT_END"
            current.append(bytes(cast(Emulator, ev.parse()).data))
        elif isinstance(ev, EpochEnd):
            per_epoch[ev.epoch], current, inside = current, [], False
    assert per_epoch == {n: [b"dm-state-%d" % (n + 1)] for n in range(4)}


# -- the session picks the guest type --------------------------------------------------------

class SessionXc:
    """XenCtrl of one domain 5 ("h1"): ``emu`` its emulation flags, ``params`` its HVM
    params."""

    def __init__(self, emu: int, callback: int) -> None:
        self.emu, self.callback = emu, callback

    def domains(self) -> list[Any]:
        return [self.domain_info(5)]

    def domain_info(self, domid: int) -> Any:
        from xen_remus.xen.domain import DomainInfo

        return DomainInfo(domid, S.DOMINF_HVM_GUEST, 1, 1, 0, 0, 1, 0, self.emu, bytes(16))

    def hvm_param(self, domid: int, param: int) -> int:
        return {S.HVM_PARAM_CALLBACK_IRQ: self.callback}.get(param, 0)

    def maximum_gpfn(self, domid: int) -> int:
        return 0xFEFFF

    def close(self) -> None:
        pass


def session(monkeypatch: pytest.MonkeyPatch, emu: int, callback: int) -> Any:
    from xen_remus.save import session as sess

    xs = Store(QEMU_XEN | {"/local/domain/5/name": "h1"})
    xs.close = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(sess, "XenCtrl", lambda: SessionXc(emu, callback))
    monkeypatch.setattr(sess, "XenStore", lambda: xs)
    monkeypatch.setattr(sess, "ForeignMemory", lambda: cast(Any, SessionXc(0, 0)))
    monkeypatch.setattr(sess, "XenDomain", lambda *a: cast(Any, SessionXc(0, 0)))
    return sess.SaveSession("h1")


def test_the_session_takes_an_hvm_guest_with_its_device_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with session(monkeypatch, emu=0x3FF, callback=0x0200000000000005) as s:
        guest = s.open_guest()
        assert guest.nr_pfns() == 0xFF000
        assert isinstance(s.dm, DeviceModel) and s.dm.socket == "/var/run/xen/qmp-libxl-5"
    with session(monkeypatch, emu=S.X86_EMU_LAPIC, callback=0) as s:  # PVH: no QEMU
        s.open_guest()
        assert s.dm is None


def test_the_session_refuses_an_hvm_guest_without_pv_drivers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with session(monkeypatch, emu=0x3FF, callback=0) as s:
        with pytest.raises(UnsupportedGuest, match=r"domain 5 \(h1\) is an HVM guest "
                           "without PV drivers"):
            s.open_guest()
