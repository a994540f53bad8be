"""`xen-remus promote DOMAIN`: let a backup held by `migrate-receive -r
--failover-on-promote` resume its copy (receive/promote.py). The OCF agent's promote
action runs it, once Pacemaker fenced the primary; an operator may too, knowing the
primary is down."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xen_remus.paths import run_dir


def register(sub: Any) -> None:
    p = sub.add_parser(
        "promote", help="let a backup waiting for its promotion resume its copy",
        description="Release the receiver of DOMAIN on this host (`xen-remus "
        "migrate-receive -r --failover-on-promote`) once it declared its primary dead: it "
        "then resumes its copy from its last committed epoch. Waits up to --wait seconds "
        "for the receiver to reach that point (a promotion may come first). Run it only "
        "when the primary is down (fenced): Pacemaker's promote does so.",
        epilog=f"Exit status: 0 once the receiver took the promotion (it then resumes the "
        f"guest), 1 if no receiver of DOMAIN waits (none, or it gave up: its copy is then "
        f"held). The files: DOMAIN.promote-wait and DOMAIN.promote in {run_dir()}.")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="wait at most S seconds (default %(default)g)")
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xen_remus.errors import UsageError
    from xen_remus.receive.promote import promote

    if args.wait < 0:
        raise UsageError("--wait must not be negative")
    epoch = promote(args.domain, args.wait, args.dir)
    print(f"xen-remus promote: the receiver of {args.domain} resumes it from epoch {epoch}",
          file=sys.stderr)
    return 0
