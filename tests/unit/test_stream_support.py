"""Shared helpers of the stream tests (no tests here)."""

from __future__ import annotations

from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Event
from xen_remus.stream.synth import Epoch, make_epoch, synthetic_stream


def decode(data: bytes, chunk: int = 0, fmt: str | None = None,
           checkpointed: bool | None = None) -> list[Event]:
    """All events of ``data`` fed in ``chunk``-sized pieces (0: one piece), then EOF."""
    dec = Decoder(fmt, checkpointed)
    events: list[Event] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        events += dec.feed(data[i:i + step])
    events += dec.feed(b"")
    return events


def small_stream(fmt: str = "xl", pv: bool = False, epochs: int = 2, version: int = 3,
                 end: bool = True) -> bytes:
    """A few-KiB stream with every record type the layout uses (2 epochs: checkpointed)."""
    eps: list[Epoch] = [make_epoch([1, 2, 9], [0, C.PFINFO_XTAB, 0], seed=5)]
    eps += [make_epoch([2 + n], seed=n) for n in range(1, epochs)]
    return b"".join(bytes(b) for b in synthetic_stream(fmt, pv, eps, version, end=end))

