"""The continuous save: the Remus epoch loop on the primary, one checkpoint per interval.

    epoch 0   pre-copy rounds while the guest runs (the one-shot engine's live phase),
              then the first checkpoint, as every later epoch:
    epoch N   suspend -> dirty pages into a local buffer
              -> devices postsuspend (net: a new output buffer starts; disks: the
                 epoch's writes and its seal join the buffer)
              -> vCPU/platform state -> devices preresume
              -> resume: the guest runs on, speculatively
              -> transmit the buffer -> the backup ACKs epoch N (a stock one cannot)
              -> devices commit(N) (disks, then net: epoch N's packets leave)
              -> wait for the interval

What the guest says to the world during an epoch leaves only once the backup holds the
state that said it. A backup that stops answering ends the loop with the guest running
here, unprotected.

RemusLoop drives the one-shot engine's steps (save/engine.py) once per epoch;
CheckpointEmitter is the Emitter that holds an epoch while the guest is suspended and
sends it, after the resume, through the channel to the backup (channel/link.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xen_remus.channel.ends import Acked
from xen_remus.channel.link import SenderLink
from xen_remus.channel.stats import EpochStats
from xen_remus.errors import XenRemusError
from xen_remus.save.engine import SaveEngine
from xen_remus.save.pages import Pfns, Types
from xen_remus.stream import consts as C
from xen_remus.stream import encoder
from xen_remus.stream.events import Buffer

log = logging.getLogger(__name__)


class EpochLink(Protocol):
    """What the loop needs of the channel to the backup (channel.link.SenderLink)."""

    def start_heartbeats(self) -> None: ...

    def stop_heartbeats(self) -> None: ...

    def idle(self, until: float) -> None: ...

    def epoch_sent(self, epoch: int, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats | None: ...

    def wait_ack(self, epoch: int) -> Acked | None: ...


class EpochDevices(Protocol):
    """devices.DeviceSet: output commit (netbuf) and, later, disks."""

    def postsuspend(self, epoch: int) -> None: ...

    def preresume(self) -> None: ...

    def commit(self, epoch: int) -> None: ...


class EpochBuffer(Protocol):
    """The Emitter's local buffer (CheckpointEmitter below)."""

    buffering: bool

    def flush(self) -> None: ...

    def transmit(self) -> int: ...


class RemusLoop:
    """Continuous checkpoints of ``engine``'s domain (the Remus figure), one per interval:

        suspend -> copy dirty pages into the local buffer -> devices postsuspend -> state
        -> devices preresume -> resume (fast) -> transmit -> wait for the backup's ACK of
        epoch N -> devices commit(N) -> wait for the interval

    Epoch 0 is the initial copy (pre-copy rounds, then the first checkpoint). ``run``
    returns when ``stop()`` was called (between epochs) and raises BackupLost (guest
    running here, unprotected) when the backup stops answering. ``on_epoch`` gets each
    epoch's figures once known (at its ACK, or at once with a stock backup).
    """

    def __init__(self, engine: SaveEngine, out: EpochBuffer, link: EpochLink,
                 devices: EpochDevices, interval_s: float,
                 on_epoch: Callable[[EpochStats], None] = lambda st: None,
                 clock: Callable[[], float] = time.monotonic,
                 before_commit: Callable[[int], None] | None = None) -> None:
        self.engine, self.out, self.link, self.devices = engine, out, link, devices
        # The witness's lease (witness/lease.py OutputGate): returns once epoch N's
        # output may go out (it pauses the guest while it may not), or raises.
        self.before_commit = before_commit
        self.interval_s = interval_s
        self.on_epoch = on_epoch
        self.clock = clock
        self.epoch = -1  # the last epoch committed by the backup
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        e = self.engine
        try:
            e.start_of_stream()
            self.out.flush()
            self.link.start_heartbeats()
            pending = e.precopy()
            next_at = self.clock()
            self.checkpoint(0, pending)
            while not self._stop:
                next_at = max(next_at + self.interval_s, self.clock())
                self.link.idle(next_at)
                if self._stop:
                    break
                self.checkpoint(self.epoch + 1, None)
        except BaseException:
            e.undo()  # log-dirty off; the guest resumed if we had it suspended
            raise
        finally:
            self.link.stop_heartbeats()
        e.logdirty_off()

    def checkpoint(self, epoch: int, pending: Pfns | None) -> None:
        e = self.engine
        self.out.buffering = True
        t0 = self.clock()
        e.suspend()
        ts = self.clock()
        if pending is not None:
            e.send_final(pending)  # epoch 0: what pre-copy left, plus deferred pages
        else:
            e.send_pages(e.dom.logdirty_clean(final=True), live=False)
        dirty = e.stats.rounds.pop().pages  # one record per epoch: keep the list short
        tp = self.clock()
        # Devices seal the epoch: net starts a new output buffer; disks put the epoch's
        # writes into this checkpoint (their records go before CHECKPOINT).
        self.devices.postsuspend(epoch)
        td = self.clock()
        e.end_of_checkpoint()
        e.out.checkpoint()
        tv = self.clock()
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
        ack = self.link.wait_ack(epoch)
        if self.before_commit is not None:
            self.before_commit(epoch)
        self.devices.commit(epoch)  # exactly epoch N's packets go out
        self.epoch = epoch
        if ack is not None:
            self.on_epoch(ack.stats)
        elif st is not None:
            self.on_epoch(st)


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
        self._queue: list[list[Buffer] | _Pages] = []

    # -- Emitter ------------------------------------------------------------------------
    def begin(self, domain_type: int) -> None:
        fmt = "xl" if self.xl_config is not None else "libxl"
        self._add(encoder.stream_start(fmt, domain_type, config_json=self.xl_config))

    def checkpoint(self) -> None:
        self._add(encoder.end_of_epoch(wrapped=True))

    def end(self) -> None:
        self._add(encoder.end_of_stream(wrapped=True))

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

