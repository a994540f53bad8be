"""Benchmark section: the replicated disk (xen_remus/disk) under fio, and what it adds to
the checkpoint pause.

Three fio jobs (time-based, RUNTIME s each, on an IMAGE_SIZE image in /dev/shm so the
figures are our software's, not a disk's): 4K random writes at QD1 and QD16, 128K
sequential writes at QD16. Each runs against
  loop          a plain loop device over the image (``file`` if ``losetup -f`` fails here:
                the image itself), libaio, buffered: the kernel's own path;
  unreplicated  the disk daemon, `xen-remus disk serve` (the process block-remus starts
                in dom0), through fio's nbd engine, with no protection;
  replicated    the same daemon protected the way `xen-remus protect` does it: the epoch
                loop (RemusLoop over an in-memory 64 MiB guest that dirties DIRTY pages an
                epoch, one checkpoint every INTERVAL_S, protect's default) seals each
                epoch's writes into its checkpoint (ReplicatedDisk over SocketControl) and
                sends it to the real receiver in another process, which holds the disk
                writes per epoch, commits them with the epoch and ACKs it. After the jobs
                the backup's image must equal the primary's.
Figures: IOPS of the 4K jobs and MiB/s of the 128K one per target; per job the ratios
<job>_unreplicated_vs_<loop or file> and <job>_replicated_vs_unreplicated (target:
replication keeps at least half); the checkpoint pause's median with the disk idle and
during each replicated job, and pause_<job>_vs_idle (target: a busy disk makes the pause
at most 1.1x longer). The jobs alternate between the two daemons, and "idle" is while a
job runs on the unprotected one, so that both pauses are taken under the same load. The
pause here is the in-memory guest's (its dirty pages copied, no hypervisor: a few ms), so
the disk's share of it shows larger than beside a real guest's pause (70-86 ms in the lab
under TCG, docs/MEASUREMENTS.md).
"""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.remus import NR_PFNS, guest_memory
from tests.fakes import MemDomain, MemGuest
from xen_remus.channel.ends import Config
from xen_remus.channel.link import SenderLink
from xen_remus.channel.sender import SenderChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.cli.protect_disks import replicated_disk, sync_disks
from xen_remus.cli.protect_run import _await_offer, read_banner
from xen_remus.devices.base import DeviceSet
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.stream.consts import PAGE_SIZE
from xen_remus.stream.events import Buffer

RUNTIME = 3  # s per fio job
IMAGE_SIZE = 64 * 1024 * 1024
INTERVAL_S = 0.2  # protect's default -i 200
DIRTY = 1000  # guest pages dirtied per epoch (as bench/remus.py)
IDLE_S = 3.0  # of checkpoints with the disk idle, for the pause without disk writes
HEARTBEAT_MS = 10_000  # both ends: fio, the daemon and both ends share this host's cores
REPO = Path(__file__).resolve().parent.parent
# name -> (fio rw, block size, iodepth)
JOBS: dict[str, tuple[str, str, int]] = {
    "rand4k_qd1": ("randwrite", "4k", 1),
    "rand4k_qd16": ("randwrite", "4k", 16),
    "seq128k_qd16": ("write", "128k", 16),
}
TARGETS = {**{f"{job}_replicated_vs_unreplicated": (">=", 0.5) for job in JOBS},
           **{f"pause_{job}_vs_idle": ("<=", 1.1) for job in JOBS}}


def _fio(job: str, target: list[str]) -> float:
    """IOPS (4K jobs) or MiB/s of one fio job."""
    rw, bs, depth = JOBS[job]
    cmd = ["fio", "--name", job, "--rw", rw, "--bs", bs, "--iodepth", str(depth),
           "--size", str(IMAGE_SIZE), "--time_based", "--runtime", str(RUNTIME),
           "--output-format", "json", *target]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNTIME + 120)
    if r.returncode != 0:
        raise RuntimeError(f"fio {job} on {target}: exit {r.returncode}: {r.stderr[-1500:]}")
    w = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]  # nbd logs first
    return float(w["iops"]) if bs == "4k" else float(w["bw_bytes"]) / 2**20


