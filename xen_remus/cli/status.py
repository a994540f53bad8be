"""`xen-remus status [DOMAIN] [--json | --prometheus | --watch]`: what each protect /
migrate-receive -r on this host is doing, from the status files they keep
(xen_remus/channel/stats.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from xen_remus.channel.stats import FINAL_STATES, read_all
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.paths import run_dir

DESCRIPTION = """Show what each `xen-remus protect` (primary) and `xen-remus migrate-receive
-r` (backup) on this host is doing: its state and the figures of its last checkpoint (pause,
dirty pages, compression ratio, send time, acknowledgement time), then totals. They keep
these in status files in {run_dir} (the XEN_REMUS_RUN_DIR environment variable
overrides)."""
EPILOG = """--watch redraws the table every -n seconds on a terminal (plain lines, each with
the time, when the output is not one) until Ctrl-C or --count refreshes. --prometheus prints
the figures in Prometheus' text format (series xen_remus_*, labels domain and role; times in
seconds); with --output FILE it writes them to FILE atomically instead, e.g. for
node_exporter's textfile collector."""
_COLS = ("DOMAIN", "ROLE", "STATE", "EPOCH", "PAUSE_MS", "DIRTY", "RATIO", "SEND_MS",
         "ACK_MS", "CKPT/S", "PEER", "UPDATED")
WATCH_MIN_S = 0.1


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show Remus protection on this host (either end)",
                       description=DESCRIPTION.format(run_dir=run_dir()), epilog=EPILOG)
    p.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this domain")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print the whole status documents as JSON")
    out.add_argument("--prometheus", action="store_true",
                     help="print the figures in the Prometheus text exposition format")
    out.add_argument("--watch", action="store_true",
                     help="keep showing the table, refreshed every -n seconds")
    p.add_argument("-n", dest="interval", type=float, default=None, metavar="SECS",
                   help=f"with --watch: refresh every SECS seconds (default 1, at least "
                   f"{WATCH_MIN_S})")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="with --watch: stop after N refreshes (default: until Ctrl-C)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="with --prometheus: write to FILE (temp file + rename) instead of "
                   "stdout")
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def with_promotion(docs: list[dict[str, Any]], directory: Path | None
                   ) -> list[dict[str, Any]]:
    """Each live backup's ``promote_wait``: the wait file of a receiver that declared its
    primary dead and waits for `xen-remus promote` (--failover-on-promote), else None."""
    from xen_remus.receive.promote import read_wait

    for d in docs:
        if d.get("role") == "backup" and "error" not in d:
            w = read_wait(str(d.get("domain")), directory) if d.get("alive") else None
            d["promote_wait"] = ({k: w[k] for k in ("pid", "epoch", "since")}
                                 if w is not None and w["alive"] else None)
    return docs


def state_text(doc: dict[str, Any]) -> str:
    state = str(doc.get("state", "?"))
    if doc.get("promote_wait"):
        state += f" (primary lost: waiting for promotion, epoch {doc['promote_wait']['epoch']})"
    if not doc.get("alive") and state not in FINAL_STATES:
        state += f" (stale: pid {doc.get('pid')} gone)"
    return state


def _row(doc: dict[str, Any], now: float, rate: float | None) -> tuple[str, ...]:
    if "error" in doc:
        return (Path(doc["path"]).stem, "?", f"unreadable: {doc['error']}",
                *"-" * (len(_COLS) - 3))
    last = doc.get("last") or {}
    age = now - float(doc.get("updated") or 0)
    return (str(doc.get("domain")), str(doc.get("role")), state_text(doc),
            _fmt(doc.get("epoch")), _fmt(last.get("pause_ms"), 2),
            _fmt(last.get("dirty_pages")), _fmt(last.get("ratio")),
            _fmt(last.get("send_ms"), 2), _fmt(last.get("ack_ms"), 2), _fmt(rate),
            str(doc.get("peer") or "-"), f"{age:.1f} s ago")


