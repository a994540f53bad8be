"""Thin I/O around the sans-IO channel ends, for engines that own plain file descriptors
(the transport's pipes or a socket). Optional: an engine with its own poll loop can call
the channel directly (ends.py says how).

SenderLink never blocks without a deadline: writes are non-blocking and interleaved with
reading the backup's channel, so a backup that powers off mid-write (no RST: the socket
just stops draining) is declared lost once its heartbeats stop, instead of hanging.

Heartbeats while an end is busy elsewhere (the primary suspending the guest or copying
pages, under TCG longer than the timeout; the backup writing into a sink that builds the
domain): ``start_heartbeats()`` runs a thread that sends them when due, the same thread
class at both ends. Every method takes one lock, so the thread only ever writes between
two whole calls; hence the sender starts it after the libxc headers and sends each
libxl-layer stretch (CHECKPOINT ... CHECKPOINT_END) in one ``send`` call. A BackupLost
the sender's thread meets is raised by the engine's next call.

A back frame that fails authentication (MacError) is not a lost backup: it is raised as
it is, so that the primary says a frame was refused instead of "backup lost", and the
forged frame is never acted on (an ACK in it commits nothing).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from xen_remus.channel.compress import PagesIn
from xen_remus.channel.mac import MacError
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import Acked, BackEvent, Closed, DiskBack, SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.errors import XenRemusError
from xen_remus.fdio import READ_SIZE, Iovecs, readable
from xen_remus.stream.events import Buffer

WRITE_CHUNK = 256 << 10  # bytes offered per writev: more than a pipe holds
Clock = Callable[[], float]


class BackupLost(XenRemusError):
    """The backup stopped answering, closed its channel or asked to stop: the primary
    goes on unprotected. ``closed``: it said it stops (a CLOSE frame): it will not
    resume its copy."""

    def __init__(self, message: str, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


class _Heartbeats:
    """The heartbeat thread both ends run (``_beat`` is each end's loop: it sends what is
    due, under the end's lock, and sleeps at most 50 ms)."""

    _thread: threading.Thread | None
    _stop: threading.Event
    _beat_name = "xen-remus heartbeat"

    def _beat(self) -> None:
        raise NotImplementedError

    def start_heartbeats(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=self._beat_name)
            self._thread.start()

    def stop_heartbeats(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None


class SenderLink(_Heartbeats):
    def __init__(self, chan: SenderChannel, send_fd: int, recv_fd: int,
                 clock: Clock = time.monotonic) -> None:
        self.chan, self.send_fd, self.recv_fd, self.clock = chan, send_fd, recv_fd, clock
        self.offset = 0  # stream bytes written
        self.events: list[BackEvent] = []  # read but not yet taken by the caller
        self._eof = False
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failed: XenRemusError | None = None  # met by the heartbeat thread
        os.set_blocking(send_fd, False)

    # -- what engines call --------------------------------------------------------------

    def send_pages(self, pfns: npt.NDArray[np.uint64], types: npt.NDArray[np.uint8],
                   pages: PagesIn) -> None:
        """One PAGE_DATA, standard or compressed (SenderChannel.page_records)."""
        with self._lock:
            self._check()
            self.write(self.chan.page_records(pfns, types, pages, self.clock()))

    def send(self, bufs: Sequence[Buffer]) -> None:
        """Other records, written whole (counted in the epoch's bytes)."""
        with self._lock:
            self._check()
            self.write(bufs)
            self.chan.other_bytes(sum(memoryview(b).nbytes for b in bufs), self.clock())

    def epoch_sent(self, epoch: int, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats | None:
        with self._lock:
            st = self.chan.epoch_sent(epoch, self.clock(), pause_ms, dirty_pages, send_ms)
            self.events.extend(self.chan.take_early())
            return st


    def _beat(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._failed is not None:
                    return
                try:
                    self.write(self.chan.pending(self.clock()))
                    self._poll()
                except (BackupLost, MacError) as exc:
                    self._failed = exc
                    return
                except XenRemusError as exc:  # e.g. a ChannelError: the backup misbehaves
                    self._failed = self._lost(str(exc))
                    return
                wake = self.chan.wake_at()
            pause = 0.05 if wake is None else wake - self.clock()
            self._stop.wait(min(max(pause, 0.001), 0.05))

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _poll(self) -> None:
        """Read what the backup sent, without waiting; raise if it is dead."""
        self._wait(False, self.clock())

    def _lost(self, why: str, closed: bool = False) -> BackupLost:
        waiting = self.chan.awaiting
        epochs = ("" if len(waiting) < 2 else
                  f"; epochs {waiting[0]}..{waiting[-1]} await their ACK")
        return BackupLost(f"backup lost at stream offset {self.offset} (epoch "
                          f"{self.chan.last_sent_epoch}, last ACK {self.chan.acked}{epochs}): "
                          f"{why}", closed)

    def _read(self) -> None:
        try:
            data = os.read(self.recv_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._lost(f"reading its channel failed: errno {exc.errno}") from None
        if not data:
            self._eof = True
            raise self._lost("it closed its channel")
        try:
            events = self.chan.feed_back(data, self.clock())
        except MacError:
            raise  # refused, and said so: not the backup's silence
        except XenRemusError as exc:  # a ChannelError: the backup broke the protocol
            raise self._lost(str(exc)) from None
        for ev in events:
            if isinstance(ev, Closed):
                raise self._lost(f"it stopped: {ev.reason}", closed=True)
            self.events.append(ev)

    def _wait(self, want_write: bool, until: float | None) -> bool:
        """Wait for the send fd (if ``want_write``) or back-channel input, at most until
        ``until`` and the channel's own timers; True if the send fd is writable."""
        if self._eof:
            raise self._lost("it closed its channel")
        now = self.clock()
        if self.chan.peer_dead(now) and readable(self.recv_fd):
            self._read()  # words that waited while we were busy: not the backup's fault
            now = self.clock()
        if self.chan.peer_dead(now):
            det = self.chan.detector
            raise self._lost(f"no word from it for {det.silence(now) if det else 0:.2f} s "
                             "(heartbeat timeout)")
        # Mid-record (want_write) no heartbeat can go out, so only the backup's deadline
        # bounds the wait: a heartbeat already due would turn select into a busy loop for
        # as long as the transport does not drain the pipe.
        det = self.chan.detector
        timer = (det.deadline if det is not None else None) if want_write else self.chan.wake_at()
        wake = [t for t in (until, timer) if t is not None]
        timeout = max(0.0, min(wake) - now) if wake else None
        r, w, _ = select.select([self.recv_fd], [self.send_fd] if want_write else [], [],
                                timeout)
        if r:
            self._read()
        return bool(w)

    def write(self, bufs: Sequence[Buffer]) -> None:
        """Write all of ``bufs``, reading the backup's channel meanwhile (raw: no
        accounting; engines use send/send_pages)."""
        with self._lock:
            self._write(bufs)

    def _write(self, bufs: Sequence[Buffer]) -> None:
        # Not fdio.write_all: here the wait also reads the back channel (heartbeats, ACKs)
        # and is bounded by the backup's deadline, not the write's.
        out = Iovecs(bufs)
        while out:
            if not self._wait(True, None):
                continue
            try:
                # Offer about what the pipe can take: writev turns every buffer offered
                # into an iovec, and the transport drains the pipe a few KiB at a time.
                n = out.writev(self.send_fd, WRITE_CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._lost(f"writing the stream failed: errno {exc.errno}") from None
            self.offset += n
            self.chan.sent(self.clock())

    def idle(self, until: float) -> None:
        """Wait until ``until`` (the next epoch), sending heartbeats and reading ACKs.
        Call only at a libxc record boundary (see ends.py)."""
        while True:
            with self._lock:
                self._check()
                self.write(self.chan.pending(self.clock()))
                if self.clock() >= until:
                    return
                self._wait(False, until)

    def next_ack(self, until: float | None) -> Acked | None:
        """The next ACK, in epoch order (that of the oldest epoch awaiting one), waiting at
        most until ``until`` (None: as long as the backup answers) while sending
        heartbeats; None if none came by then, or at once if the backup does not ACK.
        Raises BackupLost if it stops answering, whatever the number of epochs awaiting."""
        if not self.chan.acks:
            return None
        while True:
            with self._lock:
                self._check()
                for i, ev in enumerate(self.events):
                    if isinstance(ev, Acked):
                        del self.events[:i + 1]
                        return ev
                self.write(self.chan.pending(self.clock()))
                if until is not None and self.clock() >= until:
                    return None
                self._wait(False, until)

    def disk_back(self, vdev: str) -> list[bytes]:
        """The backup's answers for disk ``vdev`` read so far (reading what is there,
        sending a heartbeat if due; raises BackupLost as the others do). Call only at a
        libxc record boundary (see ends.py)."""
        with self._lock:
            self._check()
            self.write(self.chan.pending(self.clock()))
            self._poll()
            mine = [ev for ev in self.events if isinstance(ev, DiskBack) and ev.vdev == vdev]
            self.events = [ev for ev in self.events if not (isinstance(ev, DiskBack)
                                                            and ev.vdev == vdev)]
            return [ev.frames for ev in mine]

    def wait_ack(self, epoch: int) -> Acked | None:
        """Wait for the ACK of ``epoch`` (None at once if the backup does not ACK);
        raises BackupLost if it stops answering."""
        while (ack := self.next_ack(None)) is not None:
            if ack.epoch >= epoch:
                return ack
        return None


class ReceiverLink(_Heartbeats):
    """The backup's writes to the primary: ACKs and heartbeats (``out_fd``: the channel
    the banner went to). Call ``seen`` for every chunk from the primary and ``tick``
    whenever woken; sleep at most ``timeout()``.

    ``start_heartbeats()`` sends them from a thread too: the receiver's main loop may
    block for seconds writing into a sink that is busy (xl building the domain before it
    reads on), and the primary would take that silence for a dead backup. The thread
    only sends; deciding that the primary is dead stays with ``tick`` in the main loop
    (Upstream.read_beating).
    """

    _beat_name = "xen-remus heartbeat (backup)"

    def __init__(self, chan: ReceiverChannel, out_fd: int, in_fd: int | None = None,
                 clock: Clock = time.monotonic) -> None:
        """``in_fd``: where the stream comes from; with it, ``tick`` never declares the
        primary dead while bytes from it wait unread (the caller was busy)."""
        self.chan, self.out_fd, self.in_fd, self.clock = chan, out_fd, in_fd, clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False  # a CLOSE went out: the first reason is the one that counts

    def _send(self, data: bytes) -> None:
        if data:  # small frames: the pipe/socket takes them whole or the primary is gone
            try:
                os.write(self.out_fd, data)
            except OSError:
                pass  # the primary went away; the stream's EOF or silence will tell

    def tick(self) -> bool:
        """Send a heartbeat if due; True if the primary is dead (fail over now). Read
        what is readable (and call ``chan.seen``) before: a busy backup must not blame
        the primary for its own delay (``in_fd`` guards against that)."""
        with self._lock:
            now = self.clock()
            self._send(self.chan.pending(now))
            if not self.chan.peer_dead(now):
                return False
        return self.in_fd is None or not readable(self.in_fd)

    def seen(self, now: float) -> None:
        """Bytes came from the primary at ``now``."""
        with self._lock:
            self.chan.seen(now)

    def committed(self, epoch: int, commit_ms: float = 0.0) -> None:
        with self._lock:
            self._send(self.chan.committed(epoch, self.clock(), commit_ms))

    def disk_back(self, vdev: str, frames: list[bytes]) -> None:
        """A replica's answers to the primary's server of ``vdev``."""
        if frames:
            with self._lock:
                self._send(self.chan.disk_back(vdev, frames))

    def close(self, reason: str) -> None:
        """Tell the primary this backup stops, and why (nothing to a stock sender); once."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._send(self.chan.close(reason))

    def timeout(self) -> float | None:
        with self._lock:
            wake = self.chan.wake_at()
        return None if wake is None else max(0.0, wake - self.clock())

    def _beat(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._send(self.chan.pending(self.clock()))
            wait = self.timeout()
            self._stop.wait(min(max(wait if wait is not None else 0.05, 0.001), 0.05))
