"""`xen-remus protect DOMAIN HOST` (also `migrate --remus`): Remus, our epoch loop
(save_continuous.RemusLoop) to a backup running `xen-remus migrate-receive -r` (ACK,
heartbeats, compression) or stock `xl migrate-receive -r` (`--stock-backup`: the plain
standard stream). Flags mean what they mean for `xl remus`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections import deque
from types import FrameType
from typing import Any

from xen_remus.channel import wire
from xen_remus.channel.ends import Config, Offered, SenderChannel
from xen_remus.channel.link import BackupLost, SenderLink
from xen_remus.channel.stats import EpochStats, StatusFile
from xen_remus.cli import options
from xen_remus.cli.witness import client_of, holder_of
from xen_remus.disk.device import ReplicatedDisk
from xen_remus.disk.remote import SocketControl
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.fdio import IoTimeout, read_some
from xen_remus.generation import GenerationStore
from xen_remus.save.engine import SaveEngine
from xen_remus.save.session import SaveSession, domain_config_json, domain_lock
from xen_remus.save.transport import MigrationRefused, ReceiverProcess
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.witness.lease import GATE_TIMEOUT_S, LeaseKeeper, LeaseLost, OutputGate
from xen_remus.xlproto import BANNER

log = logging.getLogger("xen_remus.protect")
EXIT_UNPROTECTED = 3  # the backup was lost; the guest runs here unprotected
DESCRIPTION = (
    "Keep DOMAIN running here with an up-to-date copy on HOST that takes over if this "
    "host fails (Remus). After a first live copy, protect takes a checkpoint every -i "
    "milliseconds: it pauses the guest for a moment, copies the memory and CPU state that "
    "changed, lets the guest go on and sends the checkpoint to HOST. The guest's network "
    "output is held back until HOST has the checkpoint it depends on (until it is sent, "
    "with --stock-backup), so after a failover no client has seen anything the copy does "
    "not know. HOST runs `xen-remus migrate-receive -r` (reached through ssh, or -s CMD), "
    "or stock `xl migrate-receive -r` with --stock-backup. `xen-remus status` shows the "
    "figures of the last checkpoint; -v prints them for each one.")
EPILOG = (
    "Exit status: 0 when stopped, 3 when the backup was lost (the domain then keeps "
    "running here unprotected; destroy any copy left on HOST and run protect again), 2 for "
    "bad arguments, 1 for other errors. Stopping protect (Ctrl-C or SIGTERM) closes the "
    "stream and, as with `xl remus`, HOST then starts its copy: destroy one of the two. "
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
    options.witness(p, "Against split brain without a fence: this host releases the "
                    "guest's output only while the witness gives it a lease, and the "
                    "backup (given the same options, passed on to it unless -s '') resumes "
                    "its copy only once that lease ran out. When the backup is lost or "
                    "protect is stopped, this host first takes the guest's next generation "
                    "from the witness, so the backup's copy stays paused.")
    p.add_argument("--witness-timeout", type=float, default=GATE_TIMEOUT_S, metavar="S",
                   help="with --witness: wait at most S seconds for the first lease, and "
                   "for the next generation when protection ends (default %(default)g)")
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
    if (args.no_netbuf or args.no_disk) and not args.unsafe:
        raise UsageError("-n and -d turn off output commit or disk replication: add -F "
                         "to accept that (as xl remus)")
    if args.key_file is not None and (args.stock_backup or args.blackhole):
        raise UsageError("--key-file is for a xen-remus backup (not --stock-backup or -b)")
    if (args.witness is not None or args.witness_via is not None) and (
            args.stock_backup or args.blackhole):
        raise UsageError("--witness is for a xen-remus backup (not --stock-backup or -b)")
    if args.witness_timeout <= 0:
        raise UsageError("--witness-timeout must be positive")
    options.check_heartbeat(args)


def read_banner(fd: int, timeout: float, what: str) -> bytes:
    """Read exactly the xl banner from ``fd``; returns the bytes after it (the offer)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while len(buf) < len(BANNER):
        try:
            chunk = read_some(fd, deadline - time.monotonic(), "the banner", 4096)
        except IoTimeout:
            raise MigrationRefused(f"receiver `{what}`: no banner within {timeout:.0f} s"
                                   ) from None
        if not chunk:
            raise MigrationRefused(f"receiver `{what}` closed the connection before the "
                                   f"banner (got {buf[:60]!r})")
        buf += chunk
        if buf[:len(BANNER)] != BANNER[:len(buf[:len(BANNER)])]:
            raise MigrationRefused(f"receiver `{what}`: expected the xl banner at offset 0, "
                                   f"got {buf[:60]!r}")
    return buf[len(BANNER):]


