"""CPU per Remus epoch at both ends, on the host (no Xen): ``python -m bench.epochs
[-u] [--epochs N] [--dirty N] [--profile FILE]``.

Sender: RemusLoop over the bench's in-memory guest (bench/remus.py), DIRTY pages dirtied
per epoch (a few bytes each), the stream into a temporary file. Receiver: those bytes
through a pipe in 8 KiB chunks (socat's blocks, as the lab's backup gets them), read as
`migrate-receive -r` reads them (Upstream.read_beating, heartbeat thread on), fed to the
continuous restore (its decisions carried out by receive.driver.Relay) with the
ReceiverChannel rewrite (compressed pages back into standard PAGE_DATA), into a sink
that writes to /dev/null. Figures: median process CPU ms per epoch of each end (epoch 0, the
initial copy, excluded). ``--profile FILE`` writes cProfile stats of both ends
(FILE.sender, FILE.receiver) and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from bench.remus import fake_loop
from xen_remus.channel.ends import Config
from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.fdio import write_all
from xen_remus.receive.driver import Relay
from xen_remus.receive.upstream import Upstream
from xen_remus.save.pages import Pfns
from xen_remus.save_continuous import RemusLoop
from xen_remus.stream.events import Buffer

CHUNK = 8 << 10  # socat's default block size: the lab's receiver reads from socat


class _NullSink:
    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_WRONLY)
        self.bytes = 0

    def send(self, bufs: Sequence[Buffer]) -> None:
        write_all(self.fd, bufs, None, "/dev/null")
        self.bytes += sum(len(b) for b in bufs)

    def committed(self, epoch: int) -> None:
        pass

    def failover(self, epoch: int) -> None:
        pass

    def abort(self, why: str) -> None:
        pass

    def hold(self, epoch: int) -> None:
        pass


def sender(compress: bool, epochs: int, dirty: int, out_fd: int,
           prof: cProfile.Profile | None) -> tuple[list[float], list[int]]:
    """CPU ms of each epoch's checkpoint() and the stream offset after each epoch."""
    rfd, wfd = os.pipe()
    cpu: list[float] = []
    ends: list[int] = []

    class Timed(RemusLoop):
        def checkpoint(self, epoch: int, pending: Pfns | None, final: bool = False) -> None:
            if prof is not None and epoch > 0:
                prof.enable()
            t0 = time.process_time()
            super().checkpoint(epoch, pending, final)
            cpu.append((time.process_time() - t0) * 1000)
            if prof is not None:
                prof.disable()

    try:
        fake_loop(compress, out_fd, rfd, epochs, dirty,
                  lambda _st, link: ends.append(link.offset), Timed)
        return cpu, ends
    finally:
        os.close(rfd)
        os.close(wfd)


def receiver(compress: bool, stream: bytes, ends: list[int],
             prof: cProfile.Profile | None, chunk: int = CHUNK) -> list[float]:
    """CPU ms to receive each epoch (its bytes fed in CHUNK pieces)."""
    sink = _NullSink()
    chan = ReceiverChannel(Config(ack=False, compression=compress), time.monotonic())
    rx = Relay(sink, checkpointed=True, rewrite=chan.on_record)
    cpu: list[float] = []
    mv = memoryview(stream)
    rfd, wfd = os.pipe()
    # The stream comes through a pipe, read as `migrate-receive -r` does (heartbeats on).
    up = Upstream(rfd, wfd, None)
    link = ReceiverLink(chan, sink.fd)
    link.start_heartbeats()
    start = 0
    try:
        for epoch, end in enumerate(ends):
            if prof is not None and epoch > 0:
                prof.enable()
            t0 = time.process_time()
            for at in range(start, end, chunk):
                os.write(wfd, mv[at:min(at + chunk, end)])
                if rx.feed(up.read_beating(link, armed=True)) is not None:
                    raise RuntimeError(f"receiver ended at epoch {epoch}: {rx.outcome}")
            cpu.append((time.process_time() - t0) * 1000)
            if prof is not None:
                prof.disable()
            if rx.committed != epoch:
                raise RuntimeError(f"epoch {epoch} not committed (committed {rx.committed})")
            start = end
    finally:
        link.stop_heartbeats()
        for fd in (sink.fd, rfd, wfd):
            os.close(fd)
    return cpu


def run(compress: bool = True, epochs: int = 60, dirty: int = 600,
        profile: str | None = None, chunk: int = CHUNK) -> dict[str, float]:
    sprof = cProfile.Profile() if profile else None
    rprof = cProfile.Profile() if profile else None
    with tempfile.TemporaryFile() as f:
        scpu, ends = sender(compress, epochs, dirty, f.fileno(), sprof)
        f.seek(0)
        stream = f.read()
    rcpu = receiver(compress, stream, ends, rprof, chunk)
    sfx = "lz4" if compress else "u"
    wire = np.diff(ends)
    figures = {f"sender_cpu_ms_{sfx}": float(np.median(scpu[1:])),
               f"receiver_cpu_ms_{sfx}": float(np.median(rcpu[1:])),
               f"wire_bytes_per_epoch_{sfx}": float(np.mean(wire))}
    if profile and sprof is not None and rprof is not None:
        for name, prof in (("sender", sprof), ("receiver", rprof)):
            prof.dump_stats(f"{profile}.{name}")
            print(f"--- {name} ({sfx}), top by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.epochs")
    ap.add_argument("-u", action="store_true", help="uncompressed")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--dirty", type=int, default=600)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="receiver read size")
    ap.add_argument("--profile", metavar="FILE")
    args = ap.parse_args()
    for k, v in run(not args.u, args.epochs, args.dirty, args.profile, args.chunk).items():
        print(f"epochs: {k} = {v:.3f}")


if __name__ == "__main__":
    main()
