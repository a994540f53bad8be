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
from typing import TYPE_CHECKING, Any

from xen_remus.cli import options
from xen_remus.cli.witness import client_of, holder_of
from xen_remus.direct.conn import HANDSHAKE_TIMEOUT_S, listen_address
from xen_remus.errors import UsageError
from xen_remus.receive.limits import (
    DEFAULT_MAX_EPOCH_BYTES,
    FENCE_TIMEOUT_S,
    PROMOTE_TIMEOUT_S,
)
from xen_remus.witness.lease import GATE_TIMEOUT_S

if TYPE_CHECKING:
    from xen_remus.direct.conn import Connection
    from xen_remus.receive.fence import FailoverGate


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate-receive",
        help="receive a migration or a Remus (-r) stream, in place of `xl migrate-receive`",
        description="Receive a migration stream on stdin (answering on stdout) from `xl "
        "migrate`, `xl remus`, `xen-remus migrate` or `xen-remus protect`, check it, and "
        "pass it on to stock `xl migrate-receive` on this host, which builds the domain. "
        "With -r the stream is a series of Remus checkpoints: each is held until it is "
        "complete and valid, and when the stream ends, the domain starts from the last "
        "complete checkpoint (failover); an invalid checkpoint after a complete one is "
        "refused: the copy stays paused and the primary is told why. Without --fence that "
        "failover is "
        "automatic, as with xl: if only the link to the primary broke, the guest then runs "
        "on both hosts (split brain).",
        epilog="Senders run it as their transport command, e.g. `xl migrate -s '' DOMAIN "
        "'xen-remus migrate-receive'` or `xl remus -F -n -d -s '' DOMAIN 'xen-remus "
        "migrate-receive -r'`; `xen-remus protect` runs it through ssh by itself.")
    p.add_argument("-r", dest="remus", action="store_true",
                   help="the stream is a Remus one (checkpoints, failover at its end)")
    p.add_argument("-e", dest="no_daemon", action="store_true",
                   help="passed to xl: stay in the foreground instead of waiting in the "
                   "background for the domain to end")
    p.add_argument("-F", dest="no_daemon_f", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--xl", default="xl", metavar="PATH",
                   help="the xl command that builds the domain (default %(default)s)")
    p.add_argument("--max-epoch-mib", type=int, default=DEFAULT_MAX_EPOCH_BYTES >> 20,
                   metavar="MIB", help="memory the stream may hold at once, in MiB: a "
                   "checkpoint being held, reassembly buffers, pages a compressed record "
                   "expands to; a checkpoint needing more is refused (default %(default)s)")
    p.add_argument("--failover-timeout", type=float, default=300.0, metavar="S",
                   help="with -r: give xl at most S seconds to start the domain from the last "
                   "checkpoint after the stream ends, then kill it (default %(default)s)")
    p.add_argument("--failover-stall", type=float, default=30.0, metavar="S",
                   help="with -r: kill it sooner if xl and its hotplug scripts use no CPU for S "
                   "seconds, a hang rather than slow work (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="treat the sender as gone after S seconds without data (default: "
                   "wait for the connection to close, as stock xl does)")
    p.add_argument("--no-extensions", action="store_true",
                   help="with -r: offer none of the xen-remus additions (acknowledgements, "
                   "heartbeats, compression, authentication): behave exactly as stock xl")
    options.heartbeat(p)
    options.authentication(p)
    d = p.add_argument_group(
        "direct transport", "Instead of stdin/stdout: wait for the sender's `--tcp PORT` "
        "connection. Each peer must prove it holds the --key-file key (and is shown that "
        "this end does) before anything else happens; one that fails is logged with its "
        "address and dropped. The first that succeeds is served alone (the listener closes) "
        "and the command exits when its stream ends, as when run over ssh.")
    d.add_argument("--listen", metavar="[HOST:]PORT",
                   help="listen on PORT (of HOST's address only, if given; `[v6]:PORT` for "
                   "IPv6); needs --key-file")
    d.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
                   metavar="S", help="drop a peer that has not authenticated within S "
                   "seconds (default %(default)g)")
    d.add_argument("--exit-on-refusal", action="store_true",
                   help="exit (status 1) after the first peer that fails to authenticate, "
                   "instead of listening on for the right one")
    options.monitoring(p)
    g = p.add_argument_group("fencing", "With -r: make sure the primary is down before "
                             "this host resumes its copy.")
    g.add_argument("--fence", metavar="CMD",
                   help="when the primary is declared dead, run the shell command CMD "
                   "(e.g. IPMI power off, a PDU, `ssh HOST xl destroy DOMAIN`; environment "
                   "XEN_REMUS_DOMAIN, XEN_REMUS_EPOCH) and resume the copy only if it exits "
                   "0; otherwise leave the copy paused, say so and exit 1")
    g.add_argument("--fence-timeout", type=float, default=FENCE_TIMEOUT_S, metavar="S",
                   help="kill CMD and count it as failed after S seconds (default %(default)g)")
    # The witness: the other failover gate (instead of --fence).
    options.witness(p, "With -r, instead of --fence: when the primary is declared dead, "
                    "resume the copy only once the witness gives this host the next "
                    "generation (after the primary's lease ran out); otherwise leave it "
                    "paused, say so and exit 1.")
    p.add_argument("--witness-timeout", type=float, default=GATE_TIMEOUT_S, metavar="S",
                   help="with --witness: wait at most S seconds for it (default %(default)g)")
    c = p.add_argument_group("cluster", "With -r, instead of --fence or --witness: a "
                             "cluster manager (Pacemaker) decides; it fences the primary, "
                             "then promotes this host.")
    c.add_argument("--failover-on-promote", action="store_true",
                   help="when the primary is declared dead, resume the copy only once "
                   "`xen-remus promote DOMAIN` (the OCF agent's promote action) lets it; "
                   "otherwise leave it paused, say so and exit 1")
    c.add_argument("--promote-timeout", type=float, default=PROMOTE_TIMEOUT_S, metavar="S",
                   help="with --failover-on-promote: wait at most S seconds for it (default "
                   "%(default)g)")
    p.set_defaults(func=run)


