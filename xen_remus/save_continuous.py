"""The continuous save: the Remus epoch loop on the primary, one checkpoint per interval.

    epoch 0   the disks' initial synchronisation (``before_precopy``), then pre-copy
              rounds while the guest runs (the one-shot engine's live phase), then the
              first checkpoint, as every later epoch:
    epoch N   suspend -> dirty pages into a local buffer
              -> devices postsuspend (net: a new output buffer starts; disks: their
                 servers seal the epoch; its last writes and the seal join the buffer,
                 read from the servers as it is transmitted)
              -> vCPU/platform state -> devices preresume
              -> resume: the guest runs on, speculatively
              -> transmit the buffer -> the backup ACKs epoch N (a stock one cannot)
              -> devices commit(N) (disks, then net: epoch N's packets leave)
              -> wait for the interval
              while it waits (for an ACK or the interval), every IDLE_EVERY the devices'
              idle(): the disks send the writes of the epoch now open on to the backup,
              so that its checkpoint has only the last of them to carry

What the guest says to the world during an epoch leaves only once the backup holds the
state that said it. A backup that stops answering ends the loop with the guest running
here, unprotected; a failure of this side once the backup holds a checkpoint leaves the
guest paused here, its unacknowledged output dropped, for the backup to take over.

A handover (``handover()``; `xen-remus handover`, SIGUSR1 to protect) ends the loop at an
epoch boundary with nothing lost: a last checkpoint with the guest left suspended (it never
resumes here), every epoch's ACK and output, then the stream ends and the backup resumes
that last epoch, the guest's state exactly as it stopped here.

Pipelined epochs (``depth`` > 1, the Remus paper's design): checkpoint N+1 may be taken
while up to ``depth`` - 1 earlier epochs still await their ACK. Each epoch's output stays
in its own buffer (devices/netbuf.py); ACKs come in epoch order and each commits exactly
its epoch, in order, as soon as the loop sees it (between two checkpoints, or while it
waits for the interval); with ``depth`` epochs awaiting, the next checkpoint waits for the
oldest ACK. Depth 1 is the plain loop: the ACK of N before checkpoint N+1. Nothing of an
epoch without its ACK is ever committed, so the backup, resuming from its last committed
epoch, never lags what a client saw.

RemusLoop drives the one-shot engine's steps (save/engine.py) once per epoch;
CheckpointEmitter is the Emitter that holds an epoch while the guest is suspended and
sends it, after the resume, through the channel to the backup (channel/link.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xen_remus.channel.link import BackupLost, SenderLink
from xen_remus.channel.sender import Acked
from xen_remus.channel.stats import EpochStats
from xen_remus.errors import GuestHeld, XenRemusError
from xen_remus.save.engine import SaveEngine
from xen_remus.save.pages import Pfns, Types
from xen_remus.stream import consts as C
from xen_remus.stream import encoder
from xen_remus.stream.events import Buffer

log = logging.getLogger(__name__)

IDLE_EVERY = 0.01  # s between the devices' idle() calls while the loop waits


class EpochLink(Protocol):
    """What the loop needs of the channel to the backup (channel.link.SenderLink)."""

    def start_heartbeats(self) -> None: ...

    def stop_heartbeats(self) -> None: ...

    def idle(self, until: float) -> None: ...

    def epoch_sent(self, epoch: int, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats | None: ...

    def next_ack(self, until: float | None) -> Acked | None: ...


class EpochDevices(Protocol):
    """devices.DeviceSet: output commit (netbuf) and, later, disks."""

    def postsuspend(self, epoch: int) -> None: ...

    def preresume(self) -> None: ...

    def idle(self) -> None: ...

    def commit(self, epoch: int) -> None: ...


class EpochBuffer(Protocol):
    """The Emitter's local buffer (CheckpointEmitter below)."""

    buffering: bool

    def flush(self) -> None: ...

    def transmit(self) -> int: ...


class PipelineError(XenRemusError):
    """The backup acknowledged an epoch out of order."""


class HandoverFailed(XenRemusError):
    """The backup was lost after the handover's last checkpoint was sent whole: it may
    hold that epoch and resume it, so the guest stays suspended and paused here."""