def _image(path: str) -> str:
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@contextmanager
def _baseline(image: str) -> Iterator[tuple[str, str]]:
    """(name, path): a loop device over ``image`` if one can be attached, else the file."""
    got = subprocess.run(["losetup", "-f", "--show", image], capture_output=True, text=True)
    if got.returncode != 0:
        yield "file", image
        return
    dev = got.stdout.strip()
    try:
        yield "loop", dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@contextmanager
def _daemon(d: str, image: str) -> Iterator[tuple[list[str], str]]:
    """`xen-remus disk serve` for ``image``, its sockets, state and log in ``d``: (fio's nbd
    target, its replication socket)."""
    os.makedirs(d, exist_ok=True)
    nbd, replica = os.path.join(d, "nbd.sock"), os.path.join(d, "replica.sock")
    env = dict(os.environ, PYTHONPATH=str(REPO), XEN_REMUS_STATE_DIR=os.path.join(d, "st"))
    with open(os.path.join(d, "daemon.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "xen_remus", "disk", "serve", image,
                                 "--nbd", nbd, "--replica", replica], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(nbd) and os.path.exists(replica)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the disk daemon did not start: "
                                   f"{Path(d, 'daemon.log').read_text()[-1500:]}")
            time.sleep(0.05)
        yield ["--ioengine", "nbd", "--uri", f"nbd+unix:///?socket={nbd}"], replica
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _DroppingSink:
    """The backup's guest, for the bench: the memory is dropped, the disk is the point."""

    def __init__(self) -> None:
        self.domain_name: str | None = None

    def send(self, bufs: Sequence[Buffer]) -> None:
        pass

    def committed(self, epoch: int) -> None:
        pass

    def failover(self, epoch: int) -> None:
        pass

    def hold(self, epoch: int) -> None:
        pass

    def abort(self, why: str) -> None:
        pass

    def incoming_name(self) -> str:
        return "bench--incoming"


def _receiver(path: str, d: str, ready: MpEvent) -> None:
    """The backup process: the real receive, its disk replica from the stream's config."""
    os.environ["XEN_REMUS_STATE_DIR"] = os.path.join(d, "st-b")
    os.environ["XEN_REMUS_RUN_DIR"] = os.path.join(d, "run-b")
    from xen_remus.channel.receiver import ReceiverChannel
    from xen_remus.receive.driver import receive
    from xen_remus.receive.upstream import Upstream

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    up = Upstream(conn.fileno(), conn.fileno(), idle_timeout=60.0, io_timeout=60.0)
    out = receive(up, cast(Any, _DroppingSink()), True, chan=ReceiverChannel(
        Config(disk=True, heartbeat_timeout_ms=HEARTBEAT_MS), time.monotonic()))
    sys.exit(0 if out.kind == "failover" else 3)


