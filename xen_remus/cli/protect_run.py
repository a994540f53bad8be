"""What `xen-remus protect` does once its arguments are checked (the parser: cli/protect.py):
start the receiver on the backup, agree on the channel, build the domain's devices and run
the epoch loop (save_continuous.RemusLoop) until stopped or the backup is lost."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any, TextIO

from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost, SenderLink
from xen_remus.channel.sender import Offered, SenderChannel
from xen_remus.channel.stats import HANDED_OVER, EpochStats, StatusFile
from xen_remus.cli.handover import HANDOVER_SIGNAL
from xen_remus.cli.progress import CopyReport
from xen_remus.cli.protect import EXIT_UNPROTECTED, receiver_rune, witness_rune
from xen_remus.cli.protect_disks import replicated_disk, sync_disks
from xen_remus.cli.protect_fence import fence_hold_s, hold_for_fence
from xen_remus.cli.protect_witness import claimed, refuse_unwitnessed, take_lease
from xen_remus.cli.witness import client_of, holder_of
from xen_remus.devices.discover import device_set, read_disks, unreplicable
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.fdio import IoTimeout, read_some
from xen_remus.generation import GenerationStore
from xen_remus.save.engine import CopyProgress, SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.session import SaveSession, domain_config_json, domain_lock
from xen_remus.save.transport import (
    DirectReceiver,
    MigrationRefused,
    Receiver,
    ReceiverProcess,
)
from xen_remus.save_continuous import CheckpointEmitter, RemusLoop
from xen_remus.supervisor import Supervisor
from xen_remus.witness.lease import OutputGate
from xen_remus.xlproto import BANNER

log = logging.getLogger("xen_remus.protect")


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
        self.detail = ""  # the "protecting" state's detail (interval, pipeline depth)
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
            if self.status is not None:  # protected from the first commit on, not before
                self.status.state("protecting", self.detail)
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


def direct_receiver(args: argparse.Namespace, key: bytes | None) -> DirectReceiver:
    """The authenticated connection of --tcp to the listener on HOST (cli/protect.py
    checked that a key was given)."""
    from xen_remus.direct.conn import connect

    assert key is not None
    conn = connect(args.host, args.tcp, key, args.timeout)
    log.info("direct transport to %s: authenticated", conn.peer)
    return DirectReceiver(conn)


def protect(args: argparse.Namespace, policy: PrecopyPolicy, key: bytes | None) -> int:
    """Protect ``args.domain`` (arguments checked by cli/protect.py, which read the key)."""
    with SaveSession(args.domain) as s, domain_lock(s.target.domid), ExitStack() as early:
        domid, name = s.target.domid, s.target.name
        disks = [] if args.no_disk or args.blackhole else read_disks(domid)
        if (why := unreplicable(disks)) is not None:
            raise UsageError(str(why))
        if disks and args.stock_backup:
            raise UsageError("a stock backup (`xl migrate-receive -r`) cannot replicate "
                             f"disks ({', '.join(d.vdev for d in disks)}): add -d -F")
        recv: Receiver | None = None
        if args.tcp is not None:
            # Before anything changes here (generation, lease, the guest's mappings): a
            # backup that fails the handshake is refused with the guest untouched.
            direct = direct_receiver(args, key)
            early.callback(direct.close)  # also on a failure before the try below
            recv, key = direct, direct.conn.session_key  # the MAC key, per connection
        config = domain_config_json(domid)
        # Under the domain's lock: no other protect of it counts at the same time.
        generation = None if args.blackhole else GenerationStore().start_protection(name)
        guest = s.open_guest()
        assert s.dom is not None
        gate: OutputGate | None = None
        witness = client_of(args)
        if witness is not None and generation is not None:
            xc = s.dom.xc
            gate = take_lease(witness, name, generation, holder_of(args),
                              args.witness_timeout, lambda: xc.pause(domid),
                              lambda: xc.unpause(domid))
        report: CopyReport | None = None
        hole: list[int] = []
        if args.blackhole:
            rfd, wfd = os.pipe()  # a back channel that stays silent
            hole = [os.open(os.devnull, os.O_WRONLY), rfd, wfd]
            send_fd, recv_fd, rest, peer = hole[0], rfd, b"", "(black hole)"
        else:
            if recv is None:
                recv = ReceiverProcess(receiver_rune(
                    args.host, args.ssh, args.stock_backup, args.no_daemon, args.key_file,
                    witness_rune(args)))
            send_fd, recv_fd, peer = recv.send_fd, recv.recv_fd, args.host
            rest = read_banner(recv_fd, args.timeout, recv.rune)
        chan = SenderChannel(Config(heartbeat_timeout_ms=args.heartbeat_timeout,
                                    compression=not args.uncompressed,
                                    initial_grace_ms=args.initial_grace,
                                    disk=bool(disks), mac=True, key=key,
                                    generation=generation), time.monotonic())
        link = SenderLink(chan, send_fd, recv_fd)
        status = StatusFile(name, "primary", peer, metrics=args.metrics_file)
        status.doc["generation"] = generation
        sup = None if args.blackhole else Supervisor.start(status.path)
        try:
            _await_offer(link, rest, 0.0 if args.blackhole or args.stock_backup else 2.0)
            if not args.blackhole:
                refuse_unwitnessed(chan.offer, gate is not None, peer, name)
                _warn_unfenced(link, peer, name)
            log.info("protection of %s: generation %s", name, generation)
            if disks and not (chan.agreement is not None and chan.agreement.disk):
                raise MigrationRefused(f"the backup on {peer} does not take disk "
                                       "replication (an older xen-remus?): add -d -F")
            out = CheckpointEmitter(link, config)
            engine = SaveEngine(s.dom, guest, out, policy, dm=s.dm)
            if not args.no_progress:
                report = watch_copy(engine)
            summary = Summary(status, args.verbose > 0, chan)
            status.state("starting", f"initial copy of domain {domid} to {peer}")
            rdisks = [replicated_disk(d.vdev, d.replica, out, generation or 0)
                      for d in disks if d.replica]
            devs = device_set(domid, net=not args.no_netbuf, depth=args.pipeline,
                              disks=rdisks)
            rc = _protect(engine, out, link, devs, args, summary, status, name, sup,
                          lambda: sync_disks(rdisks, link, out, status), gate,
                          end_stream=lambda: _end_stream(recv))
            print(f"xen-remus protect: {summary.text()}", file=sys.stderr)
            return rc
        finally:
            if gate is not None:
                gate.keeper.stop()
            if report is not None:
                report.close()
            if sup is not None:
                sup.close()  # still armed only if the guest could not be paused here
            if recv is not None:
                if status.doc["state"] == HANDED_OVER:
                    # The backup waits on (for its promotion, or xl resuming the guest):
                    # its transport must outlive us, or its stderr breaks under xl.
                    recv.detach()
                else:
                    recv.close(timeout=5)
            for fd in hole:
                os.close(fd)


def _end_stream(recv: Receiver | None) -> None:
    if recv is not None:
        recv.close(timeout=5)


def watch_copy(engine: SaveEngine, out: TextIO | None = None) -> CopyReport:
    """Report the initial copy's progress (CopyReport) until its final round; the
    engine's later rounds are checkpoints and go unreported."""
    report = CopyReport(out)

    def copied(p: CopyProgress) -> None:
        report.update(p)
        if report.done:
            engine.progress = None

    engine.progress = copied
    return report


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


