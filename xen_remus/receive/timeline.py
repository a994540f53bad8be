"""The failover's timeline on the backup, logged as one line once the guest runs.

The driver and the sink mark each phase when they see it happen, on one injected clock
(the sans-IO core, restore_continuous, stays clock-free):

    last word from the primary ─► declared dead ─► partial epoch dropped ─► [fenced] ─►
    relay end (xl's input closed) ─► libxl resume (libxl-save-helper done: the memory and
    vCPU state are in) ─► devices (the hotplug scripts done) ─► guest running (xl renamed
    and unpaused the copy, then exited)

Each is printed as ms since the primary was declared dead; a phase not seen is "-" (a
phase shorter than the sink's poll can pass unseen).
"""

from __future__ import annotations

import time
from collections.abc import Callable

DECLARED_DEAD = "declared dead"
DROPPED = "partial epoch dropped"
FENCED = "fenced"
RELAY_END = "relay end"
LIBXL_RESUME = "libxl resume"
DEVICES = "devices"
RUNNING = "guest running"
PHASES = (DROPPED, FENCED, RELAY_END, LIBXL_RESUME, DEVICES, RUNNING)  # after DECLARED_DEAD
OPTIONAL = frozenset({FENCED})  # left out of the line when it did not happen


class FailoverTimeline:
    """When each phase happened, by ``clock`` (seconds); the first mark of a phase wins."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_word: float | None = None  # the last bytes read from the primary
        self.marks: dict[str, float] = {}

    def heard(self) -> None:
        """Bytes came from the primary."""
        self.last_word = self.clock()

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, self.clock())

    def line(self) -> str:
        """The timeline in one line: each phase in ms since the primary was declared dead,
        then the total from its last word (else from its death) to the guest running."""
        dead = self.marks.get(DECLARED_DEAD)
        if dead is None:
            return "failover timeline: not recorded (the primary was never declared dead)"
        detect = ("-" if self.last_word is None
                  else f"{(dead - self.last_word) * 1000:.0f} ms")
        parts = []
        for phase in PHASES:
            t = self.marks.get(phase)
            if t is None and phase in OPTIONAL:
                continue
            parts.append(f"{phase} " + ("-" if t is None else f"+{(t - dead) * 1000:.0f}"))
        end = self.marks.get(RUNNING)
        start = dead if self.last_word is None else self.last_word
        total = "-" if end is None else f"{(end - start) * 1000:.0f} ms"
        return (f"failover timeline: detect {detect} (last word from the primary -> "
                f"declared dead); then, in ms since: {', '.join(parts)}; total {total}")
