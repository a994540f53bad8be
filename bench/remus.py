"""Benchmark section: the Remus epoch loop (save_continuous.RemusLoop).

Host part (no Xen): the loop over an in-memory 64 MiB guest that dirties DIRTY pages per
epoch (a few words each, as a running guest does), into a black hole (the stream to
/dev/null, a silent back channel, no ACK): pause per checkpoint (suspend -> resume: the
copy into the local buffer) and send time, and wire bytes per epoch with lz4-over-XOR
compression and without (-u). (A same-run baseline for the pause is still missing: a
plain gather+copy of the same pages measured 8x slower than the loop's, an artefact of
allocation and caches not yet understood, so it is not shown.)

Lab part (``lab_figures``; ``make bench``, or ``python -m bench.remus --lab``): one
host, one PV guest protected into a receiver on the same host at -i 10, 25 and 200, by
`xen-remus protect -F -n -d` (checkpoints/s, pause ms, wire bytes from its summary; -u too
at 200; --pipeline 2 and 3 too at 25 and 200, with their ratio to depth 1) and by stock
`xl remus -F -n -d` (checkpoints/s and dirty pages from libxc's progress lines: xl reports
no pause times).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.fakes import MemDomain, MemGuest, NoDevices
from xen_remus.channel.ends import Config
from xen_remus.channel.link import SenderLink
from xen_remus.channel.negotiate import Extensions
from xen_remus.channel.sender import SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.stream.consts import PAGE_SIZE

NR_PFNS = 64 * 256
PIPELINED_AT = (25, 200)  # -i at which the lab part also runs --pipeline DEPTHS
DEPTHS = (2, 3)
DIRTY = 1000
EPOCHS = 60


def guest_memory() -> npt.NDArray[np.uint8]:
    """The 64 MiB guest: random pages, 30% of them zero."""
    rng = np.random.default_rng(1)
    mem = rng.integers(0, 256, (NR_PFNS, PAGE_SIZE), dtype=np.uint8)
    mem[rng.random(NR_PFNS) < 0.3] = 0
    return mem


def fake_loop(compress: bool, out_fd: int, back_fd: int, epochs: int, dirty: int,
              on_stats: Callable[[EpochStats, SenderLink], None] | None = None,
              loop_cls: type[RemusLoop] = RemusLoop) -> None:
    """RemusLoop over the in-memory guest for ``epochs`` epochs, ``dirty`` pages dirtied per
    epoch (a few bytes each), the stream into ``out_fd``, ``back_fd`` a silent back channel."""
    dom, rng = MemDomain(guest_memory()), np.random.default_rng(2)
    chan = SenderChannel(Config(ack=False, compression=compress), time.monotonic())
    # What a backup offering compression only would say (no ACK, no heartbeats).
    offer = Extensions(ack=False, heartbeat=None, lz4_xor_mib=256 if compress else None)
    chan.feed_back(offer.offer_line(), time.monotonic())
    link = SenderLink(chan, out_fd, back_fd)
    out = CheckpointEmitter(link, None)
    engine = SaveEngine(dom, MemGuest(NR_PFNS), out, PrecopyPolicy(1, 10 ** 9))

    def on_epoch(st: EpochStats) -> None:
        if on_stats is not None:
            on_stats(st, link)
        if st.epoch >= epochs:
            loop.stop()
        pfns = np.sort(rng.choice(NR_PFNS, dirty, replace=False))
        for off in rng.integers(0, PAGE_SIZE, 4):  # a few bytes of each page
            dom.mem[pfns, off] += 1
        dom.dirty = pfns.astype(np.uint64)

    loop = loop_cls(engine, out, link, NoDevices(), 0.0, on_epoch=on_epoch)
    loop.run()


def _loop(compress: bool) -> list[EpochStats]:
    null = os.open(os.devnull, os.O_WRONLY)
    rfd, wfd = os.pipe()
    stats: list[EpochStats] = []
    try:
        fake_loop(compress, null, rfd, EPOCHS, DIRTY, lambda st, _link: stats.append(st))
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


PHASES = re.compile(r"pause: suspend ([\d.]+), pages ([\d.]+), vcpu/state ([\d.]+), "
                    r"devices ([\d.]+), resume ([\d.]+) ms")
EPOCH = re.compile(r"^epoch \d+: .*, send ([\d.]+) ms, ack ([\d.]+) ms$", re.M)
STOCK_CKPT = re.compile(r"Checkpointed save: (\d+)/")
OURS_SUMMARY = re.compile(r"(\d+) checkpoints in ([\d.]+) s \(([\d.]+)/s\); pause mean "
                          r"([\d.]+) ms, median ([\d.]+) ms.*?bytes (\d+) -> (\d+) per epoch")


def lab_figures(h: Any, seconds: float = 40.0) -> dict[str, float]:
    """On lab host ``h``: each side protects the same PV guest into its own receiver on the
    same host (no link: the epoch loops, not the wire) for ``seconds`` after the initial
    copy, at -i 10, 25 and 200, then the backup is killed (the primary goes on)."""
    from lab import guest

    xr = "python3 -m xen_remus"  # run from /mnt/project (the checkout)
    spec = guest.GuestSpec(name="brem", kind="pv", ip="169.254.20.52", mac="00:16:3e:00:03:02")
    out: dict[str, float] = {}
    guest.create(h, spec, timeout=240)

    def stop_backup(job: Any) -> str:
        # Anchored: the senders' own command lines name the receiver command too.
        h.run("pkill -9 -f '^(/bin/sh -c )?(cd /mnt/project && )?(python3 -m xen_remus |xl )"
              "migrate-receive'; sleep 2; xl destroy brem--incoming 2>/dev/null; true",
              timeout=120)
        r = job.wait(180)
        if guest.domain_state(h, spec.name) is None:
            raise RuntimeError(f"{spec.name} gone after its backup was killed: {r.stderr[-1500:]}")
        return str(r.stderr)

    for ms in (10, 25, 200):
        runs = [("", "ours")] + ([("-u ", "ours_u")] if ms == 200 else [])
        if ms in PIPELINED_AT:
            runs += [(f"--pipeline {d} ", f"ours_p{d}") for d in DEPTHS]
        for flags, tag in runs:
            job = h.spawn(f"cd /mnt/project && exec {xr} -vv protect {flags}-F -n -d -i {ms} "
                          f"-s '' {spec.name} 'cd /mnt/project && {xr} migrate-receive -r'")
            job.wait_output(r"protecting", 600, stderr=True)
            time.sleep(seconds)
            err = stop_backup(job)
            m = OURS_SUMMARY.search(err)
            if not m:
                raise RuntimeError(f"protect -i {ms}: no summary in {err[-1500:]!r}")
            out[f"{tag}_i{ms}_checkpoints_per_s"] = float(m[3])
            out[f"{tag}_i{ms}_pause_ms_median"] = float(m[5])
            out[f"{tag}_i{ms}_wire_bytes_per_epoch"] = float(m[7])
            phases = [[float(x) for x in p] for p in PHASES.findall(err)[1:]]  # not epoch 0
            after = [[float(x) for x in p] for p in EPOCH.findall(err)[1:]]
            for rows, names in ((phases, ("suspend", "pages", "state", "devices", "resume")),
                                (after, ("send", "ack"))):
                for i, name in enumerate(names):
                    if rows:
                        col = sorted(p[i] for p in rows)
                        out[f"{tag}_i{ms}_{name}_ms_median"] = col[len(col) // 2]
        for d in DEPTHS if ms in PIPELINED_AT else ():
            depth1 = out[f"ours_i{ms}_checkpoints_per_s"]
            out[f"i{ms}_checkpoints_per_s_p{d}_vs_p1"] = (
                out[f"ours_p{d}_i{ms}_checkpoints_per_s"] / depth1 if depth1 else 0.0)
        # Stock: libxc prints a progress line per checkpoint; count them over the window.
        job = h.spawn(f"exec xl remus -F -n -d -i {ms} -s '' {spec.name} 'xl migrate-receive -r'")
        job.wait_output(STOCK_CKPT.pattern, 600, stderr=True)
        n0, t0 = len(STOCK_CKPT.findall(job.stderr())), time.monotonic()
        time.sleep(seconds)
        n1, t1 = len(STOCK_CKPT.findall(job.stderr())), time.monotonic()
        pages = [int(x) for x in STOCK_CKPT.findall(job.stderr())[n0:n1]]
        stop_backup(job)
        out[f"xl_i{ms}_checkpoints_per_s"] = (n1 - n0) / (t1 - t0)
        out[f"xl_i{ms}_dirty_pages_mean"] = sum(pages) / len(pages) if pages else 0.0
        out[f"i{ms}_checkpoints_per_s_ours_vs_xl"] = (
            out[f"ours_i{ms}_checkpoints_per_s"] / out[f"xl_i{ms}_checkpoints_per_s"]
            if n1 > n0 else 0.0)
    out["i200_compression_ratio"] = (out["ours_u_i200_wire_bytes_per_epoch"]
                                     / out["ours_i200_wire_bytes_per_epoch"])
    h.run(f"xl destroy {spec.name}", timeout=60)
    return out


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    raise SystemExit(main(["remus", *sys.argv[1:]]))
