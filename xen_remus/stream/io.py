"""Blocking conveniences over the sans-IO decoder, for tools and tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import Event
from xen_remus.stream.records import Record

CHUNK = 1 << 20


def iter_events(f: BinaryIO, fmt: str | None = None, checkpointed: bool | None = None,
                chunk: int = CHUNK) -> Iterator[Event]:
    """Every event of the stream read from ``f``; raises StreamError at the first fault
    (after yielding the events decoded before it)."""
    dec = Decoder(fmt, checkpointed)
    while True:
        data = f.read(chunk)
        try:
            events = dec.feed(data or b"")
        except Exception as exc:
            yield from getattr(exc, "events", [])
            raise
        yield from events
        if not data:
            return


def iter_records(f: BinaryIO, fmt: str | None = None, checkpointed: bool | None = None,
                 chunk: int = CHUNK) -> Iterator[Record]:
    """Only the records (both layers) of the stream read from ``f``."""
    for ev in iter_events(f, fmt, checkpointed, chunk):
        if isinstance(ev, Record):
            yield ev
