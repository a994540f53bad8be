"""`xen-remus handover DOMAIN`: move a protected guest to its backup with nothing lost (a
planned switchover). Asks the guest's `xen-remus protect` on this host (SIGUSR1) to end at
an epoch boundary: a last checkpoint with the guest left suspended, its ACK, all output
released, the stream closed (save_continuous.RemusLoop.handover). The backup then resumes
that checkpoint, at once, or, under `--failover-on-promote`, once promoted (the OCF
agent's demote runs this command; Pacemaker then promotes the other node)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xen_remus.paths import run_dir

POLL_S = 0.2
HANDOVER_SIGNAL = signal.SIGUSR1  # what protect takes as the request to hand over


def register(sub: Any) -> None:
    p = sub.add_parser(
        "handover", help="move a protected domain to its backup, nothing lost",
        description="Hand DOMAIN, protected from this host by `xen-remus protect`, over to "
        "its backup: protect takes a last checkpoint with the domain left suspended, waits "
        "for the backup's acknowledgement, releases all held output and closes the stream; "
        "the backup resumes that checkpoint (under a cluster, once promoted). No client "
        "loses anything it saw, and the domain never runs on both hosts. Waits until "
        "protect has exited.",
        epilog=f"Exit status: 0 once handed over (the domain is then suspended and paused "
        "here: destroy it), 1 if no protect of DOMAIN protects it here, or the handover did "
        "not complete within --wait (protect's state is named; a backup lost after the "
        "last checkpoint leaves the domain paused here, as any failure of protect does). "
        f"Protect's status file: DOMAIN.json in {run_dir()}.")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="wait at most S seconds for the handover (default %(default)g)")
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xen_remus.errors import UsageError

    if args.wait < 0:
        raise UsageError("--wait must not be negative")
    doc = handover(args.domain, args.wait, args.dir)
    print(f"xen-remus handover: {args.domain} handed over to {doc.get('peer') or 'the backup'}"
          f" {doc.get('detail', '')}; it is suspended and paused here: destroy it "
          f"(xl destroy {args.domain})", file=sys.stderr)
    return 0


def handover(domain: str, wait: float, directory: Path | None = None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             signal_pid: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Ask ``domain``'s protect here to hand it over, wait (``wait`` s) for protect to
    end; returns its final status document. A XenRemusError says what stood in the way."""
    from xen_remus.channel.stats import HANDED_OVER
    from xen_remus.errors import XenRemusError

    doc = primary_doc(domain, directory)
    where = (directory or run_dir()) / f"{domain}.json"
    if doc is None or not doc["alive"]:
        raise XenRemusError(f"no protect of {domain} runs on this host (no live {where}): "
                            "nothing to hand over")
    pid = int(doc["pid"])
    if doc.get("state") != "protecting":
        raise XenRemusError(f"protect of {domain} (pid {pid}) is {doc.get('state')} "
                            f"({doc.get('detail') or 'no detail'}): only a protected domain, "
                            "its initial copy committed, can be handed over")
    (signal_pid or (lambda p: os.kill(p, HANDOVER_SIGNAL)))(pid)
    deadline = clock() + wait
    while running(pid):
        if clock() >= deadline:
            now = primary_doc(domain, directory) or {}
            raise XenRemusError(f"protect of {domain} (pid {pid}) still runs {wait:g} s after "
                                f"it was asked to hand over ({now.get('state')}: "
                                f"{now.get('detail') or 'no detail'})")
        sleep(POLL_S)
    end = primary_doc(domain, directory) or {}
    if end.get("state") != HANDED_OVER:
        raise XenRemusError(f"the handover of {domain} did not complete: protect (pid {pid}) "
                            f"ended {end.get('state')}: {end.get('detail') or 'no detail'}")
    return end


def primary_doc(domain: str, directory: Path | None) -> dict[str, Any] | None:
    """``domain``'s protect status document here (with ``alive``), if there is one."""
    from xen_remus.channel.stats import read_all

    return next((d for d in read_all(directory) if d.get("domain") == domain
                 and d.get("role") == "primary"), None)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited protect whose parent, an agent's
    action long gone, left it to an init that reaps late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
