"""The Remus Emitter: the stream through the channel to the backup, each epoch first
copied into a local buffer while the guest is suspended, sent after it resumed.

Pre-copy (``buffering`` False) goes out as it is produced: the guest runs anyway. Once
suspended (``buffering`` True) every record is copied (the page data is one copy out of
the foreign mapping) and queued; ``transmit()`` sends the queue after the guest resumed,
page data through ``SenderLink.send_pages`` (compressed once agreed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xen_remus.channel.link import SenderLink
from xen_remus.errors import XenRemusError
from xen_remus.save.ops import Buffer
from xen_remus.save.pages import PAGE_SIZE, Pfns, Types
from xen_remus.stream import encoder


class CheckpointStreamError(XenRemusError):
    """A record of the checkpointed stream could not be framed."""


@dataclass
class _Pages:
    pfns: Pfns
    types: Types
    data: bytes


class CheckpointEmitter:
    def __init__(self, link: SenderLink, xl_config: str | None) -> None:
        self.link = link
        self.xl_config = xl_config
        self.buffering = False
        self.records = 0
        self.buffered_bytes = 0  # of the queue, before compression
        self._raw: list[Buffer] = []  # small records not yet sent or queued
        self._queue: list[list[Buffer] | _Pages] = []

    # -- Emitter ------------------------------------------------------------------------
    def begin(self, domain_type: int) -> None:
        fmt = "xl" if self.xl_config is not None else "libxl"
        self._add(encoder.stream_start(fmt, domain_type, config_json=self.xl_config))

    def checkpoint(self) -> None:
        self._add(encoder.end_of_epoch(wrapped=True))

    def end(self) -> None:
        self._add(encoder.end_of_stream(wrapped=True))

    def libxc_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        try:
            self._add(encoder.record(rtype, body))
        except ValueError as exc:
            raise CheckpointStreamError(f"checkpoint stream: {exc}") from None

    def libxl_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self.libxc_record(rtype, body)  # same framing in both layers

    def page_data(self, pfns: Pfns, types: Types, pages: Sequence[Buffer]) -> None:
        self.records += 1
        if not self.buffering:
            self.flush()
            self.link.send_pages(pfns, types, list(pages))
            return
        # The local copy: guest memory may change (and is unmapped) once it resumes.
        data = b"".join(pages)
        if len(data) % PAGE_SIZE:
            raise CheckpointStreamError(f"checkpoint stream: PAGE_DATA data of {len(data)} "
                                        "bytes is not whole pages")
        self._queue_raw()
        self._queue.append(_Pages(pfns.copy(), types.copy(), data))
        self.buffered_bytes += len(data) + 16 + 8 * len(pfns)

    def flush(self) -> None:
        if self.buffering:
            return  # everything waits for transmit()
        bufs, self._raw = self._raw, []
        if bufs:
            self.link.send(bufs)

    # -- the epoch ----------------------------------------------------------------------
    def transmit(self) -> int:
        """Send the buffered epoch (the guest runs again); returns its bytes before
        compression."""
        self._queue_raw()
        queue, self._queue = self._queue, []
        n, self.buffered_bytes = self.buffered_bytes, 0
        for item in queue:
            if isinstance(item, _Pages):
                self.link.send_pages(item.pfns, item.types, item.data)
            else:
                self.link.send(item)  # CHECKPOINT ... CHECKPOINT_END: one call
        return n

    def _add(self, bufs: list[Buffer]) -> None:
        self.records += 1
        if self.buffering:
            bufs = [bytes(b) for b in bufs]  # bodies may be views of mapped guest state
            self.buffered_bytes += sum(len(b) for b in bufs)
        self._raw += bufs

    def _queue_raw(self) -> None:
        if self._raw:
            self._queue.append(self._raw)
            self._raw = []

