"""Errors of the channel between our two ends; each names what was wrong and where."""

from __future__ import annotations

from xen_remus.errors import XenRemusError


class ChannelError(XenRemusError):
    """The peer broke the xen-remus extension protocol (offer, accept, frames)."""


class CompressionError(XenRemusError):
    """A compressed page record could not be expanded: names the epoch, pfn and offset."""

    def __init__(self, message: str, epoch: int, pfn: int | None, offset: int) -> None:
        where = f"epoch {epoch}"
        if pfn is not None:
            where += f", pfn 0x{pfn:x}"
        super().__init__(f"REMUS_PAGE_DATA_LZ4XOR at offset {offset} ({where}): {message}")
        self.epoch, self.pfn, self.offset = epoch, pfn, offset
