"""`xen-remus stream verify|dump|stats`: check and inspect migration streams (the
parser; cli/stream_run.py reads the streams)."""

from __future__ import annotations

import argparse
from typing import Any

from xen_remus.stream import consts as C


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "stream", help="verify, dump or summarise a migration stream",
        description="Check and inspect Xen migration streams: xl save files, and captures "
        "of what `xl migrate`, `xl remus` or xen-remus send.")
    sub = p.add_subparsers(dest="stream_command", metavar="ACTION", required=True)
    for name, text, more in (
        ("verify", "check a stream against the Xen migration specs",
         ": exit status 0 if it is valid (with a one-line summary), 1 if not (naming the "
         "record, field and byte offset), 2 for bad arguments or a file that cannot be "
         "read"),
        ("dump", "print one line per header and record", ""),
        ("stats", "count records, pages and bytes per epoch and in total",
         ": epoch 0 is the first full copy, each later one a checkpoint"),
    ):
        sp = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + more
                            + ".")
        sp.add_argument("-f", "--format", choices=C.FORMATS, default=None,
                        help="stream format (default: detect from the first bytes)")
        mode = sp.add_mutually_exclusive_group()
        mode.add_argument("--checkpointed", dest="checkpointed", action="store_const",
                          const=True, default=None,
                          help="expect a Remus stream, which may end after any "
                          "complete checkpoint")
        mode.add_argument("--plain", dest="checkpointed", action="store_const", const=False,
                          help="expect a plain save or migration stream: reject "
                          "checkpoints")
        if name != "verify":
            sp.add_argument("--json", action="store_true", help="print one JSON object per line")
        sp.add_argument("file", metavar="FILE|-", help="stream file, or - for stdin")
        sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The decoder and the page records (numpy) only to read a stream: not for --help.
    from xen_remus.cli import stream_run

    return stream_run.ACTIONS[args.stream_command](args)