class Summary:
    """Per-epoch figures: the status file while running, a summary at exit."""

    def __init__(self, status: StatusFile | None, verbose: bool,
                 chan: SenderChannel | None = None) -> None:
        self.status, self.verbose, self.chan = status, verbose, chan
        self.n = 0
        self.pause = self.send = self.raw = self.wire = self.dirty = 0.0
        self.ack: deque[float] = deque(maxlen=10_000)
        self.pauses: deque[float] = deque(maxlen=10_000)
        self.first: float | None = None
        self.last = 0.0

    def epoch(self, st: EpochStats) -> None:
        now = time.monotonic()
        if st.epoch == 0:
            self.first = now  # rates count the checkpoints after the initial copy
            print(f"xen-remus protect: initial copy committed by the backup "
                  f"({st.wire_bytes} bytes); protecting", file=sys.stderr, flush=True)
            if self.status is not None and self.chan is not None:
                agreed = self.chan.agreed
                self.status.doc["extensions"] = agreed.tokens() if agreed else None
        else:
            self.n += 1
            self.pause += st.pause_ms
            self.pauses.append(st.pause_ms)
            self.send += st.send_ms
            self.raw += st.raw_bytes
            self.wire += st.wire_bytes
            self.dirty += st.dirty_pages
            if st.ack_ms is not None:
                self.ack.append(st.ack_ms)
        self.last = now
        if self.status is not None:
            self.status.epoch(st)
        if self.verbose:
            print(f"epoch {st.epoch}: pause {st.pause_ms:.1f} ms, {st.dirty_pages} dirty, "
                  f"{st.raw_bytes} B -> {st.wire_bytes} B, send {st.send_ms:.1f} ms, ack "
                  f"{'-' if st.ack_ms is None else f'{st.ack_ms:.1f} ms'}", file=sys.stderr)

    def text(self) -> str:
        if not self.n:
            return "no checkpoint after the initial copy"
        secs = self.last - (self.first or self.last)
        p = sorted(self.pauses)
        ack = (f", ack mean {sum(self.ack) / len(self.ack):.1f} ms" if self.ack else "")
        return (f"{self.n} checkpoints in {secs:.1f} s ({self.n / secs if secs else 0:.1f}/s); "
                f"pause mean {self.pause / self.n:.1f} ms, median {p[len(p) // 2]:.1f} ms, "
                f"max {p[-1]:.1f} ms; dirty pages mean {self.dirty / self.n:.0f}; bytes "
                f"{self.raw / self.n:.0f} -> {self.wire / self.n:.0f} per epoch "
                f"(x{self.raw / self.wire if self.wire else 1:.2f}); send mean "
                f"{self.send / self.n:.1f} ms{ack}")


