"""The backup's disk replicas, inside the receiver: REMUS_DISK records into epoch stores.

Epoch N's disk writes arrive as REMUS_DISK records, streamed ahead of checkpoint N while
the primary waited between checkpoints and, the last of them with SEAL(N), inside
checkpoint N (disk/remote.py); each epoch store holds them under their epoch. When the
receiver has epoch N whole it commits N's disk writes to each replica image (``commit``)
and only then ACKs N; on a failover from N every later write is dropped
(``failover``). A replica's image is the path of the same disk (its vdev) in the guest's
configuration on this host: it must exist, with the primary's size.

Before epoch 0 the primary synchronises each replica (disk/sync.py); ``feed`` returns the
replica's answers, for the receiver to send back. Each replica keeps a record on this host
(persist.ReplicaRecord): the protection that wrote it, and "local" once a failover runs the
guest on it, so that a later protection knows whether the primary's dirty bitmap applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from xen_remus.channel.errors import ChannelError
from xen_remus.disk.errors import DiskError
from xen_remus.disk.persist import ReplicaRecord
from xen_remus.disk.replica import BackupStream
from xen_remus.disk.store import EpochStore
from xen_remus.disk.sync import ReplicaSync

log = logging.getLogger(__name__)


class DiskReplicas:
    """One EpochStore per replicated disk, opened at its first record."""

    def __init__(self, image_of: Callable[[str], str | None], records: bool = True) -> None:
        self.image_of = image_of
        self.records = records  # keep each replica's record (persist.py)
        self.streams: dict[str, BackupStream] = {}

    def feed(self, vdev: str, frames: memoryview, where: str) -> list[bytes]:
        """Frames of ``vdev`` as they arrive (held per epoch until ``commit``); returns
        the replica's answers to send back (its ACKs stay here: our epoch ACK covers the
        disks)."""
        try:
            stream = self.streams.get(vdev)
            if stream is None:
                image = self.image_of(vdev)
                if image is None:
                    raise DiskError(f"disk {vdev} is not in the guest's configuration")
                store = EpochStore(image)
                record = ReplicaRecord(image) if self.records else None
                stream = self.streams[vdev] = BackupStream(
                    store, ReplicaSync(store, record), acks=False)
                log.info("disk %s: replica %s (%d bytes)", vdev, image, stream.store.size)
            answer = stream.feed(bytes(frames))
            return [answer] if answer else []
        except DiskError as exc:  # the epoch in flight is unusable: fail over before it
            raise ChannelError(f"{where}: disk {vdev}: {exc}") from exc

    def commit(self, epoch: int) -> None:
        """Apply every disk's writes through ``epoch`` (before the ACK of ``epoch``)."""
        for vdev, stream in self.streams.items():
            applied = stream.store.commit(epoch)
            log.debug("disk %s: epoch %d committed (%d writes)", vdev, epoch, applied)

    def failover(self, epoch: int | None) -> None:
        """The guest resumes from ``epoch`` (None: nothing): drop every later write. The
        replica is the guest's own disk from now on: its record says so (durably) before
        anything runs on it."""
        for vdev, stream in self.streams.items():
            sync = stream.sync
            if sync.record is not None and sync.begun is not None:
                try:
                    sync.record.write(sync.begun.generation, "local", stream.store.size,
                                      epoch)
                except DiskError as exc:  # resume all the same: the guest comes first
                    log.error("disk %s: %s", vdev, exc)
            if epoch is not None:
                dropped = stream.store.failover(epoch)
                log.warning("disk %s: resuming from epoch %d; %d later writes dropped", vdev,
                            epoch, dropped)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.store.close()
        self.streams.clear()


def disk_images(config: object) -> dict[str, str]:
    """vdev -> image path, from a libxl_domain_config (the xl header's JSON)."""
    disks = config.get("disks") if isinstance(config, dict) else None
    paths: dict[str, str] = {}
    for d in disks if isinstance(disks, list) else []:
        if isinstance(d, dict) and isinstance(d.get("vdev"), str) and isinstance(
                d.get("pdev_path"), str):
            paths[d["vdev"]] = d["pdev_path"]
    return paths
