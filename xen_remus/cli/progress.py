"""The initial copy's progress on stderr (protect): rounds, pages, MB/s, from the save
engine's CopyProgress callbacks (save/engine.py). On a terminal one line redrawn in place
at most 4 times a second; otherwise a plain line at most every 2 s, so a log (the
journal, under systemd) gets a few lines, not one per batch."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from xen_remus.save.engine import CopyProgress
from xen_remus.stream.consts import PAGE_SIZE

TTY_INTERVAL_S = 0.25
LOG_INTERVAL_S = 2.0


class CopyReport:
    """Feed it every CopyProgress; it says when to draw. ``done`` once the final round
    (the guest suspended) has ended: the copy is over, later rounds are checkpoints."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.interval = interval if interval is not None else (
            TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S)
        self.done = False
        self.lines = 0  # drawn (on a terminal: redrawn)
        self._start: float | None = None
        self._last = -float("inf")
        self._open = False  # a terminal line not yet ended

    def update(self, p: CopyProgress) -> None:
        if self.done:
            return
        now = self.clock()
        if self._start is None:
            self._start = now
        if p.round_done and not p.live:
            self.done = True
            self._draw(self.final(p, now), end=True)
            return
        if now - self._last < self.interval and not (self.tty and p.round_done):
            return
        self._last = now
        self._draw(self.line(p, now), end=not self.tty)

    def rate(self, p: CopyProgress, now: float) -> float:
        """MB/s (10^6 bytes) of page data since the copy started."""
        secs = now - (self._start if self._start is not None else now)
        return p.pages_sent * PAGE_SIZE / 1e6 / secs if secs > 0 else 0.0

    def line(self, p: CopyProgress, now: float) -> str:
        pct = 100 * p.pfns_done // p.pfns_todo if p.pfns_todo else 100
        what = "all pages" if p.round == 0 else "pages dirtied meanwhile"
        return (f"initial copy: round {p.round + 1} ({what}): {p.pfns_done}/{p.pfns_todo} "
                f"pages ({pct}%), {p.pages_sent * PAGE_SIZE / 2**20:.0f} MiB sent, "
                f"{self.rate(p, now):.1f} MB/s")

    def final(self, p: CopyProgress, now: float) -> str:
        secs = now - (self._start if self._start is not None else now)
        return (f"initial copy: {p.pages_sent} pages ({p.pages_sent * PAGE_SIZE / 2**20:.0f} "
                f"MiB) in {p.round + 1} round(s), {secs:.1f} s, {self.rate(p, now):.1f} "
                f"MB/s; the last {p.pfns_todo} pages with the guest paused")

    def _draw(self, text: str, end: bool) -> None:
        if self.tty:
            self.out.write(f"\r{text}\x1b[K" + ("\n" if end else ""))
            self._open = not end
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.lines += 1

    def close(self) -> None:
        """End a terminal line left open (the copy failed or was interrupted)."""
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False
