"""Options that several commands share, each declared once here.

Every function adds one titled group (its own section in ``--help``) to a command's parser.
A value lands under the same name whichever command parsed it, so `migrate --remus` can be
handed to protect as it is. Imports stay light: `xen-remus status` must not load numpy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from xen_remus.channel.mac import KEY_MIN
from xen_remus.channel.negotiate import HEARTBEAT_TIMEOUT_MS
from xen_remus.devices.netbuf import DEPTH_RANGE
from xen_remus.errors import UsageError
from xen_remus.save.policy import PrecopyPolicy

INTERVAL_RANGE_MS = (1, 60_000)  # protect -i
HEARTBEAT_RANGE_MS = (10, 600_000)  # what the channel's negotiation accepts
KEY_FILE_MAX = 4096  # a key file larger than this is not a key


def transport(p: argparse.ArgumentParser) -> None:
    """How the sender reaches the receiver on HOST (as `xl migrate` and `xl remus`)."""
    g = p.add_argument_group("transport to HOST", "The receiver on HOST is started "
                             "through ssh, as xl migrate and xl remus do.")
    g.add_argument("-s", dest="ssh", default=None, metavar="CMD",
                   help="connect with CMD instead of ssh; with -s '' HOST is not a host "
                   "name but the whole command to run")
    g.add_argument("-e", dest="no_daemon", action="store_true",
                   help="pass -e to the receiver: it stays in the foreground instead of "
                   "waiting in the background for the domain to end")
    g.add_argument("--tcp", type=int, default=None, metavar="PORT",
                   help="no ssh: connect straight to PORT on HOST, where `xen-remus "
                   "migrate-receive --listen PORT --key-file FILE` (with -r to protect) "
                   "waits; both ends prove they hold the --key-file key before anything "
                   "else is sent (not encrypted: see the README)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up when the receiver has not answered within S seconds "
                   "(default 120)")


def check_tcp(args: argparse.Namespace) -> None:
    """--tcp: a port, a key to authenticate with, and no receiver command to run."""
    if args.tcp is None:
        return
    if not 0 < args.tcp < 65536:
        raise UsageError(f"--tcp {args.tcp}: a TCP port is 1..65535")
    if args.key_file is None:
        raise UsageError("--tcp needs --key-file: the key both hosts authenticate with")
    if args.ssh is not None:
        raise UsageError("--tcp connects straight to the listener: no -s")
    if args.no_daemon:
        raise UsageError("-e is the receiver's option: with --tcp give it to "
                         "`migrate-receive --listen` on HOST")


def precopy(p: argparse.ArgumentParser) -> None:
    """The live pre-copy limits: when to stop copying a running guest and suspend it."""
    g = p.add_argument_group("live copy", "Memory is copied in rounds while the guest "
                             "runs; then the guest is suspended for the rest.")
    g.add_argument("--max-rounds", type=int, default=5, metavar="N",
                   help="copy rounds while the guest runs, the first full copy included, "
                   "before it is suspended anyway (default 5)")
    g.add_argument("--target-dirty", type=int, default=50, metavar="PAGES",
                   help="suspend the guest as soon as at most PAGES memory pages are left "
                   "to copy (default 50)")


def precopy_policy(args: argparse.Namespace, live: bool = True) -> PrecopyPolicy:
    """The live-copy limits of ``args``; ``live`` False suspends first (as `xl save`)."""
    try:
        return PrecopyPolicy(args.max_rounds if live else 0, args.target_dirty)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def remus(p: argparse.ArgumentParser) -> None:
    """protect's own options (also those of `migrate --remus`); as for `xl remus`."""
    g = p.add_argument_group("checkpoints", "As the options of xl remus.")
    g.add_argument("-i", dest="interval_ms", type=int, default=200, metavar="MS",
                   help="take a checkpoint every MS milliseconds, {}..{} (default 200); "
                   "the guest's network output waits up to this long"
                   .format(*INTERVAL_RANGE_MS))
    g.add_argument("-u", dest="uncompressed", action="store_true",
                   help="send checkpoints uncompressed (by default those to a xen-remus "
                   "backup are compressed: lz4 over what changed since the last one)")
    g.add_argument("-n", dest="no_netbuf", action="store_true",
                   help="do not hold back the guest's network output until the backup has "
                   "the checkpoint: a failover can then lose what clients saw (needs -F)")
    g.add_argument("-d", dest="no_disk", action="store_true",
                   help="do not replicate disks (needs -F): they must then be shared or "
                   "read-only. Without -d every disk must use the block-remus script")
    g.add_argument("-F", dest="unsafe", action="store_true",
                   help="accept the unsafe modes -n and -d")
    g.add_argument("-b", dest="blackhole", action="store_true",
                   help="discard the checkpoints instead of sending them (HOST is not "
                   "used): to measure what protection costs the guest")
    g.add_argument("--stock-backup", action="store_true",
                   help="the backup runs stock `xl migrate-receive -r`: send the plain "
                   "standard stream (no acknowledgements, heartbeats or compression)")
    g.add_argument("--pipeline", dest="pipeline", type=int, default=1, metavar="DEPTH",
                   help="let up to DEPTH checkpoints, {}..{}, wait for the backup's "
                   "acknowledgement at once (default 1: each is acknowledged before the "
                   "next is taken); with DEPTH > 1 a checkpoint is taken while earlier ones "
                   "are still on their way, each holds its own network output (one IFB "
                   "per checkpoint), released in order as the acknowledgements come"
                   .format(*DEPTH_RANGE))
    g.add_argument("--initial-grace", type=int, default=30_000, metavar="MS",
                   help="until the backup has taken the first full copy, allow it MS more "
                   "milliseconds of silence, as building the domain there can stall it "
                   "for seconds (default 30000)")


