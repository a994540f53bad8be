"""Errors of the replicated disk; each names what was wrong and where (offset, epoch)."""

from __future__ import annotations

from xen_remus.errors import XenRemusError


class DiskError(XenRemusError):
    """A replicated-disk operation failed; the message names the disk and the step."""


class ReplicaStreamError(DiskError):
    """The replication stream is invalid: ``offset`` is where the bad frame starts."""

    def __init__(self, message: str, offset: int, epoch: int | None = None) -> None:
        where = f"at stream offset {offset}" + ("" if epoch is None else f", epoch {epoch}")
        super().__init__(f"disk replication stream: {message} ({where})")
        self.offset = offset
        self.epoch = epoch


class EpochError(DiskError):
    """An epoch operation out of order (seal, commit, failover); names both epochs."""