def cmd_protect(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="xen-remus protect: %(message)s",
                        level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING)
    check_args(args)
    policy = options.precopy_policy(args)
    key = options.read_key(args.key_file)
    witness = client_of(args)
    holder = holder_of(args) if witness is not None else ""
    # pyroute2 only when protecting
    from xen_remus.devices.discover import device_set, read_disks, unreplicable

    with SaveSession(args.domain) as s, domain_lock(s.target.domid):
        domid, name = s.target.domid, s.target.name
        disks = [] if args.no_disk or args.blackhole else read_disks(domid)
        if (why := unreplicable(disks)) is not None:
            raise UsageError(str(why))
        if disks and args.stock_backup:
            raise UsageError("a stock backup (`xl migrate-receive -r`) cannot replicate "
                             f"disks ({', '.join(d.vdev for d in disks)}): add -d -F")
        config = domain_config_json(domid)
        # Under the domain's lock: no other protect of it counts at the same time.
        generation = None if args.blackhole else GenerationStore().start_protection(name)
        guest = s.open_guest()
        assert s.dom is not None
        gate = None
        if witness is not None and generation is not None:
            gate = _lease(witness, name, generation, holder, args.witness_timeout,
                          s.dom.xc, domid)
        recv: ReceiverProcess | None = None
        hole: list[int] = []
        if args.blackhole:
            rfd, wfd = os.pipe()  # a back channel that stays silent
            hole = [os.open(os.devnull, os.O_WRONLY), rfd, wfd]
            send_fd, recv_fd, rest, peer = hole[0], rfd, b"", "(black hole)"
        else:
            rune = receiver_rune(args.host, args.ssh, args.stock_backup, args.no_daemon,
                                 args.key_file, witness_rune(args))
            recv = ReceiverProcess(rune)
            send_fd, recv_fd, peer = recv.send_fd, recv.recv_fd, args.host
            rest = read_banner(recv_fd, args.timeout, rune)
        chan = SenderChannel(Config(heartbeat_timeout_ms=args.heartbeat_timeout,
                                    compression=not args.uncompressed,
                                    initial_grace_ms=args.initial_grace,
                                    disk=bool(disks), mac=True, key=key,
                                    generation=generation), time.monotonic())
        link = SenderLink(chan, send_fd, recv_fd)
        status = StatusFile(name, "primary", peer)
        try:
            _await_offer(link, rest, 0.0 if args.blackhole or args.stock_backup else 2.0)
            if not args.blackhole:
                _warn_unfenced(link, peer, name)
            log.info("protection of %s: generation %s", name, generation)
            if disks and not (chan.agreement is not None and chan.agreement.disk):
                raise MigrationRefused(f"the backup on {peer} does not take disk "
                                       "replication (an older xen-remus?): add -d -F")
            out = CheckpointEmitter(link, config)
            engine = SaveEngine(s.dom, guest, out, policy)
            summary = Summary(status, args.verbose > 0, chan)
            status.state("starting", f"initial copy of domain {domid} to {peer}")
            devs = device_set(domid, net=not args.no_netbuf,
                              disks=[replicated_disk(d.vdev, d.replica, out)
                                     for d in disks if d.replica])
            rc = _protect(engine, out, link, devs, args, summary, status, name, gate)
            print(f"xen-remus protect: {summary.text()}", file=sys.stderr)
            return rc
        finally:
            if gate is not None:
                gate.keeper.stop()
            if recv is not None:
                recv.close(timeout=5)
            for fd in hole:
                os.close(fd)


def replicated_disk(vdev: str, replica: str, out: CheckpointEmitter) -> ReplicatedDisk:
    """The Device of one block-remus disk: at each seal its frames go into the
    checkpoint being buffered, as REMUS_DISK records."""

    def into_checkpoint(vdev: str, frames: bytes, ends: list[int]) -> None:
        for body in wire.disk_bodies(vdev, frames, ends):
            out.libxc_record(wire.REC_REMUS_DISK, body)

    return ReplicatedDisk(SocketControl(vdev, replica, into_checkpoint))


def _await_offer(link: SenderLink, rest: bytes, wait: float) -> None:
    """Our receiver writes its offer with the banner; give it ``wait`` s to arrive (a
    stock one never sends any; an offer later still works, the accept just comes later)."""
    chan = link.chan
    now = time.monotonic()
    link.events += chan.feed_back(rest, now)
    deadline = now + wait
    while not any(isinstance(ev, Offered) for ev in link.events):
        try:
            data = read_some(link.recv_fd, deadline - time.monotonic(), "the offer", 4096)
        except IoTimeout:
            log.info("no extension offer from the backup: a stock receiver, plain stream")
            return
        if not data:
            raise MigrationRefused("the backup closed its channel right after its banner")
        link.events += chan.feed_back(data, time.monotonic())


