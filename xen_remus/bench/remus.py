"""Benchmark section: the Remus epoch loop (save_continuous.RemusLoop).

Host part (no Xen): the loop over an in-memory 64 MiB guest that dirties DIRTY pages per
epoch (a few words each, as a running guest does), into a black hole (the stream to
/dev/null, a silent back channel, no ACK): pause per checkpoint (suspend -> resume: the
copy into the local buffer) and send time, and wire bytes per epoch with lz4-over-XOR
compression and without (-u). (A same-run baseline for the pause is still missing: a
plain gather+copy of the same pages measured 8x slower than the loop's, an artefact of
allocation and caches not yet understood, so it is not shown.)

Lab part (``python -m xen_remus.bench.remus --lab``): one host, a PV guest protected by
`xen-remus protect -b` at -i 10, 25 and 200 (checkpoints/s and pause ms from its summary).
Not yet: stock `xl remus -F -n -d` on the same guest in the same run (it reports no pause
times, and an interrupted `xl remus -b` leaves the guest suspended).
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import numpy.typing as npt

from xen_remus.bench.fakes import MemGuest
from xen_remus.remus.channel import Config, SenderChannel
from xen_remus.remus.link import SenderLink
from xen_remus.remus.negotiate import Extensions
from xen_remus.remus.stats import EpochStats
from xen_remus.save.checkpoint import CheckpointEmitter
from xen_remus.save.pages import PAGE_SIZE, Pfns
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import RemusLoop, SaveEngine

NR_PFNS = 64 * 256
DIRTY = 1000
EPOCHS = 60


class _Mapped:
    def __init__(self, arr: npt.NDArray[np.uint8]) -> None:
        self.view = memoryview(arr.reshape(-1).data)
        self.errors = np.zeros(len(arr), dtype=np.int32)

    def close(self) -> None:
        pass


class _Domain:
    """Memory as an (n x 4096) array; dirty pages are what the test wrote since the last
    clean. Mapping gathers the frames (a foreign map would not copy; the loop copies
    once more into its buffer)."""

    domid = 0

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.mem = rng.integers(0, 256, (NR_PFNS, PAGE_SIZE), dtype=np.uint8)
        self.mem[rng.random(NR_PFNS) < 0.3] = 0
        self.dirty = np.zeros(0, dtype=np.uint64)

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
        return np.zeros(len(frames), dtype=np.uint8)

    def map(self, frames: npt.NDArray[np.uint64]) -> _Mapped:
        return _Mapped(self.mem[frames.astype(np.int64)])

    def suspend(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def logdirty_enable(self) -> None:
        pass

    def logdirty_clean(self, final: bool) -> Pfns:
        out, self.dirty = self.dirty, np.zeros(0, dtype=np.uint64)
        return out

    def logdirty_off(self) -> None:
        pass


class _NoDevices:
    def postsuspend(self, epoch: int) -> None:
        pass

    def preresume(self) -> None:
        pass

    def commit(self, epoch: int) -> None:
        pass


def _loop(compress: bool) -> list[EpochStats]:
    dom, rng = _Domain(), np.random.default_rng(2)
    null = os.open(os.devnull, os.O_WRONLY)
    rfd, wfd = os.pipe()
    try:
        chan = SenderChannel(Config(ack=False, compression=compress), time.monotonic())
        # What a backup offering compression only would say (no ACK, no heartbeats).
        offer = Extensions(ack=False, heartbeat=None, lz4_xor_mib=256 if compress else None)
        chan.feed_back(offer.offer_line(), time.monotonic())
        link = SenderLink(chan, null, rfd)
        out = CheckpointEmitter(link, None)
        engine = SaveEngine(dom, MemGuest(NR_PFNS), out, PrecopyPolicy(1, 10 ** 9))
        stats: list[EpochStats] = []

        def on_epoch(st: EpochStats) -> None:
            stats.append(st)
            if st.epoch >= EPOCHS:
                loop.stop()
            pfns = np.sort(rng.choice(NR_PFNS, DIRTY, replace=False))
            for off in rng.integers(0, PAGE_SIZE, 4):  # a few bytes of each page
                dom.mem[pfns, off] += 1
            dom.dirty = pfns.astype(np.uint64)

        loop = RemusLoop(engine, out, link, _NoDevices(), 0.0, on_epoch=on_epoch)
        loop.run()
        return stats[1:]
    finally:
        for fd in (null, rfd, wfd):
            os.close(fd)


def run() -> dict[str, float]:
    z, u = _loop(True), _loop(False)
    pause = float(np.median([s.pause_ms for s in z]))
    pause_u = float(np.median([s.pause_ms for s in u]))
    wire = float(np.mean([s.wire_bytes for s in z]))
    raw = float(np.mean([s.wire_bytes for s in u]))
    return {f"pause_ms_{DIRTY}_dirty": pause, f"pause_ms_{DIRTY}_dirty_u": pause_u,
            "send_ms_lz4": float(np.median([s.send_ms for s in z])),
            "send_ms_u": float(np.median([s.send_ms for s in u])),
            "wire_bytes_per_epoch_lz4": wire, "wire_bytes_per_epoch_u": raw,
            "compression_ratio": raw / wire}


def run_lab(seconds: float = 12.0) -> dict[str, float]:
    """Ours (`protect -b`) on one lab host."""
    from lab import guest
    from lab.lab import Lab

    xr = "cd /mnt/project && python3 -m xen_remus"
    spec = guest.GuestSpec(name="brem", kind="pv", ip="169.254.20.52", mac="00:16:3e:00:03:02")
    out: dict[str, float] = {}
    with Lab(1) as lab:
        h = lab.a
        guest.create(h, spec, timeout=240)
        for ms in (10, 25, 200):
            job = h.spawn(f"exec {xr} protect -b -F -n -d -i {ms} {spec.name} none")
            time.sleep(seconds)
            h.run(f"pkill -INT -f 'xen_remus protect -b -F -n -d -i {ms} '; true")
            r = job.wait(120)
            m = re.search(r"(\d+) checkpoints in ([\d.]+) s \(([\d.]+)/s\); pause mean "
                          r"([\d.]+) ms, median ([\d.]+) ms", r.stderr)
            if not m:
                raise RuntimeError(f"protect -b -i {ms}: no summary in {r.stderr[-1500:]!r}")
            out[f"ours_i{ms}_checkpoints_per_s"] = float(m.group(3))
            out[f"ours_i{ms}_pause_ms_median"] = float(m.group(5))
    return out


if __name__ == "__main__":
    import sys

    figures = run_lab() if "--lab" in sys.argv else run()
    for k, v in figures.items():
        print(f"remus: {k} = {v:.3f}")
