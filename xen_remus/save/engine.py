"""The save engine: one save of one domain, the loop-less case of the Remus figure.

    live pre-copy rounds under log-dirty (round 0 = every page; then what got dirty)
      -> suspend -> the pages still dirty (and deferred) -> vCPU/platform state -> END

The continuous save (`xen_remus.save_continuous`) drives the same steps once per epoch.
Record order follows libxc-migration-stream.pandoc; the guest-type specific records come
from GuestSaveOps (save/pv.py, save/hvm.py); framing and writing from the Emitter. An HVM
guest's device model (DeviceModelOps, save/devmodel.py) takes part as libxl has it: its
dirty logging with the live rounds, stopped and saved right after the guest suspends (so
its last writes into guest memory are among the final dirty pages), its records after
libxc's CHECKPOINT or END, running again before the guest resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from xen_remus.errors import XenRemusError
from xen_remus.pagetable import INVALID_MFN
from xen_remus.save.ops import DeviceModelOps, DomainOps, Emitter, GuestSaveOps
from xen_remus.save.pages import DeferredPages, Pfns, batches, merge
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import carries_data, valid_types

log = logging.getLogger(__name__)

INVALID_FRAME = np.uint64(INVALID_MFN)  # pfn_to_gfn of a pfn with no frame


class SaveError(XenRemusError):
    """The save failed at a known place: ``where`` names the round/pfn/record."""


@dataclass
class RoundStats:
    live: bool
    pfns: int = 0  # pfns in PAGE_DATA records (with or without data)
    pages: int = 0  # pages whose 4 KiB were sent
    deferred: int = 0
    seconds: float = 0.0


@dataclass
class SaveStats:
    rounds: list[RoundStats] = field(default_factory=list)
    suspend_s: float = 0.0  # asking the guest to suspend until it is suspended
    downtime_s: float = 0.0  # suspended until the stream's last record is written
    total_s: float = 0.0

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.rounds)

    def summary(self) -> str:
        live = sum(1 for r in self.rounds if r.live)
        return (f"{self.pages} pages in {live} live round(s) + final, "
                f"suspend {self.suspend_s * 1e3:.0f} ms, downtime {self.downtime_s * 1e3:.0f} ms, "
                f"total {self.total_s:.2f} s")


@dataclass(frozen=True)
class CopyProgress:
    """Where a copy round is, for a progress report: after each PAGE_DATA record of a
    round and once at its end (``round_done``). Pages count those whose data went out."""

    round: int  # 0: the first, full copy
    live: bool  # False: the guest is suspended (the final round of a save)
    pfns_done: int  # of this round
    pfns_todo: int  # this round's pfns
    pages_sent: int  # every round so far, this one included
    nr_pfns: int  # the guest's
    round_done: bool = False


class SaveEngine:
    """Saves one domain into ``out``. One-shot: ``run()``; the guest is left suspended on
    success (the caller destroys or resumes it) and running as it was on failure."""

    def __init__(self, dom: DomainOps, guest: GuestSaveOps, out: Emitter,
                 policy: PrecopyPolicy, dm: DeviceModelOps | None = None) -> None:
        self.dom = dom
        self.guest = guest
        self.dm = dm  # an HVM guest's device model; None for PV and PVH
        self.out = out
        self.policy = policy
        self.nr_pfns = guest.nr_pfns()
        self.deferred = DeferredPages(self.nr_pfns)
        self.stats = SaveStats()
        self._logdirty = False
        self._dm_logdirty = False
        self._suspended = False
        self._dm_stopped = False
        # Told where each round is (a progress report); set to None once not wanted: the
        # engine itself never prints.
        self.progress: Callable[[CopyProgress], None] | None = None
        self._pages_sent = 0

    # -- the figure ---------------------------------------------------------------------
    def run(self) -> SaveStats:
        t0 = time.monotonic()
        try:
            self.start_of_stream()
            pending = self.precopy() if self.policy.live else np.arange(self.nr_pfns,
                                                                         dtype=np.uint64)
            self.suspend()
            self.send_final(pending)
            self.end_of_checkpoint()
            self.out.end(self.dm.records() if self.dm is not None else ())
            self.out.flush()
            self.stats.downtime_s = time.monotonic() - self._suspended_at
            self.logdirty_off()
        except BaseException:
            self.undo()
            raise
        self.stats.total_s = time.monotonic() - t0
        return self.stats

    def start_of_stream(self) -> None:
        """Headers, static data (STATIC_DATA_END closes it), then PV's P2M frames."""
        self.out.begin(self.guest.domain_type)
        self.guest.static_data(self.out)
        self.out.libxc_record(C.REC_TYPE_STATIC_DATA_END, ())
        self.guest.start_of_stream(self.out)

    def precopy(self) -> Pfns:
        """Live rounds; returns the pfns dirtied in the last round, not yet sent."""
        self.dom.logdirty_enable()
        self._logdirty = True
        if self.dm is not None:
            self._dm_logdirty = True  # set first: a failed switch is switched off again
            self.dm.logdirty(True)
        self.send_pages(np.arange(self.nr_pfns, dtype=np.uint64), live=True)
        while True:
            dirty = self.dirty_pfns(live=True)
            rounds = len(self.stats.rounds)
            # Deferred pages wait for the suspend: ballooned pfns would never get fewer.
            if not self.policy.keep_going(rounds, len(dirty)):
                log.info("pre-copy: stop after %d round(s), %d dirty, %d deferred", rounds,
                         len(dirty), len(self.deferred))
                return dirty
            self.send_pages(dirty, live=True)

    def suspend(self) -> None:
        t = time.monotonic()
        self.dom.suspend()
        self._suspended = True
        if self.dm is not None:
            self._dm_stopped = True  # set first: a failed stop is followed by a cont
            self.dm.suspend()
        self._suspended_at = time.monotonic()
        self.stats.suspend_s = self._suspended_at - t

    def send_final(self, pending: Pfns) -> None:
        """Suspended: what is still dirty, what was deferred, and what the last live round
        left pending. Nothing can be deferred any more."""
        final = self.dirty_pfns(live=False) if self._logdirty else \
            self.guest.p2m_changes(self.out, live=False)
        self.send_pages(merge(merge(pending, final), self.deferred.take()), live=False)

    def dirty_pfns(self, live: bool) -> Pfns:
        """What the next round sends: the pfns dirtied since the last log-dirty clean and
        those whose frame the guest's p2m moved (its p2m record goes out first)."""
        moved = self.guest.p2m_changes(self.out, live)
        dirty = self.dom.logdirty_clean(final=not live)
        return merge(dirty, moved) if len(moved) else dirty

    def end_of_checkpoint(self) -> None:
        self.guest.end_of_checkpoint(self.out)

    def close_checkpoint(self) -> None:
        """libxc CHECKPOINT, the device model's records, libxl CHECKPOINT_END."""
        self.out.checkpoint(self.dm.records() if self.dm is not None else ())

    # -- pages --------------------------------------------------------------------------
    def send_pages(self, pfns: Pfns, live: bool) -> None:
        r = RoundStats(live=live)
        t = time.monotonic()
        n = len(self.stats.rounds)
        for batch in batches(pfns):
            self.write_batch(batch, live, r)
            if self.progress is not None:
                self.progress(CopyProgress(n, live, r.pfns, len(pfns),
                                           self._pages_sent + r.pages, self.nr_pfns))
        r.seconds = time.monotonic() - t
        self._pages_sent += r.pages
        self.stats.rounds.append(r)
        if self.progress is not None:
            self.progress(CopyProgress(n, live, r.pfns, len(pfns), self._pages_sent,
                                       self.nr_pfns, round_done=True))
        log.debug("round %d (%s): %d pfns, %d pages, %d deferred, %.3f s",
                  len(self.stats.rounds) - 1, "live" if live else "final", r.pfns, r.pages,
                  r.deferred, r.seconds)

    def write_batch(self, pfns: Pfns, live: bool, r: RoundStats) -> None:
        """One PAGE_DATA record (<= 1024 pfns): types, map the pages with data, normalise
        pagetables, write the record straight from the mapping, unmap."""
        frames = self.guest.pfn_to_gfn(pfns)
        types = np.full(len(pfns), C.PFINFO_XTAB, dtype=np.uint8)
        ok = frames != INVALID_FRAME
        if live and not ok.all():
            # Ballooned out (or not yet populated): XTAB now, looked at again once suspended,
            # where a pfn still without a frame simply stays XTAB.
            self.defer(pfns[~ok], r)
        if ok.any():
            types[ok] = self.guest_types(pfns[ok], frames[ok])
        data = carries_data(types)
        if not data.any():
            self.out.page_data(pfns, types, ())
            r.pfns += len(pfns)
            return
        m = self.dom.map(frames[data])
        try:
            bad = np.flatnonzero(m.errors)
            if len(bad):
                pfn = int(pfns[data][bad[0]])
                raise SaveError(f"domain {self.dom.domid}: mapping pfn {pfn:#x} failed "
                                f"(errno {int(m.errors[bad[0]])}); {len(bad)} page(s) of the "
                                "batch unmappable")
            norm = self.guest.normalise(types[data], m.view, live)
            keep = np.ones(int(data.sum()), dtype=np.bool_)
            if norm.retry is not None and norm.retry.any():
                if not live:
                    raise SaveError(f"domain {self.dom.domid}: pagetable at pfn "
                                    f"{int(pfns[data][norm.retry][0]):#x} refers to a frame "
                                    "outside the guest after suspend")
                idx = np.flatnonzero(data)[norm.retry]
                self.defer(pfns[idx], r)
                types[idx] = C.PFINFO_XTAB
                keep &= ~norm.retry
            bufs = page_buffers(m.view, keep, norm.replaced)
            self.out.page_data(pfns, types, bufs)
            r.pfns += len(pfns)
            r.pages += int(keep.sum())
        finally:
            m.close()

    def guest_types(self, pfns: Pfns, frames: Pfns) -> np.ndarray:
        types = self.dom.frame_types(frames)
        bad = ~valid_types(types)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SaveError(f"domain {self.dom.domid}: pfn {int(pfns[i]):#x} has page type "
                            f"{int(types[i]):#x}, which the stream cannot carry")
        return types

    def defer(self, pfns: Pfns, r: RoundStats) -> None:
        self.deferred.add(pfns)
        r.deferred += len(pfns)

    # -- leaving the guest as it was -----------------------------------------------------
    def logdirty_off(self) -> None:
        if self._logdirty:
            self._logdirty = False
            self.dom.logdirty_off()
        if self._dm_logdirty and self.dm is not None:
            self._dm_logdirty = False
            self.dm.logdirty(False)

    def undo(self) -> None:
        """After a failure: log-dirty off, and a guest we suspended resumed (its device
        model first). Errors here are logged, not raised: the first error is the one the
        user needs to see."""
        try:
            self.logdirty_off()
        except XenRemusError as exc:
            log.warning("turning log-dirty off after the failure: %s", exc)
        if self._dm_stopped and self.dm is not None:
            try:
                self.dm.resume()
                self._dm_stopped = False
            except XenRemusError as exc:  # the guest is resumed all the same: PV I/O works
                log.error("restarting domain %d's device model after the failure: %s",
                          self.dom.domid, exc)
        if self._suspended:
            try:
                self.dom.resume()
                self._suspended = False
            except XenRemusError as exc:
                log.error("resuming domain %d after the failure: %s", self.dom.domid, exc)

    def halt(self) -> None:
        """After a failure once the backup holds a checkpoint: the guest is paused (and
        stays suspended if it was), never resumed: the backup's copy takes over, and this
        one must not run on beside it. Raises if the pause fails."""
        try:
            self.logdirty_off()
        except XenRemusError as exc:
            log.warning("turning log-dirty off after the failure: %s", exc)
        self.dom.pause()

    def resume(self) -> None:
        """Let a suspended guest run on (a save with -c, each Remus epoch, a failure):
        its device model first, as libxl does: a stopped QEMU serves no I/O."""
        if self._dm_stopped and self.dm is not None:
            self.dm.resume()
            self._dm_stopped = False
        if self._suspended:
            self.dom.resume()
            self._suspended = False


def page_buffers(view: memoryview, keep: np.ndarray,
                 replaced: Mapping[int, Buffer]) -> list[Buffer]:
    """The data of the kept pages, in order, as few buffers as possible: each run of
    consecutive kept, unreplaced pages is one slice of ``view`` (no copy); a replaced page
    (a normalised pagetable) is its own buffer."""
    plain = keep.astype(np.int8)
    for i in replaced:
        plain[i] = 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], plain, [0]))))
    items: list[tuple[int, Buffer]] = [
        (int(s), view[int(s) * C.PAGE_SIZE:int(e) * C.PAGE_SIZE])
        for s, e in zip(edges[0::2], edges[1::2], strict=True)]
    items += [(i, page) for i, page in replaced.items() if keep[i]]
    items.sort(key=lambda it: it[0])
    return [buf for _, buf in items]

