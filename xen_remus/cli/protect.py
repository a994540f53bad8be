"""`xen-remus protect DOMAIN HOST` (also `migrate --remus`): Remus, our epoch loop
(save_continuous.RemusLoop) to a backup running `xen-remus migrate-receive -r` (ACK,
heartbeats, compression) or stock `xl migrate-receive -r` (`--stock-backup`: the plain
standard stream). Flags mean what they mean for `xl remus`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from xen_remus.cli import options
from xen_remus.devices.netbuf import DEPTH_RANGE
from xen_remus.errors import UsageError

EXIT_UNPROTECTED = 3  # the backup was lost; the guest runs here unprotected
DESCRIPTION = (
    "Keep DOMAIN running here with an up-to-date copy on HOST that takes over if this "
    "host fails (Remus). After a first live copy, protect takes a checkpoint every -i "
    "milliseconds: it pauses the guest for a moment, copies the memory and CPU state that "
    "changed, lets the guest go on and sends the checkpoint to HOST. The guest's network "
    "output is held back until HOST has the checkpoint it depends on (until it is sent, "
    "with --stock-backup), so after a failover no client has seen anything the copy does "
    "not know. HOST runs `xen-remus migrate-receive -r` (reached through ssh, or -s CMD, "
    "or waiting with --listen for --tcp), or stock `xl migrate-receive -r` with "
    "--stock-backup. `xen-remus status` shows the "
    "figures of the last checkpoint; -v prints them for each one.")
EPILOG = (
    "Exit status: 0 when stopped, 3 when the backup was lost (the domain then keeps "
    "running here unprotected; destroy any copy left on HOST and run protect again), 2 for "
    "bad arguments, 1 for other errors: after the first checkpoint these leave the domain "
    "PAUSED here with its unacknowledged output dropped, for HOST to resume its copy (a "
    "supervisor process does the same if protect is killed). Stopping protect (Ctrl-C or "
    "SIGTERM) closes the stream and, as with `xl remus`, HOST then starts its copy: "
    "destroy one of the two. A handover instead (`xen-remus handover DOMAIN`, or SIGUSR1) "
    "moves the domain to HOST with nothing lost: a last checkpoint with the domain left "
    "suspended here, its acknowledgement, all output released, then the stream closes and "
    "HOST resumes that checkpoint; protect exits 0 with the domain suspended and paused "
    "here, to destroy. "
    "Unless HOST runs `migrate-receive -r --fence CMD` (a command that makes sure this "
    "host is down), a broken link between the hosts also makes HOST start its copy while "
    "this one runs on (split brain): protect warns at start. Each protection has a "
    "generation number, recorded under /var/lib/xen-remus on both hosts: HOST refuses a "
    "protection older than the copy it last resumed.")


def register(sub: Any) -> None:
    p = sub.add_parser("protect", help="protect a running domain with Remus, a backup on HOST",
                       description=DESCRIPTION, epilog=EPILOG)
    options.remus(p)
    options.heartbeat(p)
    options.transport(p)
    options.authentication(p)
    options.precopy(p)
    options.monitoring(p, progress=True)
    options.primary_witness(p)
    p.add_argument("domain", metavar="DOMAIN", help="the domain's name or id")
    p.add_argument("host", metavar="HOST", help="the host that keeps the backup copy")
    p.set_defaults(func=cmd_protect)


def receiver_rune(host: str, ssh: str | None, stock: bool, no_daemon: bool,
                  key_file: str | None = None, extra: str = "") -> str:
    """xl remus's `exec ssh HOST xl migrate-receive -r [-e]`, our receiver unless
    --stock-backup; -s CMD replaces ssh; -s '' means HOST is itself the command. The
    receiver is given the same --key-file path (quoted for the local shell and for the
    one ssh runs on HOST), and ``extra`` (the witness options, quoted for both shells)."""
    if ssh == "":
        return host
    tool = "xl" if stock else "xen-remus"
    key = f" --key-file {shlex.quote(shlex.quote(key_file))}" if key_file else ""
    return (f"exec {ssh or 'ssh'} {host} {tool} migrate-receive -r"
            f"{' -e' if no_daemon else ''}{key}{extra}")


def witness_rune(args: argparse.Namespace) -> str:
    """The witness options to pass on to the receiver (not --witness-id: its own)."""
    out = ""
    for opt, val in (("--witness", args.witness), ("--witness-via", args.witness_via),
                     ("--witness-key-file", args.witness_key_file),
                     ("--witness-timeout", str(args.witness_timeout))):
        if val is not None:
            out += f" {opt} {shlex.quote(shlex.quote(val))}"
    return out if args.witness is not None or args.witness_via is not None else ""


def check_args(args: argparse.Namespace) -> None:
    lo, hi = options.INTERVAL_RANGE_MS
    if not lo <= args.interval_ms <= hi:
        raise UsageError(f"-i {args.interval_ms}: the interval must be {lo}..{hi} ms")
    if args.metrics_file is not None:
        from xen_remus.metrics import check_path

        check_path(args.metrics_file)
    if (args.witness is not None or args.witness_via is not None) and (
            args.stock_backup or args.blackhole):
        raise UsageError("--witness is for a xen-remus backup (not --stock-backup or -b)")
    if args.witness_timeout <= 0:
        raise UsageError("--witness-timeout must be positive")
    lo, hi = DEPTH_RANGE
    if not lo <= args.pipeline <= hi:
        raise UsageError(f"--pipeline {args.pipeline}: the depth must be {lo}..{hi}")
    if (args.no_netbuf or args.no_disk) and not args.unsafe:
        raise UsageError("-n and -d turn off output commit or disk replication: add -F "
                         "to accept that (as xl remus)")
    if args.key_file is not None and (args.stock_backup or args.blackhole):
        raise UsageError("--key-file is for a xen-remus backup (not --stock-backup or -b)")
    if args.tcp is not None and (args.stock_backup or args.blackhole):
        raise UsageError("--tcp is for a xen-remus backup (not --stock-backup or -b)")
    options.check_tcp(args)
    options.check_heartbeat(args)


def cmd_protect(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="xen-remus protect: %(message)s",
                        level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING)
    check_args(args)
    policy = options.precopy_policy(args)
    key = options.read_key(args.key_file)
    # The epoch loop and all under it (numpy, lz4, the Xen libraries) only to protect.
    from xen_remus.cli.protect_run import protect

    return protect(args, policy, key)