def _protect(engine: SaveEngine, out: CheckpointEmitter, link: SenderLink, devs: Any,
             args: argparse.Namespace, summary: Summary, status: StatusFile,
             name: str, sup: Supervisor | None,
             before_precopy: Callable[[], None] | None = None,
             gate: OutputGate | None = None,
             end_stream: Callable[[], None] = lambda: None) -> int:
    """The loop and what becomes of the guest when it ends: stopped or backup lost, it
    goes on here with its output released (a backup lost that fences this host: only
    after the hold of protect_fence.py; ``end_stream`` closes the transport); any other
    failure once the backup holds a checkpoint leaves it paused here, its unacknowledged
    output dropped (devices' teardown), for the backup to take over; if protect dies
    outright, the supervisor pauses it."""
    loop: RemusLoop | None = None
    domid = engine.dom.domid

    def stop(signum: int, frame: FrameType | None) -> None:
        if loop is not None:
            loop.stop()

    def hand_over(signum: int, frame: FrameType | None) -> None:
        if loop is not None:  # before the loop exists (devices' setup): not yet protected
            loop.handover()

    def on_sent(epoch: int) -> None:
        if sup is not None:
            sup.arm(domid)  # the backup may resume epoch `epoch` from now on

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    old[HANDOVER_SIGNAL] = signal.signal(HANDOVER_SIGNAL, hand_over)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with devs:
            if gate is not None:
                gate.on_state = status.state
            loop = RemusLoop(engine, out, link, devs, args.interval_ms / 1000,
                             on_epoch=summary.epoch, depth=args.pipeline,
                             before_precopy=before_precopy, before_commit=gate,
                             on_sent=on_sent)
            try:
                depth = f", pipeline depth {args.pipeline}" if args.pipeline > 1 else ""
                summary.detail = f"interval {args.interval_ms} ms{depth}"
                loop.run()
            except BackupLost as exc:
                if not claimed(gate, args, name, status, f"after epoch {loop.epoch}"):
                    _disarm(sup)  # the gate holds it paused; teardown drops its output
                    return 1
                hold = fence_hold_s(link.chan.offer, link.chan.agreed, exc.closed)
                if hold:  # the backup may yet fence this host and resume its copy
                    hold_for_fence(hold, name, status.doc["peer"], status, end_stream)
                devs.release_all()  # the guest goes on here: its output too
                _disarm(sup)
                status.state("unprotected", str(exc))
                print(f"xen-remus protect: {exc}\nxen-remus protect: domain {name} keeps "
                      f"running here UNPROTECTED after epoch {loop.epoch}; to protect it "
                      "again, destroy any copy on the backup and run protect again",
                      file=sys.stderr)
                return EXIT_UNPROTECTED
            except BaseException as exc:
                _failed(loop, devs, sup, status, name, exc)
                raise
            if loop.handed_over:
                # Every epoch is committed; what the vifs passed on after the last seal
                # the guest sent before it suspended, as the backup's copy knows.
                devs.release_all()
                _disarm(sup)  # suspended and paused for good: nothing left to pause
                where = ("when the stream ends" if gate is None else
                         "once this host's witness lease ran out")
                status.state(HANDED_OVER, f"after epoch {loop.epoch}")
                print(f"xen-remus protect: handed {name} over after epoch {loop.epoch}: the "
                      f"backup holds it whole and resumes it {where} (promoted first, under "
                      f"a cluster); every output was released. Domain {name} stays "
                      "suspended and paused here: destroy it (xl destroy)", file=sys.stderr)
                return 0
            if not claimed(gate, args, name, status, f"after epoch {loop.epoch}"):
                _disarm(sup)
                return 1
            devs.release_all()  # stopped: the guest goes on here, its output too
            _disarm(sup)
        status.state("stopped", f"after epoch {loop.epoch}")
        print(f"xen-remus protect: stopped after epoch {loop.epoch}; " + (
              "the backup resumes its copy when the stream closes (as with xl remus)"
              if gate is None else "the witness keeps the backup's copy paused"),
              file=sys.stderr)
        return 0
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _disarm(sup: Supervisor | None) -> None:
    if sup is not None:
        sup.disarm()


def _failed(loop: RemusLoop, devs: Any, sup: Supervisor | None, status: StatusFile,
            name: str, exc: BaseException) -> None:
    """What a failure of this side does to the guest, said once (the error follows)."""
    if loop.sent < 0:  # the backup has nothing to resume: the guest goes on here
        try:
            devs.release_all()
        except XenRemusError as rel:  # the first failure is the one to raise
            log.error("releasing the guest's held output: %s", rel)
        _disarm(sup)
        status.state("failed", str(exc))
        return
    if loop.halted:
        _disarm(sup)  # paused already: a second pause would need a second unpause
        what = (f"domain {name} is PAUSED here: the backup resumes its copy from its last "
                f"whole epoch ({loop.epoch} acknowledged, {loop.sent} sent); the output "
                "not acknowledged was dropped. Destroy this copy (xl destroy) once the "
                "backup runs its own")
    else:
        what = (f"domain {name} could not be paused here; the supervisor tries again as "
                f"protect exits (the backup resumes its copy from its last whole epoch)")
    status.state("halted" if loop.halted else "failed", f"{exc}; {what}")
    print(f"xen-remus protect: {what}", file=sys.stderr)