def failover_gate(args: argparse.Namespace) -> FailoverGate | None:
    """The fence, the witness or the cluster's promotion of ``args`` (None: none)."""
    from xen_remus.receive.fence import Fence
    from xen_remus.receive.promote import PromoteGate
    from xen_remus.witness.lease import WitnessGate

    client = client_of(args)
    if args.failover_on_promote:
        if client is not None or args.fence is not None:
            raise UsageError("--failover-on-promote, --fence and --witness are three ways "
                             "of deciding a failover: give one")
        if not args.remus:
            raise UsageError("--failover-on-promote needs -r: only a Remus stream fails over")
        if args.promote_timeout <= 0:
            raise UsageError("--promote-timeout must be positive")
        return PromoteGate(args.promote_timeout)
    if client is not None and args.fence is not None:
        raise UsageError("--fence and --witness are two ways of deciding a failover: give one")
    if client is not None:
        if not args.remus or args.no_extensions:
            raise UsageError("--witness needs -r and the xen-remus extensions (the "
                             "sender's generation)")
        if args.witness_timeout <= 0:
            raise UsageError("--witness-timeout must be positive")
        return WitnessGate(client, holder_of(args), args.witness_timeout)
    return Fence(args.fence, args.fence_timeout) if args.fence is not None else None


def fence_bound_ms(args: argparse.Namespace) -> int | None:
    """What the offer tells the primary of a fence command: the longest it may run
    (--fence-timeout); the primary holds its output that long after losing this backup
    (cli/protect_fence.py). None without one (the witness and a cluster decide by other
    rules)."""
    return None if args.fence is None else max(1, round(args.fence_timeout * 1000))


def accept_direct(args: argparse.Namespace, listen: tuple[str, int], key: bytes
                  ) -> Connection:
    """--listen: the first peer that authenticates (the listener then closes: one
    connection at a time); HandshakeRefused with --exit-on-refusal."""
    from xen_remus.direct.conn import Listener

    with Listener(*listen, key, args.handshake_timeout) as listener:
        print(f"xen-remus migrate-receive: listening on {listener.address}",
              file=sys.stderr, flush=True)
        conn = listener.accept(args.exit_on_refusal)
    print(f"xen-remus migrate-receive: {conn.peer} authenticated; receiving",
          file=sys.stderr, flush=True)
    return conn


