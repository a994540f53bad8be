"""Guests of more than one vCPU and guests below their maxmem, through the save engine and
the Remus loop (tests/fakes.py FakePvXen: a 64-bit PV guest behind fake Xen bindings).

Checked: every vCPU that is up sends its BASIC/EXTENDED/XSAVE/MSRS records, as libxc
does, with its frames normalised; a vCPU that is down sends none; each epoch carries each
vCPU's state as it is at that epoch's suspend; a vCPU that goes down while protected is
logged. HVM/PVH: each epoch's HVM_CONTEXT is the whole context Xen gives at that suspend
(every vCPU's CPU record). A guest started below its maxmem: the pfn space is the p2m's
(maxmem), not the pages it has; only populated pages carry data; ballooning into a range
its p2m backed with the shared missing page (the p2m generation moves) sends the p2m frames
again and the pages that came in, though the guest never wrote them.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import cast

import pytest

from tests.fakes import (
    BufferingEmitter,
    FakePvDomain,
    FakePvXen,
    LaggingBackup,
    NoDevices,
    RecordingEmitter,
)
from xen_remus.channel.stats import EpochStats
from xen_remus.save.engine import SaveEngine
from xen_remus.save.hvm import HvmGuest
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.pv import PvGuest
from xen_remus.save_continuous import RemusLoop
from xen_remus.stream import consts as C
from xen_remus.stream.libxc_bodies import X86PvP2mFrames, X86PvVcpu
from xen_remus.xen import ForeignMemory, GuestStateError, XenCtrl
from xen_remus.xen.vcpu import VcpuContext, cr3_to_mfn

VCPU_RECORDS = (C.REC_TYPE_X86_PV_VCPU_BASIC, C.REC_TYPE_X86_PV_VCPU_EXTENDED,
                C.REC_TYPE_X86_PV_VCPU_XSAVE, C.REC_TYPE_X86_PV_VCPU_MSRS)


def pv_guest(x: FakePvXen) -> PvGuest:
    return PvGuest(cast(XenCtrl, x), cast(ForeignMemory, x), x.domid)


def vcpu_records(out: RecordingEmitter) -> list[tuple[int, int, int, bytes]]:
    """(epoch, record type, vcpu id, context) of each vCPU record, in order; the epoch is
    the number of checkpoints before it."""
    ends = [i for i, (what, _) in enumerate(out.events) if what in ("checkpoint", "end")]
    got = []
    for at, rtype, body in out.bodies:
        if rtype in VCPU_RECORDS:
            rec = X86PvVcpu.unpack(body)
            assert rec.vcpu_id is not None
            got.append((sum(1 for e in ends if e < at), rtype, rec.vcpu_id, bytes(rec.context)))
    return got


@pytest.mark.parametrize("vcpus,down", [(2, ()), (4, (2,))])
def test_save_sends_each_vcpu_that_is_up_as_libxc_does(vcpus: int, down: tuple[int, ...]
                                                       ) -> None:
    x = FakePvXen(vcpus=vcpus, down=down)
    out = RecordingEmitter()
    SaveEngine(FakePvDomain(x), pv_guest(x), out, PrecopyPolicy(1, 10)).run()
    recs = vcpu_records(out)
    up = [v for v in range(vcpus) if v not in down]
    # Per vCPU in id order: BASIC, EXTENDED, XSAVE, then MSRS where it has some (even ids).
    want = [(0, rt, v) for v in up for rt in VCPU_RECORDS
            if rt != C.REC_TYPE_X86_PV_VCPU_MSRS or v % 2 == 0]
    assert [(e, rt, v) for e, rt, v, _ in recs] == want
    for _, rtype, v, ctx in recs:
        if rtype == C.REC_TYPE_X86_PV_VCPU_BASIC:
            c = VcpuContext(ctx, 8)
            assert int.from_bytes(ctx[8:16], "little") == v  # this vCPU's own context
            assert cr3_to_mfn(c.ctrlreg(3), 8) == 2 and c.gdt_frame(0) == 1  # as pfns
            assert c.dx == (0 if v == 0 else 0xD0D0)  # start_info: vcpu0's rdx only
        elif rtype == C.REC_TYPE_X86_PV_VCPU_XSAVE:
            assert ctx == bytes([0xA0 + v]) * 576


def remus(x: FakePvXen, epochs: int,
          on_epoch: dict[int, list[Callable[[], object]]] | None = None) -> BufferingEmitter:
    """The Remus loop over ``x`` for ``epochs`` epochs; before epoch N's checkpoint, the
    calls in ``on_epoch[N]`` (each a zero-argument callable) run."""
    dom = FakePvDomain(x)
    link = LaggingBackup(lambda epoch: 0.05)
    out = BufferingEmitter()
    engine = SaveEngine(dom, pv_guest(x), out, PrecopyPolicy(2, 4))

    def next_epoch(st: EpochStats) -> None:
        x.epoch = st.epoch + 1
        dom.dirty.add(3 + st.epoch % 7)  # the guest runs on
        for call in (on_epoch or {}).get(x.epoch, []):
            call()
        if st.epoch + 1 == epochs:
            loop.stop()

    loop = RemusLoop(engine, out, link, NoDevices(), 0.1, on_epoch=next_epoch,
                     clock=link.clock)
    loop.run()
    return out


def test_each_epoch_carries_every_vcpu_as_it_was_at_that_suspend() -> None:
    x = FakePvXen(vcpus=4, down=(3,))
    out = remus(x, epochs=5)
    recs = [(e, v, int.from_bytes(ctx[0:8], "little")) for e, rt, v, ctx in vcpu_records(out)
            if rt == C.REC_TYPE_X86_PV_VCPU_BASIC]
    assert recs == [(e, v, e) for e in range(5) for v in (0, 1, 2)]


def test_vcpu_going_down_while_protected_is_said_once(caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    x = FakePvXen(vcpus=2)
    with caplog.at_level(logging.WARNING, logger="xen_remus.save.pv"):
        out = remus(x, epochs=6, on_epoch={2: [lambda: x.down.add(1)],
                                           4: [lambda: x.down.discard(1)]})
    sent = {(e, v) for e, rt, v, _ in vcpu_records(out) if rt == C.REC_TYPE_X86_PV_VCPU_BASIC}
    assert sent == {(e, 0) for e in range(6)} | {(e, 1) for e in (0, 1, 4, 5)}
    said = [r.getMessage() for r in caplog.records if "went down" in r.getMessage()]
    assert len(said) == 1 and "vCPU 1 went down" in said[0], said


# -- HVM and PVH: one HVM_CONTEXT for the whole domain ------------------------------------

class FakeHvmXc:
    """What HvmGuest asks of XenCtrl; the HVM context is Xen's save blob (descriptors of
    typecode, instance, length) with one CPU record per vCPU that is up, each holding the
    epoch it was taken in."""

    def __init__(self, vcpus: int) -> None:
        self.vcpus, self.epoch = vcpus, 0

    def maximum_gpfn(self, domid: int) -> int:
        return 255

    def cpu_policy(self, domid: int) -> object:
        from xen_remus.xen.state import CpuPolicy

        return CpuPolicy(b"", b"", 0, 0)

    def tsc_info(self, domid: int) -> object:
        from xen_remus.xen.state import TscInfo

        return TscInfo(0, 0, 1_000_000, 0)

    def hvm_param(self, domid: int, param: int) -> int:
        return 0

    def hvm_context(self, domid: int) -> bytes:
        blob = struct.pack("<HHI", 1, 0, 24) + bytes(24)  # HEADER
        for v in range(self.vcpus):
            blob += struct.pack("<HHI", 2, v, 16) + struct.pack("<QQ", self.epoch, v)  # CPU
        return blob + struct.pack("<HHI", 0, 0, 0)  # END


def cpu_records(blob: bytes) -> list[tuple[int, int]]:
    """(instance, epoch) of each CPU record of an HVM save blob."""
    out, off = [], 0
    while off < len(blob):
        code, inst, length = struct.unpack_from("<HHI", blob, off)
        if code == 2:
            out.append((inst, struct.unpack_from("<Q", blob, off + 8)[0]))
        off += 8 + length
    return out


def test_hvm_context_of_each_epoch_holds_every_vcpu() -> None:
    xc = FakeHvmXc(vcpus=2)
    guest, out = HvmGuest(cast(XenCtrl, xc), 9), RecordingEmitter()
    for epoch in range(3):
        xc.epoch = epoch
        guest.end_of_checkpoint(out)
        out.checkpoint()
    ctx = [body for _, rt, body in out.bodies if rt == C.REC_TYPE_HVM_CONTEXT]
    assert [cpu_records(b) for b in ctx] == [[(0, e), (1, e)] for e in range(3)]


# -- below maxmem -------------------------------------------------------------------------

def pages_and_frames(out: RecordingEmitter) -> list[X86PvP2mFrames]:
    return [X86PvP2mFrames.unpack(b) for _, rt, b in out.bodies
            if rt == C.REC_TYPE_X86_PV_P2M_FRAMES]


def test_guest_below_maxmem_sends_its_p2m_range_and_populated_pages_only() -> None:
    # memory=96, maxmem=192 at a smaller scale: half of the p2m has no memory behind it.
    x = FakePvXen(nr_pfns=2048, populated=range(1024), vcpus=2)
    guest, out = pv_guest(x), RecordingEmitter()
    engine = SaveEngine(FakePvDomain(x), guest, out, PrecopyPolicy(2, 10))
    stats = engine.run()
    assert guest.nr_pfns() == 2048  # the p2m's size (maxmem), not the 1024 pages it has
    assert sorted(out.types) == list(range(2048))  # every pfn said, as libxc does
    assert sorted(out.pages) == list(range(1024))  # data for the populated ones only
    assert {out.types[p] for p in range(1024, 2048)} == {C.PFINFO_XTAB}
    assert stats.rounds[0].deferred == 1024  # unpopulated: looked at again once suspended
    for pfn in set(range(1024)) - x.p2m_pfns - {0, 1, 2}:
        assert out.pages[pfn] == x.content(pfn).tobytes(), f"pfn {pfn}"
    (frames,) = pages_and_frames(out)
    assert frames.end_pfn == 2047
    missing = int(x.m2p[x.missing])  # the shared all-invalid p2m page stands for pfns 1024+
    assert frames.frames.tolist() == [int(x.m2p[m]) for m in x.leaves[:2]] + [missing] * 2


def test_ballooning_up_during_a_live_save_sends_the_new_pages() -> None:
    x = FakePvXen(nr_pfns=2048, populated=range(1024), vcpus=1)
    dom, out = FakePvDomain(x), RecordingEmitter()
    came = list(range(1500, 1510))
    dom.on_clean = lambda n: x.balloon_in(came) if n == 0 else None
    SaveEngine(dom, pv_guest(x), out, PrecopyPolicy(4, 0)).run()
    first, again = pages_and_frames(out)
    assert first.frames[2] == int(x.m2p[x.missing])
    assert again.frames[2] == int(x.m2p[x.leaves[2]]) != first.frames[2]  # its own page
    for pfn in came:  # never written, never dirty: sent because their frame moved
        assert out.types[pfn] == C.PFINFO_NOTAB and out.pages[pfn] == bytes(4096), pfn
    assert {out.types[p] for p in range(1024, 2048) if p not in came} == {C.PFINFO_XTAB}


def test_ballooning_up_between_epochs_goes_into_the_next_epoch() -> None:
    x = FakePvXen(nr_pfns=2048, populated=range(1024), vcpus=2)
    came = [1800, 1801]
    out = remus(x, epochs=4, on_epoch={2: [lambda: x.balloon_in(came)]})
    ends = [i for i, (what, _) in enumerate(out.events) if what == "checkpoint"]
    frames = [at for at, rt, _ in out.bodies if rt == C.REC_TYPE_X86_PV_P2M_FRAMES]
    assert len(frames) == 2 and ends[1] < frames[1] < ends[2]  # in epoch 2
    assert out.types[1800] == out.types[1801] == C.PFINFO_NOTAB


def test_p2m_growing_during_the_save_is_refused_by_name() -> None:
    x = FakePvXen(nr_pfns=2048, populated=range(1024), vcpus=1)
    dom = FakePvDomain(x)

    def grow(n: int) -> None:
        if n == 0:
            x.nr_pfns, x.generation = 4096, x.generation + 1
            x.mem[x.SHARED_INFO_MFN, x.ARCH // 8] = 4096
            x.mem[x.SHARED_INFO_MFN, x.ARCH // 8 + 5] = x.generation

    dom.on_clean = grow
    with pytest.raises(GuestStateError, match="p2m changed size from 2048 to 4096 pfns"):
        SaveEngine(dom, pv_guest(x), RecordingEmitter(), PrecopyPolicy(4, 0)).run()
    assert dom.calls[-3:] == ["suspend", "logdirty_off", "resume"]  # running as it was