def table(docs: list[dict[str, Any]], now: float,
          rates: dict[str, float] | None = None) -> list[str]:
    """The status table, header first; ``rates``: checkpoints/s by status file path."""
    rates = rates or {}
    rows = [_COLS, *(_row(d, now, rates.get(d["path"])) for d in docs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLS))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def totals(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for d in docs:
        tot = d.get("totals")
        if tot and tot.get("epochs"):
            ratio = tot["raw_bytes"] / tot["wire_bytes"] if tot["wire_bytes"] else 1.0
            out.append(f"{d['domain']} ({d['role']}): {tot['epochs']} epochs, "
                       f"{tot['dirty_pages']} dirty pages, {tot['raw_bytes']} bytes -> "
                       f"{tot['wire_bytes']} on the wire (x{ratio:.2f}), pause "
                       f"{tot['pause_ms'] / tot['epochs']:.2f} ms/epoch"
                       + (f"; {d['detail']}" if d.get("detail") else ""))
    return out


def check_args(args: argparse.Namespace) -> None:
    if not args.watch and (args.count is not None or args.interval is not None):
        raise UsageError("-n and --count go with --watch")
    if args.interval is None:
        args.interval = 1.0
    if args.output is not None and not args.prometheus:
        raise UsageError("--output goes with --prometheus")
    if args.interval < WATCH_MIN_S:
        raise UsageError(f"-n {args.interval}: at least {WATCH_MIN_S} s")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count {args.count}: at least 1")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.watch:
        return Watch(args.dir, args.domain, args.interval, args.count).run()
    docs = with_promotion(read_all(args.dir), args.dir)
    if args.domain:
        docs = [d for d in docs if d.get("domain") == args.domain]
        if not docs and not args.prometheus:
            raise XenRemusError(f"no status for domain {args.domain!r} in "
                                f"{args.dir or run_dir()} (not protected on this host?)")
    if args.prometheus:
        from xen_remus.metrics import render, write_atomic

        text = render(docs)
        if args.output is None:
            sys.stdout.write(text)
        else:
            try:
                write_atomic(args.output, text)
            except OSError as exc:
                raise UsageError(f"--output {args.output}: {exc.strerror or exc}") from None
        return 0
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(f"no protected domains (no status files in {args.dir or run_dir()})")
        return 0
    for line in table(docs, time.time()) + totals(docs):
        print(line)
    return 0


class Watch:
    """`status --watch`: the table every ``interval`` s, in place on a terminal (cursor
    home, each line cleared to its end, the rest of the screen cleared), else as plain
    lines prefixed with the time. Ctrl-C ends it quietly."""

    def __init__(self, directory: Path | None, domain: str | None, interval: float,
                 count: int | None, out: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.directory, self.domain = directory, domain
        self.interval, self.count = interval, count
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock, self.sleep = clock, sleep
        self._prev: dict[str, tuple[float, int, Any]] = {}  # path -> (when, epochs, pid)

    def rates(self, docs: list[dict[str, Any]], now: float) -> dict[str, float]:
        """Checkpoints/s of each writer since the last refresh (none for a new one)."""
        rates, prev = {}, self._prev
        self._prev = {}
        for d in docs:
            if "error" in d:
                continue
            epochs = int((d.get("totals") or {}).get("epochs", 0))
            self._prev[d["path"]] = (now, epochs, d.get("pid"))
            p = prev.get(d["path"])
            if p is not None and p[2] == d.get("pid") and now > p[0] and d.get("alive"):
                rates[d["path"]] = max(epochs - p[1], 0) / (now - p[0])
        return rates

    def frame(self) -> list[str]:
        now = self.clock()
        docs = with_promotion(read_all(self.directory), self.directory)
        if self.domain:
            docs = [d for d in docs if d.get("domain") == self.domain]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        if not docs:
            lines = [f"no protected domains (no status files in "
                     f"{self.directory or run_dir()})"]
        else:
            lines = table(docs, now, self.rates(docs, now))
        if self.tty:
            return [f"xen-remus status, every {self.interval:g} s: {stamp} (Ctrl-C to "
                    "quit)", "", *lines]
        return [f"{stamp}  {line}" for line in lines]

    def run(self) -> int:
        n = 0
        try:
            while True:
                lines = self.frame()
                if self.tty:
                    self.out.write("\x1b[H" + "".join(f"{ln}\x1b[K\n" for ln in lines)
                                   + "\x1b[J")
                else:
                    self.out.write("".join(f"{ln}\n" for ln in lines))
                self.out.flush()
                n += 1
                if self.count is not None and n >= self.count:
                    return 0
                self.sleep(self.interval)
        except KeyboardInterrupt:
            return 0
