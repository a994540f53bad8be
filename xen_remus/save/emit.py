"""The Emitter that frames records (xl, libxl and libxc layers) and writes them to a file
descriptor with os.writev: page data goes from the foreign mapping to the fd, no copy."""

from __future__ import annotations

import os
from collections.abc import Sequence

from xen_remus.errors import XenRemusError
from xen_remus.fdio import Iovecs, write_all
from xen_remus.save.pages import Pfns, Types
from xen_remus.stream import consts as C
from xen_remus.stream import encoder
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import PageData


class StreamWriteError(XenRemusError):
    """Writing the stream failed (disk full, receiver gone): names the offset and errno."""


class FdEmitter:
    """Writes the stream to ``fd``. Small records are gathered and go out with the next
    page data or at flush(); page data is written before page_data() returns, as its
    buffers are views of guest memory that is unmapped afterwards."""

    def __init__(self, fd: int, xl_config: str | None, what: str = "stream") -> None:
        self.fd = fd
        self.xl_config = xl_config  # None: a bare libxl stream (no xl header)
        self.what = what
        self.offset = 0
        self.records = 0
        self._pending: list[Buffer] = []

    # -- layers --------------------------------------------------------------------------
    def begin(self, domain_type: int) -> None:
        fmt = "xl" if self.xl_config is not None else "libxl"
        self._pending += encoder.stream_start(fmt, domain_type, config_json=self.xl_config)

    def checkpoint(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self._pending += encoder.end_of_epoch(wrapped=True, emulator=emulator)
        self.records += 2 + len(emulator)

    def end(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self._pending += encoder.end_of_stream(wrapped=True, emulator=emulator)
        self.records += 2 + len(emulator)

    # -- records -------------------------------------------------------------------------
    def _record(self, rtype: int, body: Sequence[Buffer] | PageData) -> None:
        try:
            self._pending += encoder.record(rtype, body)
        except ValueError as exc:
            raise StreamWriteError(f"{self.what}: {exc}") from None
        self.records += 1

    def libxc_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self._record(rtype, body)

    def libxl_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self._record(rtype, body)  # same framing in both layers

    def page_data(self, pfns: Pfns, types: Types, pages: Sequence[Buffer]) -> None:
        self._record(C.REC_TYPE_PAGE_DATA, PageData(pfns, types, list(pages)))
        nbytes = sum(memoryview(p).nbytes for p in pages)
        if nbytes % C.PAGE_SIZE:
            raise StreamWriteError(f"{self.what}: PAGE_DATA data of {nbytes} bytes is not "
                                   "whole pages")
        self.flush()

    # -- output --------------------------------------------------------------------------
    def flush(self) -> None:
        bufs, self._pending = self._pending, []
        writev_all(self.fd, bufs, self.offset, self.what)
        self.offset += sum(memoryview(b).nbytes for b in bufs)


def writev_all(fd: int, bufs: list[Buffer], offset: int = 0, what: str = "stream") -> None:
    """Every byte of ``bufs`` to ``fd`` (fdio.write_all); a failure names the stream
    offset (``offset`` is that of the first byte) it stopped at."""
    out = Iovecs(bufs)
    try:
        write_all(fd, out, None, what)
    except OSError as exc:
        raise StreamWriteError(f"writing the {what} at offset {offset + out.written} failed: "
                               f"errno {exc.errno} ({os.strerror(exc.errno or 0)})") from None
