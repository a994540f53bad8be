"""Encoder: each function returns a list of buffers for ``os.writev``.

Bodies are passed through as given (page contents stay the caller's memoryviews); only
record headers, pfn arrays and padding are new bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C
from xen_remus.stream.bodies import Body, Empty
from xen_remus.stream.events import Buffer, DomainHeader, ImageHeader, LibxlHeader, XlHeader
from xen_remus.stream.libxc_bodies import PageData

_RH = struct.Struct("<II")
_ZERO = bytes(8)


def record(rtype: int, body: Body | Sequence[Buffer] = ()) -> list[Buffer]:
    """One record of either layer: header, body parts, zero padding to 8 octets."""
    parts = body.pack() if hasattr(body, "pack") else list(body)
    length = sum(len(p) for p in parts)
    if length > C.REC_LENGTH_MAX:
        raise ValueError(f"record 0x{rtype:08x}: body of {length} bytes exceeds "
                         f"REC_LENGTH_MAX")
    out: list[Buffer] = [_RH.pack(rtype, length)]
    out.extend(p for p in parts if len(p))
    pad = C.pad8(length) - length
    if pad:
        out.append(_ZERO[:pad])
    return out


def empty(rtype: int) -> list[Buffer]:
    return record(rtype, Empty())


def xl_header(config_json: str | None = None) -> list[Buffer]:
    hdr = XlHeader.with_config(config_json) if config_json is not None else XlHeader()
    return [hdr.pack()]


def libxl_header() -> list[Buffer]:
    return [LibxlHeader().pack()]


def libxc_headers(domain_type: int = C.DHDR_TYPE_X86_HVM, version: int = 3,
                  xen_major: int = 4, xen_minor: int = 17) -> list[Buffer]:
    """Image header + domain header (what follows libxl LIBXC_CONTEXT)."""
    return [ImageHeader(version=version).pack(),
            DomainHeader(type=domain_type, xen_major=xen_major, xen_minor=xen_minor).pack()]


def page_data(pfns: Sequence[int] | npt.NDArray[Any], pages: Sequence[Buffer],
              types: Sequence[int] | npt.NDArray[Any] | None = None) -> list[Buffer]:
    """PAGE_DATA: ``pages`` holds one page (PAGE_SIZE bytes) per pfn whose type carries data."""
    return record(C.REC_TYPE_PAGE_DATA, PageData.make(pfns, types, pages))


def page_data_batches(pfns: npt.NDArray[np.uint64], pages: Sequence[Buffer],
                      batch: int = C.MAX_BATCH_SIZE) -> Iterable[list[Buffer]]:
    """Normal pages split into PAGE_DATA records of ``batch`` pfns (Xen's MAX_BATCH_SIZE)."""
    for i in range(0, len(pfns), batch):
        yield page_data(pfns[i:i + batch], pages[i:i + batch])


def end_of_epoch(wrapped: bool, emulator: Sequence[Sequence[Buffer]] = ()) -> list[Buffer]:
    """Close a checkpoint: libxc CHECKPOINT, then (libxl streams) the emulator records
    (EMULATOR_XENSTORE_DATA / EMULATOR_CONTEXT) and libxl CHECKPOINT_END."""
    return _close(C.REC_TYPE_CHECKPOINT, C.LIBXL_CHECKPOINT_END, wrapped, emulator)


def end_of_stream(wrapped: bool, emulator: Sequence[Sequence[Buffer]] = ()) -> list[Buffer]:
    """Close a stream: libxc END, then (libxl streams) emulator records and libxl END."""
    return _close(C.REC_TYPE_END, C.LIBXL_END, wrapped, emulator)


def _close(libxc_rtype: int, libxl_rtype: int, wrapped: bool,
           emulator: Sequence[Sequence[Buffer]]) -> list[Buffer]:
    out = empty(libxc_rtype)
    if wrapped:
        for rec in emulator:
            out.extend(rec)
        out.extend(empty(libxl_rtype))
    return out


def stream_start(fmt: str, domain_type: int = C.DHDR_TYPE_X86_HVM, version: int = 3,
                 config_json: str | None = None) -> list[Buffer]:
    """Everything up to the domain header: [xl header] [libxl header, LIBXC_CONTEXT]
    image header, domain header."""
    out: list[Buffer] = []
    if fmt == "xl":
        out += xl_header(config_json)
    if fmt in ("xl", "libxl"):
        out += libxl_header() + empty(C.LIBXL_LIBXC_CONTEXT)
    return out + libxc_headers(domain_type, version)