def run(args: argparse.Namespace) -> int:
    if args.max_epoch_mib <= 0 or args.failover_timeout <= 0 or args.failover_stall <= 0:
        raise UsageError("--max-epoch-mib, --failover-timeout and --failover-stall must "
                         "be positive")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise UsageError("--idle-timeout must be positive")
    if args.fence_timeout <= 0:
        raise UsageError("--fence-timeout must be positive")
    if args.fence is not None and not args.remus:
        raise UsageError("--fence needs -r: only a Remus stream fails over")
    if args.key_file is not None and args.listen is None and (
            not args.remus or args.no_extensions):
        raise UsageError("--key-file needs -r and the xen-remus extensions "
                         "(not --no-extensions), or --listen")
    if args.listen is not None and args.key_file is None:
        raise UsageError("--listen needs --key-file: the key both hosts authenticate with")
    listen = listen_address(args.listen) if args.listen is not None else None
    if args.handshake_timeout <= 0:
        raise UsageError("--handshake-timeout must be positive")
    if args.metrics_file is not None:
        if not args.remus or args.no_extensions:
            raise UsageError("--metrics-file needs -r and the xen-remus extensions (not "
                             "--no-extensions)")
        from xen_remus.metrics import check_path

        check_path(args.metrics_file)
    options.check_heartbeat(args)
    key = options.read_key(args.key_file)
    # The receiver itself (stream decoder, channel: numpy, lz4) only to receive, not for
    # --help or a usage error.
    from xen_remus.channel.ends import Config
    from xen_remus.channel.receiver import ReceiverChannel
    from xen_remus.receive.driver import receive
    from xen_remus.receive.fence import FenceFailed
    from xen_remus.receive.timeline import FailoverTimeline
    from xen_remus.receive.upstream import Upstream
    from xen_remus.receive.xlsink import SinkConfig, XlSink
    from xen_remus.restore_continuous import EpochRefused

    gate = failover_gate(args)
    logging.basicConfig(stream=sys.stderr, format="xen-remus migrate-receive: %(message)s",
                        level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    # Like xl: a vanished sender is an error to handle, not a signal to die of.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.remus and gate is None:
        print("xen-remus migrate-receive: warning: no --fence or --witness: if the link "
              "to the primary breaks while it still runs, the guest will run on both hosts "
              "(split brain)",
              file=sys.stderr, flush=True)
    cfg = SinkConfig(xl=args.xl, remus=args.remus, no_daemon=args.no_daemon,
                     failover_timeout=args.failover_timeout,
                     failover_stall=args.failover_stall)
    conn = None
    if listen is not None:
        assert key is not None
        conn = accept_direct(args, listen, key)
        key = conn.session_key  # the control frames' MAC key, this connection's own
        rfd = wfd = conn.sock.fileno()
    else:
        rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    upstream = Upstream(rfd, wfd, args.idle_timeout)
    timeline = FailoverTimeline()  # the driver's and the sink's phases, on one clock
    sink = XlSink(cfg, timeline)
    try:
        chan = None
        if args.remus and not args.no_extensions:
            chan = ReceiverChannel(Config(heartbeat_timeout_ms=args.heartbeat_timeout,
                                          disk=True, mac=True, key=key,
                                          fence=gate is not None,
                                          fence_ms=fence_bound_ms(args),
                                          witness=args.witness is not None
                                          or args.witness_via is not None),
                                   time.monotonic())
        out = receive(upstream, sink, args.remus, args.max_epoch_mib << 20, chan, gate,
                      timeline=timeline, metrics_file=args.metrics_file)
    except (FenceFailed, EpochRefused):
        raise  # xl was stopped before it resumed: its paused copy stays (XlSink.hold)
    except BaseException:
        if sink.proc.poll() is None:
            sink.abort("receiver failed")
        raise
    if out.error is not None:
        # The guest resumed from the last good epoch, but the stream was not clean.
        print(f"xen-remus migrate-receive: {out.error}", file=sys.stderr)
        return 1
    return 0
