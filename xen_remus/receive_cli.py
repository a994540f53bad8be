"""`xen-remus migrate-receive [-r] [-e]`: a drop-in for `xl migrate-receive`.

Stock senders run it as their transport command, talking on stdin/stdout:
  xl migrate -s "" DOM "xen-remus migrate-receive"
  xl remus -F -n -d -s "" DOM "xen-remus migrate-receive -r"
Logs go to stderr, one line each, like xl's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from xen_remus.channel.ends import Config, ReceiverChannel
from xen_remus.channel.negotiate import HEARTBEAT_TIMEOUT_MS
from xen_remus.errors import UsageError
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.receive.xlsink import SinkConfig, XlSink
from xen_remus.restore_continuous import DEFAULT_MAX_EPOCH_BYTES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate-receive",
        help="receive a plain or checkpointed (-r) migration stream, like xl migrate-receive",
        description="Receive a migration stream on stdin (answering on stdout), validate "
        "it, and relay whole epochs into stock `xl migrate-receive` on this host. With -r "
        "the stream is checkpointed (Remus): when it ends or breaks, the guest resumes from "
        "the last complete epoch.")
    p.add_argument("-r", dest="remus", action="store_true", help="checkpointed (Remus) stream")
    p.add_argument("-e", dest="no_daemon", action="store_true",
                   help="passed to xl: do not daemonise or monitor the guest")
    p.add_argument("-F", dest="no_daemon_f", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--xl", default="xl", help="the xl binary that builds the guest")
    p.add_argument("--max-epoch-mib", type=int, default=DEFAULT_MAX_EPOCH_BYTES >> 20,
                   help="ceiling on one buffered epoch (default %(default)s MiB)")
    p.add_argument("--failover-timeout", type=float, default=300.0,
                   help="bound on the failover (watchdog), seconds (default %(default)s)")
    p.add_argument("--failover-stall", type=float, default=30.0,
                   help="the watchdog also gives up when xl and its hotplug scripts used "
                   "no CPU for this many seconds (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="treat the sender as gone after this many seconds without data "
                   "(default: wait for EOF, as stock xl does)")
    p.add_argument("--no-extensions", action="store_true",
                   help="with -r: offer no xen-remus extensions (behave as stock xl)")
    p.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_MS,
                   metavar="MS", help="with a xen-remus sender: fail over after this much "
                   "silence (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_epoch_mib <= 0 or args.failover_timeout <= 0 or args.failover_stall <= 0:
        raise UsageError("--max-epoch-mib, --failover-timeout and --failover-stall must "
                         "be positive")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise UsageError("--idle-timeout must be positive")
    if not 10 <= args.heartbeat_timeout <= 600_000:
        raise UsageError("--heartbeat-timeout must be 10..600000 ms")
    logging.basicConfig(stream=sys.stderr, format="xen-remus migrate-receive: %(message)s",
                        level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    # Like xl: a vanished sender is an error to handle, not a signal to die of.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    cfg = SinkConfig(xl=args.xl, remus=args.remus, no_daemon=args.no_daemon,
                     failover_timeout=args.failover_timeout,
                     failover_stall=args.failover_stall)
    upstream = Upstream(sys.stdin.fileno(), sys.stdout.fileno(), args.idle_timeout)
    sink = XlSink(cfg)
    try:
        chan = None
        if args.remus and not args.no_extensions:
            chan = ReceiverChannel(Config(heartbeat_timeout_ms=args.heartbeat_timeout),
                                   time.monotonic())
        out = receive(upstream, sink, args.remus, args.max_epoch_mib << 20, chan)
    except BaseException:
        if sink.proc.poll() is None:
            sink.abort("receiver failed")
        raise
    if out.error is not None:
        # The guest resumed from the last good epoch, but the stream was not clean.
        print(f"xen-remus migrate-receive: {out.error}", file=sys.stderr)
        return 1
    return 0
