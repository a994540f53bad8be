"""The save engine on fakes: what the receiver ends up with equals the guest at suspend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeDomain, FakeGuest, RecordingEmitter
from xen_remus.errors import XenRemusError
from xen_remus.save.engine import SaveEngine, SaveError, page_buffers
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.stream.consts import PAGE_SIZE, PFINFO_XTAB


def make(nr: int = 3000, policy: PrecopyPolicy | None = None
         ) -> tuple[FakeDomain, FakeGuest, RecordingEmitter, SaveEngine]:
    dom = FakeDomain(nr)
    guest = FakeGuest(dom)
    out = RecordingEmitter()
    eng = SaveEngine(dom, guest, out, policy or PrecopyPolicy())
    return dom, guest, out, eng


def received_equals_guest(dom: FakeDomain, out: RecordingEmitter) -> None:
    for pfn in range(dom.nr_pfns):
        if dom.types[pfn] >= 0xD:
            continue
        want = bytes(dom.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])
        if dom.types[pfn] == 1:
            want = b"\xaa" * PAGE_SIZE
        assert out.pages.get(pfn) == want, f"pfn {pfn:#x} differs"


def test_one_shot_nonlive_sends_every_page_once_in_batches() -> None:
    dom, guest, out, eng = make(2500, PrecopyPolicy(max_rounds=0))
    stats = eng.run()
    assert dom.calls == ["suspend"]  # no log-dirty for a non-live save, as xl save
    assert out.batch_sizes == [1024, 1024, 452]
    assert stats.pages == 2500
    received_equals_guest(dom, out)
    # one contiguous slice of the mapping per record: zero copy, few iovecs
    assert out.buffers_per_record == [1, 1, 1]
    assert dom.suspended and all(m.closed for m in dom.mappings)


def test_record_sequence_headers_static_pages_state_end() -> None:
    dom, guest, out, eng = make(100, PrecopyPolicy(max_rounds=0))
    eng.run()
    kinds = [e for e in out.events]
    assert kinds[0] == ("begin", 2)
    assert kinds[1] == ("libxc", 0x11)  # static data
    assert kinds[2] == ("libxc", 0x10)  # STATIC_DATA_END
    assert kinds[3] == ("libxc", 0x01)  # PAGE_DATA
    assert kinds[-2:] == [("libxc", 0x08), ("end", 0)]


def test_live_rounds_resend_what_the_guest_dirtied() -> None:
    dom, guest, out, eng = make(3000, PrecopyPolicy(max_rounds=5, target_dirty=10))

    def guest_runs(round_no: int) -> None:  # dirties fewer pages each round
        for pfn in range(0, 3000, 7 * (round_no + 1)):
            dom.write(pfn, round_no + 1)

    dom.on_clean = guest_runs
    stats = eng.run()
    received_equals_guest(dom, out)
    live = [r for r in stats.rounds if r.live]
    assert live[0].pages == 3000 and 1 < len(live) <= 5
    assert dom.calls[0] == "logdirty_enable" and dom.calls[-1] == "logdirty_off"
    assert "clean(final=True)" in dom.calls and dom.suspended


def test_policy_stops_after_max_rounds_when_guest_keeps_dirtying() -> None:
    dom, guest, out, eng = make(2000, PrecopyPolicy(max_rounds=3, target_dirty=5))

    def guest_runs(r: int) -> None:
        for p in range(0, 2000, 3):
            dom.write(p, 9)

    dom.on_clean = guest_runs
    stats = eng.run()
    assert len([r for r in stats.rounds if r.live]) == 3
    received_equals_guest(dom, out)  # the last live round's dirty pages went out after suspend


def test_policy_stops_early_when_few_pages_dirty() -> None:
    dom, guest, out, eng = make(2000, PrecopyPolicy(max_rounds=10, target_dirty=50))
    dom.on_clean = lambda r: dom.write(5, 1)
    stats = eng.run()
    assert len([r for r in stats.rounds if r.live]) == 1
    assert stats.rounds[-1].pages == 1  # pfn 5, sent after suspend
    received_equals_guest(dom, out)


def test_ballooned_pages_are_xtab_deferred_and_xtab_again_after_suspend() -> None:
    dom, guest, out, eng = make(1500, PrecopyPolicy(max_rounds=2, target_dirty=0))
    guest.ballooned = {3, 1400}
    stats = eng.run()
    assert stats.rounds[0].deferred == 2
    assert out.types[3] == PFINFO_XTAB and out.types[1400] == PFINFO_XTAB and 3 not in out.pages
    assert len(out.pages) == 1498 and not dom.logdirty and dom.suspended
    dom2, guest2, out2, eng2 = make(1500, PrecopyPolicy(max_rounds=0))
    guest2.ballooned = {7}
    eng2.run()  # non-live: a pfn without a frame is XTAB, not an error
    assert out2.types[7] == PFINFO_XTAB and 7 not in out2.pages and len(out2.pages) == 1499


def test_pagetable_not_sendable_while_live_is_deferred_and_sent_after_suspend() -> None:
    dom, guest, out, eng = make(1200, PrecopyPolicy(max_rounds=2, target_dirty=0))
    dom.types[[10, 11, 1100]] = 1
    guest.retry_live = {11}
    stats = eng.run()
    assert stats.rounds[0].deferred == 1
    assert sorted(guest.normalised_pfns).count(11) == 1
    received_equals_guest(dom, out)
    # the normalised pages are their own buffers; the rest are runs of the mapping
    # first record: pages 0..9 (one slice), the normalised page 10, pages 12..1023 (one
    # slice); 11 went as XTAB
    assert out.buffers_per_record[0] == 3


def test_pagetable_still_bad_after_suspend_fails_and_resumes_guest() -> None:
    dom, guest, out, eng = make(100, PrecopyPolicy(max_rounds=1))
    dom.types[20] = 1
    guest.retry_always = {20}
    with pytest.raises(SaveError, match="pagetable at pfn 0x14"):
        eng.run()
    assert dom.calls[-2:] == ["logdirty_off", "resume"] and not dom.suspended


def test_mapping_error_names_pfn_and_errno() -> None:
    dom, guest, out, eng = make(100, PrecopyPolicy(max_rounds=0))
    dom.map_errors[42] = 14
    with pytest.raises(SaveError, match=r"pfn 0x2a failed \(errno 14\)"):
        eng.run()
    assert dom.resumed == 1 and all(m.closed for m in dom.mappings)


def test_broken_and_xalloc_pages_carry_no_data() -> None:
    dom, guest, out, eng = make(64, PrecopyPolicy(max_rounds=0))
    dom.types[[1, 2]] = [0xD, 0xE]
    eng.run()
    assert out.types[1] == 0xD and out.types[2] == 0xE and 1 not in out.pages
    received_equals_guest(dom, out)


def test_invalid_page_type_is_an_error() -> None:
    dom, guest, out, eng = make(64, PrecopyPolicy(max_rounds=0))
    dom.types[9] = 6
    with pytest.raises(SaveError, match="pfn 0x9 has page type 0x6"):
        eng.run()


def test_suspend_failure_leaves_guest_running_and_logdirty_off() -> None:
    dom, guest, out, eng = make(100, PrecopyPolicy(max_rounds=1))
    dom.fail_suspend = True
    with pytest.raises(XenRemusError, match="did not suspend"):
        eng.run()
    assert not dom.logdirty and dom.resumed == 0 and dom.calls[-1] == "logdirty_off"


@settings(max_examples=60, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=1, max_size=40),
       repl=st.sets(st.integers(0, 39), max_size=8))
def test_page_buffers_match_plain_reference(keep: list[bool], repl: set[int]) -> None:
    n = len(keep)
    view = memoryview(bytes(np.repeat(np.arange(n, dtype=np.uint8), PAGE_SIZE)))
    replaced = {i: bytes([200 + (i % 50)]) * PAGE_SIZE for i in repl if i < n}
    got = b"".join(bytes(b) for b in page_buffers(view, np.array(keep), replaced))
    want = b"".join(replaced.get(i, bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]))
                    for i in range(n) if keep[i])
    assert got == want
    runs = sum(1 for i in range(n) if keep[i] and i not in replaced
               and (i == 0 or not keep[i - 1] or (i - 1) in replaced))
    assert len(page_buffers(view, np.array(keep), replaced)) == runs + sum(
        1 for i in replaced if keep[i])
