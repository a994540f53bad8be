"""What `xen-remus stream verify|dump|stats` do (their parser: cli/stream.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from xen_remus.errors import UsageError
from xen_remus.stream import consts as C
from xen_remus.stream.events import (
    DomainHeader,
    EpochEnd,
    Event,
    ImageHeader,
    LibxlHeader,
    StreamEnd,
    XlHeader,
)
from xen_remus.stream.io import iter_events
from xen_remus.stream.records import Record


@contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror} (errno {exc.errno})") from None
    with f:
        yield f


def _events(args: argparse.Namespace) -> Iterator[Event]:
    with _open(args.file) as f:
        try:
            yield from iter_events(f, args.format, args.checkpointed)
        except OSError as exc:
            raise UsageError(f"reading {args.file}: {exc.strerror} (errno {exc.errno})"
                             ) from None


@dataclass
class _Epoch:
    records: int = 0
    pages: int = 0
    bytes: int = 0
    types: Counter[str] = field(default_factory=Counter)


@dataclass
class _Stats:
    fmt: str = "?"
    epochs: list[_Epoch] = field(default_factory=lambda: [_Epoch()])
    end: StreamEnd | None = None
    size: int = 0
    domain: str = "?"
    checkpoints: int = 0

    def add(self, ev: Event) -> None:
        self.size = ev.offset + len(ev.wire)
        while len(self.epochs) <= ev.epoch:
            self.epochs.append(_Epoch())
        ep = self.epochs[ev.epoch]
        ep.bytes += len(ev.wire)
        if isinstance(ev, Record):
            ep.records += 1
            ep.types[ev.name] += 1
            if ev.name == "PAGE_DATA" and ev.layer == "libxc":
                ep.pages += ev.parse().count
        elif isinstance(ev, EpochEnd):
            self.checkpoints += 1
        elif isinstance(ev, StreamEnd):
            self.end = ev
        elif isinstance(ev, DomainHeader):
            self.domain = C.DHDR_TYPES[ev.type]


def _verify(args: argparse.Namespace) -> int:
    st = _Stats()
    for ev in _events(args):
        if isinstance(ev, XlHeader | LibxlHeader | ImageHeader) and st.fmt == "?":
            st.fmt = {XlHeader: "xl", LibxlHeader: "libxl", ImageHeader: "libxc"}[type(ev)]
        st.add(ev)
    recs = sum(e.records for e in st.epochs)
    pages = sum(e.pages for e in st.epochs)
    assert st.end is not None
    how = "END" if st.end.complete else "EOF after a complete epoch (failover)"
    kind = "checkpointed" if st.checkpoints else "plain"
    print(f"valid {kind} {st.fmt} stream ({st.domain}): {st.size} bytes, {recs} records, "
          f"{pages} pages, {st.checkpoints} checkpoints, ends with {how}")
    return 0


def describe(ev: Event) -> dict[str, Any]:
    """The fields of an event that matter, for dump."""
    d: dict[str, Any] = {"offset": ev.offset, "epoch": ev.epoch}
    if isinstance(ev, Record):
        d.update(layer=ev.layer, record=ev.name, length=ev.length)
        d.update(ev.parse().describe())
    elif isinstance(ev, XlHeader | LibxlHeader | ImageHeader | DomainHeader):
        d.update(record=type(ev).__name__, length=len(ev.wire), **ev.describe())
    elif isinstance(ev, EpochEnd):
        d.update(record="-- end of epoch", length=0)
    elif isinstance(ev, StreamEnd):
        d.update(record="-- end of stream" if ev.complete else "-- EOF (failover)",
                 length=0)
    return d


def _text(v: Any) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}:{n}" for k, n in v.items())
    return str(v)


def _dump(args: argparse.Namespace) -> int:
    for ev in _events(args):
        d = describe(ev)
        if args.json:
            print(json.dumps(d))
            continue
        rest = " ".join(f"{k}={_text(v)}" for k, v in d.items()
                        if k not in ("offset", "epoch", "record", "length", "layer"))
        layer = d.get("layer", "")
        print(f"{d['offset']:>12} e{d['epoch']:<4} {layer:5} {d['record']:<24} "
              f"{d['length']:>9} {rest}".rstrip())
    return 0


def _stats(args: argparse.Namespace) -> int:
    st = _Stats()
    for ev in _events(args):
        st.add(ev)
    rows = [(str(i), e) for i, e in enumerate(st.epochs) if e.records or e.bytes]
    total = _Epoch(sum(e.records for e in st.epochs), sum(e.pages for e in st.epochs),
                   sum(e.bytes for e in st.epochs), sum((e.types for e in st.epochs),
                                                          Counter()))
    if args.json:
        for name, e in [*rows, ("total", total)]:
            print(json.dumps({"epoch": name, "records": e.records, "pages": e.pages,
                              "bytes": e.bytes, "types": dict(e.types)}))
        return 0
    print(f"{'epoch':>6} {'records':>9} {'pages':>9} {'bytes':>14}")
    for name, e in [*rows, ("total", total)]:
        print(f"{name:>6} {e.records:>9} {e.pages:>9} {e.bytes:>14}")
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "verify": _verify, "dump": _dump, "stats": _stats}
