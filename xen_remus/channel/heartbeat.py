"""Failure detection by silence, and when to send a heartbeat. Times are the caller's
(time.monotonic() seconds); nothing here reads a clock.

A powered-off peer sends no TCP reset: the connection stays ESTABLISHED and a blocking
read waits forever. So each end sends *something* at least every
``interval`` (stream bytes count; a heartbeat is sent only when the end was otherwise
idle), and declares its peer dead after ``timeout`` without a byte from it.
"""

from __future__ import annotations


class FailureDetector:
    """Feed it ``seen(t)`` whenever bytes (of any kind) arrive from the peer; ask
    ``dead(t)``. Only ask after draining what is readable, or a busy reader would blame
    the peer for its own delay."""

    def __init__(self, timeout: float, now: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.last = now

    def seen(self, t: float) -> None:
        if t > self.last:
            self.last = t

    def silence(self, t: float) -> float:
        return max(0.0, t - self.last)

    def dead(self, t: float) -> bool:
        return t - self.last > self.timeout

    @property
    def deadline(self) -> float:
        """The time after which, with nothing more seen, the peer is dead."""
        return self.last + self.timeout


class HeartbeatTimer:
    """Says when this end must send a heartbeat: ``interval`` after it last sent anything."""

    def __init__(self, interval: float, now: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.last_sent = now
        self.seq = 0

    def sent(self, t: float) -> None:
        if t > self.last_sent:
            self.last_sent = t

    def due(self, t: float) -> bool:
        return t - self.last_sent >= self.interval

    def next_seq(self, t: float) -> int:
        """Count a heartbeat being sent now; returns its sequence number."""
        self.seq += 1
        self.sent(t)
        return self.seq

    @property
    def next_due(self) -> float:
        return self.last_sent + self.interval
