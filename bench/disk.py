"""Benchmark section: the replicated disk (xen_remus/disk) under fio.

Three fio jobs (time-based, RUNTIME s each, on an IMAGE_SIZE image in /dev/shm so the
figures are our software's, not a disk's): 4K random writes at QD1 and QD16, 128K
sequential writes at QD16. Each runs against
  loop          a plain loop device over the image (``file`` if ``losetup -f`` fails here:
                the image itself), libaio, buffered: the kernel's own path;
  unreplicated  our NBD server (DiskServer, in a thread here) through fio's nbd engine;
  replicated    the same, replicating to a backup EpochStore in another process (as on
                another host) that commits each epoch as its seal arrives; an epoch is
                sealed every SEAL_INTERVAL s, like a Remus checkpoint. After the jobs the
                backup's image must equal the primary's.
Figures: IOPS of the 4K jobs, MiB/s of the 128K one, for each target, and per job the
ratios <job>_unreplicated_vs_<loop or file> and <job>_replicated_vs_unreplicated (target:
replication keeps at least half the unreplicated figure).
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event as MpEvent

from tests.unit.disk_helpers import ServerThread
from xen_remus.disk.device import LoopControl
from xen_remus.disk.link import ReplicaSender, serve_backup
from xen_remus.disk.store import EpochStore

RUNTIME = 3  # s per fio job
IMAGE_SIZE = 64 * 1024 * 1024
SEAL_INTERVAL = 0.1  # s
# name -> (fio rw, block size, iodepth)
JOBS: dict[str, tuple[str, str, int]] = {
    "rand4k_qd1": ("randwrite", "4k", 1),
    "rand4k_qd16": ("randwrite", "4k", 16),
    "seq128k_qd16": ("write", "128k", 16),
}
TARGETS = {f"{job}_replicated_vs_unreplicated": (">=", 0.5) for job in JOBS}


def _fio(job: str, target: list[str], tick: Callable[[], None] | None = None) -> float:
    """IOPS (4K jobs) or MiB/s of one fio job; ``tick()`` runs every SEAL_INTERVAL s."""
    rw, bs, depth = JOBS[job]
    cmd = ["fio", "--name", job, "--rw", rw, "--bs", bs, "--iodepth", str(depth),
           "--size", str(IMAGE_SIZE), "--time_based", "--runtime", str(RUNTIME),
           "--output-format", "json", *target]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while tick is not None and proc.poll() is None:
            time.sleep(SEAL_INTERVAL)
            tick()
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:  # a tick failed: no fio left behind
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job} on {target}: exit {proc.returncode}: {err[-1500:]}")
    w = json.loads(out[out.index("{"):])["jobs"][0]["write"]  # nbd may log before the JSON
    return float(w["iops"]) if bs == "4k" else float(w["bw_bytes"]) / 2**20


def _all_jobs(target: list[str], tick: Callable[[], None] | None = None
              ) -> dict[str, float]:
    return {job: _fio(job, target, tick) for job in JOBS}


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


def _backup(image: str, sock: str, ready: MpEvent) -> None:
    """The backup process: one primary's stream into an EpochStore, each epoch committed
    (by a thread, as the receiver's memory side does) as soon as it is sealed."""
    store = EpochStore(image)
    ended = threading.Event()

    def commit() -> None:
        while not ended.is_set():
            if store.wait_sealed(store.committed_through + 1, SEAL_INTERVAL):
                store.commit(store.sealed_through)
        store.commit(store.sealed_through)

    async def serve() -> None:
        done = asyncio.Event()

        async def conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await serve_backup(r, w, store)
            done.set()
        server = await asyncio.start_unix_server(conn, sock)
        ready.set()
        await done.wait()
        server.close()

    committer = threading.Thread(target=commit)
    committer.start()
    try:
        asyncio.run(serve())
    finally:
        ended.set()
        committer.join()
        store.close()


def _replicated(d: str, uri: list[str], st: ServerThread) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")  # not fork: this process has threads
    ready, bsock = ctx.Event(), os.path.join(d, "backup.sock")
    backup = ctx.Process(target=_backup, args=(_image(os.path.join(d, "b")), bsock, ready),
                         daemon=True)
    backup.start()
    try:
        while not ready.wait(0.1):
            if not backup.is_alive():
                raise RuntimeError(f"the backup process exited with {backup.exitcode}")

        async def open_link(first: int) -> ReplicaSender:
            r, w = await asyncio.open_unix_connection(bsock)
            return ReplicaSender(r, w, first_epoch=first)
        ctl = LoopControl(st.server, st.loop, open_link)
        ctl.connect()
        figures = _all_jobs(uri, lambda: ctl.seal(st.server.epoch))
        last = st.server.epoch
        ctl.seal(last)
        deadline = time.monotonic() + 30
        while ctl.sender is not None and ctl.sender.acked_through < last:
            if ctl.sender.lost or time.monotonic() > deadline:
                raise RuntimeError(f"epoch {last} not ACKed: {ctl.sender.lost or 'timeout'}")
            time.sleep(0.01)
        ctl.disconnect()  # the backup commits what is left and exits
        backup.join(30)
    finally:
        if backup.is_alive():
            backup.kill()
    if backup.exitcode != 0:
        raise RuntimeError(f"the backup process exited with {backup.exitcode}")
    if not filecmp.cmp(st.server.image, os.path.join(d, "b"), shallow=False):
        raise RuntimeError("the backup's image differs from the primary's after the jobs")
    return figures


def run() -> dict[str, float]:
    if shutil.which("fio") is None:
        raise SystemExit("bench disk: fio not found; install Debian's fio package "
                         "(make host-deps)")
    d = tempfile.mkdtemp(prefix="bench-disk-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                         else None)
    try:
        with _baseline(_image(os.path.join(d, "base"))) as (base, path):
            res = {base: _all_jobs(["--ioengine", "libaio", "--direct", "0",
                                    "--filename", path])}
        uri = ["--ioengine", "nbd", "--uri", f"nbd+unix:///?socket={d}/a.sock"]
        with ServerThread(_image(os.path.join(d, "a")), os.path.join(d, "a.sock")):
            res["unreplicated"] = _all_jobs(uri)
        with ServerThread(_image(os.path.join(d, "a")), os.path.join(d, "a.sock")) as st:
            res["replicated"] = _replicated(d, uri, st)
    finally:
        shutil.rmtree(d)
    unit = {job: "iops" if JOBS[job][1] == "4k" else "MiBps" for job in JOBS}
    figures = {f"{t}.{job}_{unit[job]}": v for t, jobs in res.items() for job, v in jobs.items()}
    for job in JOBS:
        figures[f"{job}_unreplicated_vs_{base}"] = res["unreplicated"][job] / res[base][job]
        figures[f"{job}_replicated_vs_unreplicated"] = (res["replicated"][job]
                                                        / res["unreplicated"][job])
    return figures
