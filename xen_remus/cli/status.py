"""`xen-remus status [DOMAIN] [--json]`: what each protect / migrate-receive -r on this
host is doing, from the status files they keep (xen_remus/channel/stats.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from xen_remus.channel.stats import read_all
from xen_remus.errors import XenRemusError
from xen_remus.paths import run_dir

DESCRIPTION = """Show what each `xen-remus protect` (primary) and `xen-remus migrate-receive
-r` (backup) on this host is doing: its state and the figures of its last checkpoint (pause,
dirty pages, compression ratio, send time, acknowledgement time), then totals. They keep
these in status files in {run_dir} (the XEN_REMUS_RUN_DIR environment variable
overrides)."""
_COLS = ("DOMAIN", "ROLE", "STATE", "EPOCH", "PAUSE_MS", "DIRTY", "RATIO", "SEND_MS",
         "ACK_MS", "PEER", "UPDATED")


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show Remus protection on this host (either end)",
                       description=DESCRIPTION.format(run_dir=run_dir()))
    p.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this domain")
    p.add_argument("--json", action="store_true",
                   help="print the whole status documents as JSON")
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _row(doc: dict[str, Any], now: float) -> tuple[str, ...]:
    if "error" in doc:
        return (Path(doc["path"]).stem, "?", f"unreadable: {doc['error']}", *"-" * 8)
    last = doc.get("last") or {}
    state = str(doc.get("state", "?"))
    if not doc.get("alive") and state not in ("exited", "failed-over", "unprotected"):
        state += f" (stale: pid {doc.get('pid')} gone)"
    age = now - float(doc.get("updated") or 0)
    return (str(doc.get("domain")), str(doc.get("role")), state, _fmt(doc.get("epoch")),
            _fmt(last.get("pause_ms"), 2), _fmt(last.get("dirty_pages")),
            _fmt(last.get("ratio")), _fmt(last.get("send_ms"), 2),
            _fmt(last.get("ack_ms"), 2), str(doc.get("peer") or "-"), f"{age:.1f} s ago")


def run(args: argparse.Namespace) -> int:
    docs = read_all(args.dir)
    if args.domain:
        docs = [d for d in docs if d.get("domain") == args.domain]
        if not docs:
            raise XenRemusError(f"no status for domain {args.domain!r} in "
                                f"{args.dir or run_dir()} (not protected on this host?)")
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(f"no protected domains (no status files in {args.dir or run_dir()})")
        return 0
    rows = [_COLS, *(_row(d, time.time()) for d in docs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLS))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for d in docs:
        tot = d.get("totals")
        if tot and tot.get("epochs"):
            ratio = tot["raw_bytes"] / tot["wire_bytes"] if tot["wire_bytes"] else 1.0
            print(f"{d['domain']} ({d['role']}): {tot['epochs']} epochs, "
                  f"{tot['dirty_pages']} dirty pages, {tot['raw_bytes']} bytes -> "
                  f"{tot['wire_bytes']} on the wire (x{ratio:.2f}), pause "
                  f"{tot['pause_ms'] / tot['epochs']:.2f} ms/epoch"
                  + (f"; {d['detail']}" if d.get("detail") else ""))
    return 0
