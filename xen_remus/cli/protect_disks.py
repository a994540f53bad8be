"""protect's replicated disks: one Device per block-remus disk, and each disk's initial
synchronisation relayed while the guest runs (before epoch 0's pre-copy)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from xen_remus.channel import wire
from xen_remus.channel.link import SenderLink
from xen_remus.channel.stats import StatusFile
from xen_remus.disk.device import ReplicatedDisk
from xen_remus.disk.remote import SocketControl
from xen_remus.disk.sync import SyncProgress
from xen_remus.save_continuous import CheckpointEmitter

MIB = 1 << 20
PROGRESS_EVERY = 1.0  # s between progress lines of the initial synchronisation


def replicated_disk(vdev: str, replica: str, out: CheckpointEmitter,
                    generation: int = 0) -> ReplicatedDisk:
    """The Device of one block-remus disk: its frames go into the stream as REMUS_DISK
    records as they come (the initial synchronisation, the open epoch's writes between
    checkpoints); those through an epoch's SEAL, where its checkpoint left off at the
    seal, as the checkpoint is transmitted (the guest running again). A failure there is
    the replica's (ReplicaLost)."""

    def into_stream(vdev: str, frames: bytes, ends: list[int]) -> None:
        for body in wire.disk_bodies(vdev, frames, ends):
            out.libxc_record(wire.REC_REMUS_DISK, body)
        out.flush()

    def at_transmit(carry: Callable[[], None]) -> None:
        out.later(lambda: disk.guarded("sending the epoch's last writes", carry))

    disk = ReplicatedDisk(SocketControl(vdev, replica, into_stream, generation, at_transmit))
    return disk


def sync_disks(disks: list[ReplicatedDisk], link: SenderLink, out: CheckpointEmitter,
               status: StatusFile | None = None) -> None:
    """Each disk's initial synchronisation, relayed while the guest runs, with its
    progress on stderr; a failure is ReplicaLost."""
    for disk in disks:
        if isinstance(disk.control, SocketControl):
            _sync_disk(disk, disk.control, link, out, status)


def _sync_disk(disk: ReplicatedDisk, ctl: SocketControl, link: SenderLink,
               out: CheckpointEmitter, status: StatusFile | None) -> None:
    t0 = said = time.monotonic()
    vdev = ctl.vdev

    def show(p: SyncProgress) -> None:
        nonlocal said
        now = time.monotonic()
        if now - said < PROGRESS_EVERY or p.finished:
            return
        said = now
        line = (f"disk {vdev}: initial synchronisation {p.done / MIB:.1f}/"
                f"{p.total / MIB:.1f} MiB ({100 * p.done // p.total if p.total else 100}%)")
        print(f"xen-remus protect: {line}", file=sys.stderr, flush=True)
        if status is not None:
            status.state("starting", line)

    p = disk.guarded("initial synchronisation",
                     lambda: ctl.sync(lambda: link.disk_back(vdev), out.flush, show))
    print(f"xen-remus protect: disk {vdev}: synchronised "
          f"({p.mode if p.mode == 'dirty blocks' else 'by chunk hashes'}):"
          f" {p.sent / MIB:.1f} MiB sent of {p.total / MIB:.1f} MiB in "
          f"{time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
