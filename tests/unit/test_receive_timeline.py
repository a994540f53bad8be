"""The failover's timeline on the backup: who marks which phase, and the line it logs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from tests.fakes import ManualClock
from tests.unit.test_receive import FakeSink, epoch_ends, stream
from xen_remus.receive import timeline as T
from xen_remus.receive.driver import Relay
from xen_remus.receive.xlsink import ResumeWatch


def test_line_gives_each_phase_in_ms_since_detection() -> None:
    clock = ManualClock()
    tl = T.FailoverTimeline(clock)
    tl.heard()
    for phase, after in [(T.DECLARED_DEAD, 1.0), (T.DROPPED, 0.002), (T.FENCED, 0.5),
                         (T.RELAY_END, 0.001), (T.LIBXL_RESUME, 2.0), (T.DEVICES, 20.0),
                         (T.RUNNING, 0.3)]:
        clock.advance(after)
        tl.mark(phase)
    clock.advance(5)
    tl.mark(T.RUNNING)  # a later mark of the same phase does not move it
    assert tl.line() == (
        "failover timeline: detect 1000 ms (last word from the primary -> declared dead); "
        "then, in ms since: partial epoch dropped +2, fenced +502, relay end +503, libxl "
        "resume +2503, devices +22503, guest running +22803; total 23803 ms")


def test_phases_not_seen_are_dashes_and_no_fence_is_left_out() -> None:
    clock = ManualClock()
    tl = T.FailoverTimeline(clock)
    assert "not recorded" in tl.line()
    tl.mark(T.DECLARED_DEAD)  # no word ever heard: no detect time, total from death
    clock.advance(0.25)
    tl.mark(T.RUNNING)
    assert tl.line() == (
        "failover timeline: detect - (last word from the primary -> declared dead); then, "
        "in ms since: partial epoch dropped -, relay end -, libxl resume -, devices -, "
        "guest running +250; total 250 ms")


class TimedSink(FakeSink):
    """Fails over as XlSink does, on the test's clock: relay end at once, then libxl's
    restore (2 s), the hotplug scripts (3 s) and the unpause (0.1 s)."""

    def __init__(self, clock: ManualClock, tl: T.FailoverTimeline) -> None:
        super().__init__()
        self.clock, self.tl = clock, tl

    def failover(self, epoch: int) -> None:
        super().failover(epoch)
        self.tl.mark(T.RELAY_END)
        for phase, secs in [(T.LIBXL_RESUME, 2.0), (T.DEVICES, 3.0), (T.RUNNING, 0.1)]:
            self.clock.advance(secs)
            self.tl.mark(phase)


def test_relay_marks_its_phases_and_logs_the_line(caplog: pytest.LogCaptureFixture) -> None:
    data = stream(3, end=False)
    cut = epoch_ends(data)[1] + 10  # mid-epoch 2: 10 bytes to drop
    clock = ManualClock()
    tl = T.FailoverTimeline(clock)
    sink = TimedSink(clock, tl)
    rx = Relay(sink, True, timeline=tl)
    assert rx.feed(data[:cut]) is None
    tl.heard()
    clock.advance(1.5)  # silence: the driver declares the primary dead
    with caplog.at_level(logging.WARNING, "xen_remus.receive"):
        out = rx.eof("no data for 1.5 s")
    assert out.kind == "failover" and out.epoch == 1 and sink.failed_over == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1] == (
        "failover timeline: detect 1500 ms (last word from the primary -> declared dead); "
        "then, in ms since: partial epoch dropped +0, relay end +0, libxl resume +2000, "
        "devices +5000, guest running +5100; total 6600 ms")


def test_relay_marks_running_when_the_sink_returns(caplog: pytest.LogCaptureFixture) -> None:
    """A sink that marks nothing: failover() returns once the guest runs."""
    data = stream(3, end=False)
    clock = ManualClock()
    tl = T.FailoverTimeline(clock)
    rx = Relay(FakeSink(), True, timeline=tl)
    rx.feed(data[:epoch_ends(data)[1]])
    with caplog.at_level(logging.WARNING, "xen_remus.receive"):
        rx.eof()
    assert caplog.records[-1].getMessage().endswith(
        "partial epoch dropped -, relay end -, libxl resume -, devices -, guest running +0; "
        "total 0 ms")  # EOF at a boundary: nothing to drop


HELPER = "/usr/lib/xen-4.17/bin/libxl-save-helper --restore-domain 0 5 1 0 ..."
SCRIPT = "/bin/bash /etc/xen/scripts/vif-bridge online type_if=vif"


@pytest.mark.parametrize("polls, marked", [
    # helper ends, scripts run and end, then xl exits: each seen at its poll
    ([[HELPER], [], [SCRIPT], [SCRIPT], []], {T.LIBXL_RESUME: 1, T.DEVICES: 4, T.RUNNING: 5}),
    # the helper's end seen only as the scripts start
    ([[HELPER], [SCRIPT, "xl"], ["xl"]], {T.LIBXL_RESUME: 1, T.DEVICES: 2, T.RUNNING: 3}),
    # scripts still running at the last poll: devices end with xl
    ([[HELPER], [SCRIPT]], {T.LIBXL_RESUME: 1, T.DEVICES: 2, T.RUNNING: 2}),
    # too fast to see anything but xl's exit: only that is known
    ([[]], {T.RUNNING: 1}),
])
def test_resume_watch_reads_the_phases_off_xls_children(
        polls: Sequence[Sequence[str]], marked: dict[str, int]) -> None:
    clock = ManualClock(0.0)
    tl = T.FailoverTimeline(clock)
    watch = ResumeWatch(tl)
    for cmdlines in polls:
        watch.observe(cmdlines)
        clock.advance(1)
    watch.exited()
    assert {k: int(v) for k, v in tl.marks.items()} == marked
