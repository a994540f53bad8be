"""Thin I/O around the sans-IO channel ends, for engines that own plain file descriptors
(the transport's pipes or a socket). Optional: an engine with its own poll loop can call
the channel directly (channel.py says how).

SenderLink never blocks without a deadline: writes are non-blocking and interleaved with
reading the backup's channel, so a backup that powers off mid-write (no RST: the socket
just stops draining) is declared lost once its heartbeats stop, instead of hanging.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Sequence

from xen_remus.errors import XenRemusError
from xen_remus.remus.channel import Acked, BackEvent, Closed, ReceiverChannel, SenderChannel
from xen_remus.stream.events import Buffer

IOV_MAX = 1024
READ_MAX = 65536
Clock = Callable[[], float]


class BackupLost(XenRemusError):
    """The backup stopped answering, closed its channel or asked to stop: the primary
    goes on unprotected."""


class SenderLink:
    def __init__(self, chan: SenderChannel, send_fd: int, recv_fd: int,
                 clock: Clock = time.monotonic) -> None:
        self.chan, self.send_fd, self.recv_fd, self.clock = chan, send_fd, recv_fd, clock
        self.offset = 0  # stream bytes written
        self.events: list[BackEvent] = []  # read but not yet taken by the caller
        self._eof = False
        os.set_blocking(send_fd, False)

    def _lost(self, why: str) -> BackupLost:
        return BackupLost(f"backup lost at stream offset {self.offset} (epoch "
                          f"{self.chan.last_sent_epoch}, last ACK {self.chan.acked}): {why}")

    def _read(self) -> None:
        try:
            data = os.read(self.recv_fd, READ_MAX)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._lost(f"reading its channel failed: errno {exc.errno}") from None
        if not data:
            self._eof = True
            raise self._lost("it closed its channel")
        for ev in self.chan.feed_back(data, self.clock()):
            if isinstance(ev, Closed):
                raise self._lost(f"it stopped: {ev.reason}")
            self.events.append(ev)

    def _wait(self, want_write: bool, until: float | None) -> bool:
        """Wait for the send fd (if ``want_write``) or back-channel input, at most until
        ``until`` and the channel's own timers; True if the send fd is writable."""
        now = self.clock()
        if self.chan.peer_dead(now):
            det = self.chan.detector
            raise self._lost(f"no word from it for {det.silence(now) if det else 0:.2f} s "
                             "(heartbeat timeout)")
        wake = [t for t in (until, self.chan.wake_at()) if t is not None]
        timeout = max(0.0, min(wake) - now) if wake else None
        rd = [] if self._eof else [self.recv_fd]
        r, w, _ = select.select(rd, [self.send_fd] if want_write else [], [], timeout)
        if r:
            self._read()
        return bool(w)

    def write(self, bufs: Sequence[Buffer]) -> None:
        """Write all of ``bufs``, reading the backup's channel meanwhile."""
        views = [memoryview(b).cast("B") for b in bufs if memoryview(b).nbytes]
        i = 0
        while i < len(views):
            if not self._wait(True, None):
                continue
            try:
                n = os.writev(self.send_fd, views[i:i + IOV_MAX])
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._lost(f"writing the stream failed: errno {exc.errno}") from None
            self.offset += n
            self.chan.sent(self.clock())
            while n and i < len(views):
                if n >= views[i].nbytes:
                    n -= views[i].nbytes
                    i += 1
                else:
                    views[i], n = views[i][n:], 0

    def idle(self, until: float) -> None:
        """Wait until ``until`` (the next epoch), sending heartbeats and reading ACKs.
        Call only at a libxc record boundary (see channel.py)."""
        while True:
            self.write(self.chan.pending(self.clock()))
            if self.clock() >= until:
                return
            self._wait(False, until)

    def wait_ack(self, epoch: int) -> Acked | None:
        """Wait for the ACK of ``epoch`` (None at once if the backup does not ACK);
        raises BackupLost if it stops answering."""
        if not self.chan.acks:
            return None
        while True:
            for i, ev in enumerate(self.events):
                if isinstance(ev, Acked) and ev.epoch >= epoch:
                    del self.events[:i + 1]
                    return ev
            self.write(self.chan.pending(self.clock()))
            self._wait(False, None)


class ReceiverLink:
    """The backup's writes to the primary: ACKs and heartbeats (``out_fd``: the channel
    the banner went to). Call ``tick`` whenever woken; sleep at most ``timeout()``."""

    def __init__(self, chan: ReceiverChannel, out_fd: int,
                 clock: Clock = time.monotonic) -> None:
        self.chan, self.out_fd, self.clock = chan, out_fd, clock

    def _send(self, data: bytes) -> None:
        if data:  # small frames: the pipe/socket takes them whole or the primary is gone
            try:
                os.write(self.out_fd, data)
            except OSError:
                pass  # the primary went away; the stream's EOF or silence will tell

    def tick(self) -> bool:
        """Send a heartbeat if due; True if the primary is dead (fail over now)."""
        now = self.clock()
        self._send(self.chan.pending(now))
        return self.chan.peer_dead(now)

    def committed(self, epoch: int, commit_ms: float = 0.0) -> None:
        self._send(self.chan.committed(epoch, self.clock(), commit_ms))

    def timeout(self) -> float | None:
        wake = self.chan.wake_at()
        return None if wake is None else max(0.0, wake - self.clock())