class RemusLoop:
    """Continuous checkpoints of ``engine``'s domain (the Remus figure), one per interval:

        suspend -> copy dirty pages into the local buffer -> devices postsuspend -> state
        -> devices preresume -> resume (fast) -> transmit -> wait for the backup's ACK of
        epoch N -> devices commit(N) -> wait for the interval

    With ``depth`` D > 1 (pipelined epochs) up to D epochs await their ACK at once; the
    ACK wait of N overlaps the checkpoints after it, and commits stay in epoch order.

    Epoch 0 is the initial copy (pre-copy rounds, then the first checkpoint). ``run``
    returns when ``stop()`` was called (between epochs; the epochs then awaiting their ACK
    are committed first), or after a handover (``handover()``: ``handed_over``, the guest
    suspended and paused here at the last epoch, every epoch committed), and raises
    BackupLost (guest running here, unprotected; no epoch
    without its ACK committed) when the backup stops answering. Any other failure once an
    epoch was sent whole (the backup may hold it) leaves the guest paused here
    (``halted``): the backup resumes its copy when the stream ends. ``on_sent`` hears of
    each epoch sent whole. ``on_epoch`` gets each
    epoch's figures once known (at its ACK, or at once with a stock backup).
    ``before_precopy`` runs once the stream has begun, before the first pre-copy round
    (the disks' initial synchronisation, relayed while the guest runs).
    """

    def __init__(self, engine: SaveEngine, out: EpochBuffer, link: EpochLink,
                 devices: EpochDevices, interval_s: float,
                 on_epoch: Callable[[EpochStats], None] = lambda st: None,
                 clock: Callable[[], float] = time.monotonic, depth: int = 1,
                 before_precopy: Callable[[], None] | None = None,
                 before_commit: Callable[[int], None] | None = None,
                 on_sent: Callable[[int], None] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"pipeline depth {depth}: at least 1")
        self.engine, self.out, self.link, self.devices = engine, out, link, devices
        # The witness's lease (witness/lease.py OutputGate): returns once epoch N's
        # output may go out (it pauses the guest while it may not), or raises.
        self.before_commit = before_commit
        self.on_sent = on_sent  # epoch N is on its way whole: the backup may resume it
        self.interval_s = interval_s
        self.on_epoch = on_epoch
        self.clock = clock
        self.depth = depth
        self.before_precopy = before_precopy
        self.epoch = -1  # the last epoch committed by the backup
        self.sent = -1  # the last epoch transmitted
        self.awaiting: deque[int] = deque()  # transmitted, ACK not yet seen; oldest first
        self.halted = False  # a failure once an epoch was sent left the guest paused here
        self.final: int | None = None  # the handover's last epoch, once sent whole
        self.handed_over = False  # ... and committed: the backup resumes it
        self._stop = False
        self._handover = False

    def stop(self) -> None:
        self._stop = True

    def handover(self) -> None:
        """End at the next epoch boundary with the guest suspended for good: a last
        checkpoint it does not resume from, then the ACKs and output of every epoch."""
        self._handover = True

    def run(self) -> None:
        e = self.engine
        try:
            e.start_of_stream()
            self.out.flush()
            self.link.start_heartbeats()
            if self.before_precopy is not None:
                self.before_precopy()
            pending = e.precopy()
            next_at = self.clock()
            self.checkpoint(0, pending)
            # A handover asked for wins over a stop: the guest then leaves this host.
            while self.final is None and (self._handover or not self._stop):
                while len(self.awaiting) >= self.depth:  # the bound: the oldest ACK first
                    self._commit(self._next_ack(None))
                next_at = max(next_at + self.interval_s, self.clock())
                if not self._handover:
                    self._commit_until(next_at)
                if self._stop and not self._handover:
                    break
                self.checkpoint(self.sent + 1, None, final=self._handover)
            while self.awaiting:  # stopping: what the backup holds goes out here too
                self._commit(self._next_ack(None))
        except BackupLost as lost:
            if self.final is None:
                e.undo()  # the guest goes on here, unprotected (resumed if we had it suspended)
                raise
            # The last checkpoint went out whole and the guest never ran after it: the
            # backup may have committed it, so this copy must stay as it is.
            failed = HandoverFailed(f"handover: the ACK of the last epoch ({self.final}) did "
                                    f"not come: {lost}")
            self._halt(failed)
            raise failed from lost
        except BaseException as failure:
            if self.sent < 0:
                e.undo()  # the backup holds no whole epoch: the guest goes on here
                raise
            # The backup may resume from any epoch sent whole (its ACK may still be on its
            # way) when the stream ends: this copy must not run on beside it (and what it
            # said since is never released: devices' teardown drops it).
            if isinstance(failure, GuestHeld) and self.final is None:
                e.undo()  # paused already by whoever raised it: log-dirty off only
                self.halted = True
                raise
            self._halt(failure)
            raise
        finally:
            self.link.stop_heartbeats()
        if self.final is not None:
            self.handed_over = True
            self._halt(None)  # suspended for good; paused too, so no unpause runs it
        e.logdirty_off()

    def _halt(self, failure: BaseException | None) -> None:
        """The guest paused here, never resumed (suspended still, if it was)."""
        try:
            self.engine.halt()
            self.halted = failure is not None
        except XenRemusError as exc:
            log.error("pausing domain %d %s: %s", self.engine.dom.domid,
                      "after the failure" if failure else "after the handover (it stays "
                      "suspended)", exc)

    def checkpoint(self, epoch: int, pending: Pfns | None, final: bool = False) -> None:
        """Take and transmit epoch ``epoch``; its commit comes with its ACK (at once if no
        ACK will come: a stock backup). ``final``: the guest is not resumed (a handover)."""
        e = self.engine
        self.out.buffering = True
        t0 = self.clock()
        e.suspend()
        ts = self.clock()
        if pending is not None:
            e.send_final(pending)  # epoch 0: what pre-copy left, plus deferred pages
        else:
            e.send_pages(e.dirty_pfns(live=False), live=False)
        dirty = e.stats.rounds.pop().pages  # one record per epoch: keep the list short
        tp = self.clock()
        # Devices seal the epoch: net starts a new output buffer; disks have their servers
        # seal it and keep a place here for its last writes, read as transmit() gets to
        # it (their records go before CHECKPOINT).
        self.devices.postsuspend(epoch)
        td = self.clock()
        e.end_of_checkpoint()
        e.close_checkpoint()
        tv = self.clock()
        if not final:
            self.devices.preresume()
            e.resume()
        self.out.buffering = False
        t1 = self.clock()
        log.debug("epoch %d pause: suspend %.1f, pages %.1f, vcpu/state %.1f, devices %.1f, "
                  "resume %.1f ms", epoch, (ts - t0) * 1e3, (tp - ts) * 1e3, (tv - td) * 1e3,
                  (td - tp) * 1e3, (t1 - tv) * 1e3)
        self.out.transmit()
        t2 = self.clock()
        st = self.link.epoch_sent(epoch, (t1 - t0) * 1000, dirty, (t2 - t1) * 1000)
        self.sent = epoch
        if final:
            self.final = epoch
        if self.on_sent is not None:
            self.on_sent(epoch)
        if st is not None:  # no ACK will come: released once sent, all a stock backup allows
            self._release(epoch)
            self.epoch = epoch
            self.on_epoch(st)
        else:
            self.awaiting.append(epoch)

    def _commit_until(self, until: float) -> None:
        """Wait until ``until`` (the next checkpoint), committing each epoch as its ACK
        comes; the devices' idle work is done at least once, last just before ``until``."""
        while self.awaiting:
            ack = self._next_ack(until)
            if ack is None:
                return  # the interval is over; the ACKs still due are waited for later
            self._commit(ack)
        while True:
            self.link.idle(min(until, self.clock() + IDLE_EVERY))
            self.devices.idle()
            if self.clock() >= until:
                return

    def _next_ack(self, until: float | None) -> Acked | None:
        """``link.next_ack(until)``, waited for in steps of IDLE_EVERY with the devices'
        idle work after each step that brought no ACK."""
        while True:
            step = self.clock() + IDLE_EVERY
            if until is not None:
                step = min(step, until)
            ack = self.link.next_ack(step)
            if ack is not None:
                return ack
            early = self.clock() < step  # None before the step's end: none will come
            self.devices.idle()
            if early or (until is not None and self.clock() >= until):
                return None

    def _commit(self, ack: Acked | None) -> None:
        """The ACK of the oldest epoch awaiting one: commit exactly that epoch."""
        if not self.awaiting:
            raise PipelineError("ACK with no epoch awaiting one")
        oldest = self.awaiting[0]
        if ack is None or ack.epoch != oldest:
            got = "none" if ack is None else f"epoch {ack.epoch}"
            raise PipelineError(f"expected the ACK of epoch {oldest} (epochs awaiting one: "
                                f"{', '.join(map(str, self.awaiting))}), got {got}")
        self.awaiting.popleft()
        self._release(oldest)
        self.epoch = oldest
        self.on_epoch(ack.stats)

    def _release(self, epoch: int) -> None:
        if self.before_commit is not None:
            self.before_commit(epoch)  # the witness's lease: may pause the guest, or raise
        self.devices.commit(epoch)  # exactly epoch N's packets go out