def _warn_unfenced(link: SenderLink, peer: str, name: str) -> None:
    """One line at start unless the backup said (in its offer) that it fences this host
    before it fails over."""
    offer = next((ev.offer for ev in link.events if isinstance(ev, Offered)), None)
    if offer is None or not offer.fence:
        print(f"xen-remus protect: warning: the backup on {peer} fails over without "
              "fencing this host (no --fence there): if the link between the hosts breaks, "
              f"{name} will run on both (split brain)", file=sys.stderr, flush=True)


def _lease(witness: Any, name: str, generation: int, holder: str, timeout: float,
           xc: Any, domid: int) -> OutputGate:
    """The witness's lease on ``name``, taken before anything else (a witness that gave the
    guest to another host refuses it: this copy is stale), renewed from now on."""
    keeper = LeaseKeeper(witness, name, generation, holder)
    try:
        keeper.acquire(timeout)
    except LeaseLost as exc:
        raise MigrationRefused(f"{exc}: the copy of {name} here is not the current one; "
                               "not protecting it") from None
    keeper.start()
    return OutputGate(keeper, lambda: xc.pause(domid), lambda: xc.unpause(domid))


def _claimed(gate: OutputGate | None, args: argparse.Namespace, name: str,
             status: StatusFile, when: str) -> bool:
    """Protection ends with the guest running on here: with a witness, only once it gave
    this host the next generation (else the guest stays paused here; False)."""
    if gate is None:
        return True
    why = gate.claim(args.witness_timeout)
    if why is None:
        return True
    status.state("held", why)
    print(f"xen-remus protect: {why}\nxen-remus protect: domain {name} stays PAUSED here "
          f"{when}: the backup's copy may be the one running; unpause it (`xl unpause "
          f"{name}`) only if it is not", file=sys.stderr)
    return False


def _protect(engine: SaveEngine, out: CheckpointEmitter, link: SenderLink, devs: Any,
             args: argparse.Namespace, summary: Summary, status: StatusFile,
             name: str, gate: OutputGate | None = None) -> int:
    loop: RemusLoop | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        if loop is not None:
            loop.stop()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with devs:
            if gate is not None:
                gate.on_state = status.state
            loop = RemusLoop(engine, out, link, devs, args.interval_ms / 1000,
                             on_epoch=summary.epoch, before_commit=gate)
            try:
                status.state("protecting", f"interval {args.interval_ms} ms")
                loop.run()
            except BackupLost as exc:
                if not _claimed(gate, args, name, status, f"after epoch {loop.epoch}"):
                    return 1
                devs.release_all()  # the guest goes on here: its output too
                status.state("unprotected", str(exc))
                print(f"xen-remus protect: {exc}\nxen-remus protect: domain {name} keeps "
                      f"running here UNPROTECTED after epoch {loop.epoch}; to protect it "
                      "again, destroy any copy on the backup and run protect again",
                      file=sys.stderr)
                return EXIT_UNPROTECTED
            except LeaseLost as exc:
                status.state("held", str(exc))
                print(f"xen-remus protect: {exc}\nxen-remus protect: domain {name} stays "
                      "PAUSED here: the witness gave it to the backup", file=sys.stderr)
                return 1
            except XenRemusError as exc:
                status.state("failed", str(exc))
                raise
            if not _claimed(gate, args, name, status, f"after epoch {loop.epoch}"):
                return 1
        status.state("stopped", f"after epoch {loop.epoch}")
        print(f"xen-remus protect: stopped after epoch {loop.epoch}; " + (
              "the backup resumes its copy when the stream closes (as with xl remus)"
              if gate is None else "the witness keeps the backup's copy paused"),
              file=sys.stderr)
        return 0
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
