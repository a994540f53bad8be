"""The Xen migration stream (xl header, libxl v2, libxc v3/v2), sans-IO.

``Decoder`` turns bytes into events; ``encoder`` turns typed bodies into writev buffers;
``iter_events``/``iter_records`` wrap the decoder around a file object for tools.
"""

from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import (
    DomainHeader,
    EpochEnd,
    Event,
    ImageHeader,
    LibxlHeader,
    StreamEnd,
    XlHeader,
)
from xen_remus.stream.io import iter_events, iter_records
from xen_remus.stream.records import PageData, Record

__all__ = [
    "Decoder", "StreamError", "Event", "XlHeader", "LibxlHeader", "ImageHeader",
    "DomainHeader", "Record", "EpochEnd", "StreamEnd", "PageData", "iter_events",
    "iter_records",
]