def _protected(d: str, plain: list[str], uri: list[str], replica: str, backup: str
               ) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Each job on the unprotected daemon (``plain``), then on the daemon protected into a
    receiver process (``uri``, ``replica``), alternately (a loaded host drifts): their
    figures, and the checkpoint pauses (ms) by phase: "idle" while the job runs on the
    other daemon (the same load on this host's cores, no write to the protected disk), or
    the job."""
    ctx = multiprocessing.get_context("spawn")  # not fork: this process has threads
    ready, rsock = ctx.Event(), os.path.join(d, "recv.sock")
    proc = ctx.Process(target=_receiver, args=(rsock, d, ready), daemon=True)
    proc.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    figures: dict[str, dict[str, float]] = {"unreplicated": {}, "replicated": {}}
    pauses: dict[str, list[float]] = {}
    try:
        while not ready.wait(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"the backup process exited with {proc.exitcode}")
        sock.connect(rsock)
        rest = read_banner(sock.fileno(), 30, "the bench's backup")
        link = SenderLink(SenderChannel(Config(disk=True, generation=1,
                                               heartbeat_timeout_ms=HEARTBEAT_MS),
                                        time.monotonic()), sock.fileno(), sock.fileno())
        _await_offer(link, rest, 10.0)
        out = CheckpointEmitter(link, json.dumps(
            {"c_info": {"name": "bench"}, "disks": [{"vdev": "xvda", "pdev_path": backup}]}))
        dom = MemDomain(guest_memory())
        engine = SaveEngine(dom, MemGuest(NR_PFNS), out, PrecopyPolicy(1, 10 ** 9))
        disk = replicated_disk("xvda", replica, out, 1)
        rng = np.random.default_rng(3)
        phase = ["idle"]
        protecting = threading.Event()
        failed: list[BaseException] = []

        def on_epoch(st: EpochStats) -> None:
            if st.epoch == 0:
                protecting.set()
            else:
                pauses.setdefault(phase[0], []).append(st.pause_ms)
            pfns = np.sort(rng.choice(NR_PFNS, DIRTY, replace=False))
            for off in rng.integers(0, PAGE_SIZE, 4):  # a few bytes of each page
                dom.mem[pfns, off] += 1
            dom.dirty = pfns.astype(np.uint64)

        with DeviceSet([disk]) as devs:
            loop = RemusLoop(engine, out, link, devs, INTERVAL_S, on_epoch=on_epoch,
                             before_precopy=lambda: sync_disks([disk], link, out))

            def run() -> None:
                try:
                    loop.run()
                except BaseException as exc:  # reported by the main thread
                    failed.append(exc)
                    protecting.set()

            th = threading.Thread(target=run, name="epoch-loop")
            th.start()
            try:
                if not protecting.wait(180) or failed:
                    raise RuntimeError(f"protection did not start: {failed or 'timeout'}")
                time.sleep(IDLE_S)
                for job in JOBS:
                    phase[0] = "idle"
                    figures["unreplicated"][job] = _fio(job, plain)
                    phase[0] = job
                    figures["replicated"][job] = _fio(job, uri)
                    if failed:
                        raise RuntimeError(f"protection failed during {job}: {failed[0]}")
                phase[0] = "after"
                # fio's writes are all done: the checkpoint after the one in progress
                # holds the last of them; wait until the backup committed it.
                last, deadline = loop.sent + 2, time.monotonic() + 120
                while loop.epoch < last and not failed:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"epoch {last} not committed within 120 s")
                    time.sleep(0.05)
            finally:
                loop.stop()
                th.join(120)
        if failed:
            raise RuntimeError(f"protection failed: {failed[0]}")
    finally:
        sock.close()  # the primary gone: the backup fails over from its last epoch
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    if proc.exitcode != 0:
        raise RuntimeError(f"the backup process exited with {proc.exitcode}")
    return figures, pauses


def run() -> dict[str, float]:
    if shutil.which("fio") is None:
        raise SystemExit("bench disk: fio not found; install Debian's fio package "
                         "(make host-deps)")
    d = tempfile.mkdtemp(prefix="bench-disk-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                         else None)
    try:
        with _baseline(_image(os.path.join(d, "base"))) as (base, path):
            res = {base: {job: _fio(job, ["--ioengine", "libaio", "--direct", "0",
                                          "--filename", path]) for job in JOBS}}
        primary, backup = _image(os.path.join(d, "a")), _image(os.path.join(d, "b"))
        with _daemon(os.path.join(d, "du"), _image(os.path.join(d, "u"))) as (
                plain, _), _daemon(os.path.join(d, "da"), primary) as (uri, replica):
            both, pauses = _protected(d, plain, uri, replica, backup)
            res.update(both)
            if not filecmp.cmp(primary, backup, shallow=False):
                raise RuntimeError("the backup's image differs from the primary's after "
                                   "the jobs")
    finally:
        shutil.rmtree(d)
    unit = {job: "iops" if JOBS[job][1] == "4k" else "MiBps" for job in JOBS}
    figures = {f"{t}.{job}_{unit[job]}": v for t, jobs in res.items() for job, v in jobs.items()}
    for job in JOBS:
        figures[f"{job}_unreplicated_vs_{base}"] = res["unreplicated"][job] / res[base][job]
        figures[f"{job}_replicated_vs_unreplicated"] = (res["replicated"][job]
                                                        / res["unreplicated"][job])
    idle = statistics.median(pauses["idle"])
    figures["pause_ms_idle"] = idle
    for job in JOBS:
        busy = statistics.median(pauses[job])
        figures[f"pause_ms_{job}"] = busy
        figures[f"pause_{job}_vs_idle"] = busy / idle
    return figures