def heartbeat(p: argparse.ArgumentParser) -> None:
    """Failure detection between two xen-remus ends (protect and migrate-receive -r)."""
    g = p.add_argument_group("failure detection", "Between two xen-remus ends, both send "
                             "heartbeats when they have nothing else to say.")
    g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_MS,
                   metavar="MS",
                   help="after MS milliseconds ({}..{}) without a word from the other "
                   "end, it counts as failed: protect goes on unprotected, migrate-receive "
                   "-r fails over (default {})".format(*HEARTBEAT_RANGE_MS,
                                                       HEARTBEAT_TIMEOUT_MS))


def check_heartbeat(args: argparse.Namespace) -> None:
    lo, hi = HEARTBEAT_RANGE_MS
    if not lo <= args.heartbeat_timeout <= hi:
        raise UsageError(f"--heartbeat-timeout must be {lo}..{hi} ms")


def authentication(p: argparse.ArgumentParser) -> None:
    """The key of the MAC on the control frames between two xen-remus ends."""
    g = p.add_argument_group(
        "authentication", "Between two xen-remus ends every control frame (ACKs, "
        "heartbeats) carries a MAC, so a forged ACK cannot release the guest's output. By "
        "default protect makes a key for each protection and sends it over the transport "
        "(ssh): over a plain TCP transport (-s) that only stops frames forged by someone "
        "who cannot read the stream; give both ends --key-file then. With --tcp the key "
        "authenticates the connection too, and the MAC key is derived from it per "
        "connection.")
    g.add_argument("--key-file", metavar="FILE",
                   help=f"use the key in FILE (at least {KEY_MIN} bytes, e.g. from `head -c "
                   "32 /dev/urandom`; surrounding whitespace ignored; readable by its owner "
                   "only), the same file at the same path on both hosts (protect passes "
                   "the path on to the receiver it starts, unless -s '' or --tcp); it is "
                   "never sent")


def monitoring(p: argparse.ArgumentParser, progress: bool = False) -> None:
    """The status in Prometheus' format, for node_exporter's textfile collector; with
    ``progress`` (protect), the initial copy's progress report."""
    g = p.add_argument_group("monitoring", "`xen-remus status` shows the figures of every "
                             "protection on this host; they can also go to a file.")
    g.add_argument("--metrics-file", type=Path, default=None, metavar="PATH",
                   help="keep this domain's figures in PATH in Prometheus' text format "
                   "(e.g. /var/lib/prometheus/node-exporter/NAME.prom), replaced "
                   "atomically at most once a second and at each change of state")
    if progress:
        g.add_argument("--no-progress", action="store_true",
                       help="do not report the initial copy's progress on stderr (by "
                       "default: in place on a terminal, else a line at most every "
                       "few seconds)")


def read_key(path: str | None) -> bytes | None:
    """The pre-shared key in ``path`` (None: none given)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(KEY_FILE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"--key-file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise UsageError(f"--key-file {path}: readable or writable by others (mode "
                         f"{mode & 0o777:o}): chmod 600 it")
    key = data.strip()
    if len(data) > KEY_FILE_MAX or len(key) < KEY_MIN:
        raise UsageError(f"--key-file {path}: a key of {len(key)} bytes; it must be "
                         f"{KEY_MIN}..{KEY_FILE_MAX} bytes")
    return key


def witness(p: argparse.ArgumentParser, role: str) -> None:
    """How this host reaches the witness (protect, migrate-receive -r; `witness --query`).
    ``role`` says what it is used for, in the group's help."""
    g = p.add_argument_group("witness", role)
    w = g.add_mutually_exclusive_group()
    w.add_argument("--witness", metavar="ADDR",
                   help="the witness's address: HOST:PORT (TCP) or unix:/path")
    w.add_argument("--witness-via", metavar="CMD",
                   help="reach the witness through the shell command CMD, whose stdin and "
                   "stdout are the stream (e.g. `socat - /dev/virtio-ports/NAME`, `ssh W "
                   "socat - TCP:localhost:PORT`)")
    g.add_argument("--witness-key-file", metavar="FILE",
                   help="the witness's pre-shared key (as --key-file; default: the "
                   "--key-file key)")
    g.add_argument("--witness-id", metavar="NAME",
                   help="this host's name at the witness (default: its host name); the "
                   "two hosts of a protection must differ")


def primary_witness(p: argparse.ArgumentParser) -> None:
    """The witness as the primary uses it (protect, migrate --remus)."""
    from xen_remus.witness.lease import GATE_TIMEOUT_S

    witness(p, "Against split brain without a fence: this host releases the guest's output "
            "only while the witness gives it a lease, and the backup (given the same "
            "options, passed on to it unless -s '') resumes its copy only once that lease "
            "ran out. When the backup is lost or protect is stopped, this host first takes "
            "the guest's next generation from the witness, so the backup's copy stays "
            "paused.")
    p.add_argument("--witness-timeout", type=float, default=GATE_TIMEOUT_S, metavar="S",
                   help="with --witness: wait at most S seconds for the first lease, and "
                   "for the next generation when protection ends (default %(default)g)")