class CheckpointStreamError(XenRemusError):
    """A record of the checkpointed stream could not be framed."""


@dataclass
class _Pages:
    pfns: Pfns
    types: Types
    data: bytes


class CheckpointEmitter:
    """The Emitter of the continuous save: the stream through the channel to the backup,
    each epoch first copied into a local buffer while the guest is suspended.

    Pre-copy (``buffering`` False) goes out as it is produced: the guest runs anyway. Once
    suspended (``buffering`` True) every record is copied (the page data is one copy out
    of the foreign mapping) and queued; ``transmit()`` sends the queue after the guest
    resumed, page data through ``SenderLink.send_pages`` (compressed once agreed).
    """

    def __init__(self, link: SenderLink, xl_config: str | None) -> None:
        self.link = link
        self.xl_config = xl_config
        self.buffering = False
        self.records = 0
        self.buffered_bytes = 0  # of the queue, before compression
        self._raw: list[Buffer] = []  # small records not yet sent or queued
        self._queue: list[list[Buffer] | _Pages | Callable[[], None]] = []

    # -- Emitter ------------------------------------------------------------------------
    def begin(self, domain_type: int) -> None:
        fmt = "xl" if self.xl_config is not None else "libxl"
        self._add(encoder.stream_start(fmt, domain_type, config_json=self.xl_config))

    def checkpoint(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self._add(encoder.end_of_epoch(wrapped=True, emulator=emulator))

    def end(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self._add(encoder.end_of_stream(wrapped=True, emulator=emulator))

    def libxc_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        try:
            self._add(encoder.record(rtype, body))
        except ValueError as exc:
            raise CheckpointStreamError(f"checkpoint stream: {exc}") from None

    def libxl_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self.libxc_record(rtype, body)  # same framing in both layers

    def page_data(self, pfns: Pfns, types: Types, pages: Sequence[Buffer]) -> None:
        self.records += 1
        if not self.buffering:
            self.flush()
            self.link.send_pages(pfns, types, list(pages))
            return
        # The local copy: guest memory may change (and is unmapped) once it resumes.
        data = b"".join(pages)
        if len(data) % C.PAGE_SIZE:
            raise CheckpointStreamError(f"checkpoint stream: PAGE_DATA data of {len(data)} "
                                        "bytes is not whole pages")
        self._queue_raw()
        self._queue.append(_Pages(pfns.copy(), types.copy(), data))
        self.buffered_bytes += len(data) + 16 + 8 * len(pfns)

    def later(self, send: Callable[[], None]) -> None:
        """``send()`` puts records into the stream here: at once if not buffering, else
        when ``transmit()`` gets to this point of the epoch (the guest runs again by
        then). A disk's last writes of the epoch are read from its server only then."""
        if not self.buffering:
            self.flush()
            send()
            return
        self._queue_raw()
        self._queue.append(send)

    def flush(self) -> None:
        if self.buffering:
            return  # everything waits for transmit()
        bufs, self._raw = self._raw, []
        if bufs:
            self.link.send(bufs)

    # -- the epoch ----------------------------------------------------------------------
    def transmit(self) -> int:
        """Send the buffered epoch (the guest runs again); returns its bytes before
        compression."""
        self._queue_raw()
        queue, self._queue = self._queue, []
        n, self.buffered_bytes = self.buffered_bytes, 0
        for item in queue:
            if isinstance(item, _Pages):
                self.link.send_pages(item.pfns, item.types, item.data)
            elif callable(item):
                item()  # its records go out as it makes them (not buffering now)
            else:
                self.link.send(item)  # CHECKPOINT ... CHECKPOINT_END: one call
        return n

    def _add(self, bufs: list[Buffer]) -> None:
        self.records += 1
        if self.buffering:
            bufs = [bytes(b) for b in bufs]  # bodies may be views of mapped guest state
            self.buffered_bytes += sum(len(b) for b in bufs)
        self._raw += bufs

    def _queue_raw(self) -> None:
        if self._raw:
            self._queue.append(self._raw)
            self._raw = []

