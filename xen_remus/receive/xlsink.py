"""The sink that builds the guest: stock `xl migrate-receive [-r] [-e]` on this host,
fed the committed epochs, with a watchdog on its failover.

Sink choice. Committed epochs are relayed, byte for byte, as a standard checkpointed
stream into stock `xl migrate-receive -r` (XlSink). Why not libxl-save-helper directly:
its argv and callback protocol are libxl-internal (they carry xenstore/console event
channels that libxl allocates while building the domain), so driving it means
re-implementing libxl's domain build; xl does that, and takes the same stream we already
have. Why not materialise the guest ourselves: a later fallback, if stock restore cannot
be made reliable (see below).

Why stock failover hangs and why ours should not. libxl reads a
checkpointed stream in two alternating layers: libxc (in libxl-save-helper) reads page
data up to its CHECKPOINT record, then hands the fd back to libxl, which buffers its own
records up to CHECKPOINT_END (libxl_stream_read.c, SRS_PHASE_BUFFERING), then hands it
back. An EOF can land in either layer, mid-record, while the two processes are passing
control over the callback pipe; the failover paths then differ (libxc `remus_failover`
vs libxl `XGR_CHECKPOINT_FAILOVER` relayed back through the helper), and a primary
killed at a random moment exercises all of them. That this is where the hang lives is a
hypothesis: `make soak SOAK_RECEIVER=stock` cuts stock streams at random bytes and prints
what a hung receiver and its helper wait on. Our sink only ever sees EOF at one
place: right after a CHECKPOINT_END we wrote whole, when libxc is blocked reading the
next record header — the plainest path. On top of that a watchdog bounds the wait: if
the sink has not finished failing over within `failover_timeout`, or its process tree
used no CPU for `failover_stall` (a hang, not slow hotplug scripts), its process group is
killed and the error names the epoch it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass

from xen_remus.fdio import IoTimeout, read_some, write_all
from xen_remus.paths import XEN_SCRIPTS_DIR
from xen_remus.receive import timeline as T
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import ReceiveError
from xen_remus.stream.events import Buffer
from xen_remus.xlproto import Message, ReceiverSide, SenderSide

log = logging.getLogger("xen_remus.receive")


HOLD_DRAIN_S = 10.0  # XlSink.hold: how long xl gets to read what it was sent
HOLD_SETTLE_S = 0.2  # and to act on what it read last


@dataclass
class SinkConfig:
    xl: str = "xl"
    remus: bool = False
    no_daemon: bool = False  # -e
    io_timeout: float = 60.0  # the sink must take each write / send each message
    ready_timeout: float = 600.0  # plain stream: restore may take a while after END
    # The watchdog. Failover runs the device hotplug scripts, which take 20-40 s under
    # TCG (vif-bridge was seen still busy at 30 s): kill xl only when its process
    # tree has used no CPU for failover_stall s, or after failover_timeout s in all.
    failover_timeout: float = 300.0
    failover_stall: float = 30.0
    failover_poll: float = 0.1  # how often the watchdog looks at xl's processes


class ResumeWatch:
    """The failover's phases inside xl, from its child processes' command lines at each
    poll: libxl-save-helper (libxc's restore) ends, then the hotplug scripts run (the
    devices), then xl renames and unpauses the copy and exits. A phase shorter than a
    poll may pass unseen: then its end is marked when xl exits, if it was ever seen."""

    HELPER = "libxl-save-helper"

    def __init__(self, timeline: T.FailoverTimeline) -> None:
        self.timeline = timeline
        self.helper = self.scripts = False  # ever seen

    def observe(self, cmdlines: Sequence[str]) -> None:
        helper = any(self.HELPER in c for c in cmdlines)
        scripts = any(f"{XEN_SCRIPTS_DIR}/" in c for c in cmdlines)
        self.helper |= helper
        self.scripts |= scripts
        if (self.helper and not helper) or scripts:
            self.timeline.mark(T.LIBXL_RESUME)
        if self.scripts and not scripts:
            self.timeline.mark(T.DEVICES)

    def exited(self) -> None:
        """xl exited (status 0): whatever was seen has ended, and the copy runs."""
        if self.helper or self.scripts:
            self.timeline.mark(T.LIBXL_RESUME)
        if self.scripts:
            self.timeline.mark(T.DEVICES)
        self.timeline.mark(T.RUNNING)


class XlSink:
    """Relays to `xl migrate-receive [-r] [-e]`: we are its sender, it builds the guest."""

    def __init__(self, cfg: SinkConfig, timeline: T.FailoverTimeline | None = None) -> None:
        self.cfg = cfg
        self.timeline = timeline if timeline is not None else T.FailoverTimeline()
        self.argv = [cfg.xl, "migrate-receive"] + (["-r"] if cfg.remus else []) + (
            ["-e"] if cfg.no_daemon else [])
        self.domain_name: str | None = None  # set by the driver from the xl header
        self.proto = SenderSide(checkpointed=cfg.remus)
        self._got: list[Message] = []  # handshake messages xl sent, not yet awaited
        try:
            # Own session: the watchdog kills xl and its libxl-save-helper together.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ReceiveError(f"cannot run {' '.join(self.argv)}: {exc}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._await("banner", cfg.io_timeout)

    def __str__(self) -> str:
        return f"`{' '.join(self.argv)}` (pid {self.proc.pid})"

    def _await(self, name: str, timeout: float) -> int | None:
        """Wait for handshake message ``name`` from xl; its status byte if it has one."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._got):
                if msg.name == name:
                    del self._got[i]
                    return msg.status
            try:
                data = read_some(self._out, deadline - time.monotonic(),
                                 f"the {name} from {self}", 4096)
            except IoTimeout as exc:
                raise ReceiveError(str(exc)) from None
            if not data:
                self.proto.eof()
            self._got += self.proto.feed(data)

    def send(self, bufs: Sequence[Buffer]) -> None:
        try:
            write_all(self._in, bufs, self.cfg.io_timeout, f"{self} to take data")
        except BrokenPipeError:
            rc = self.proc.wait(timeout=self.cfg.io_timeout)
            raise ReceiveError(f"{self} exited (status {rc}) while receiving") from None
        except IoTimeout as exc:
            raise ReceiveError(str(exc)) from None

    def committed(self, epoch: int) -> None:
        log.debug("epoch %d committed to %s", epoch, self)

    def _close_input(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def failover(self, epoch: int) -> None:
        self._close_input()
        self.timeline.mark(T.RELAY_END)
        watch = ResumeWatch(self.timeline)
        rc, why = self._watch(self.cfg.failover_timeout, self.cfg.failover_stall, watch)
        if rc is None:
            for line in _describe_tree(self.proc.pid):  # evidence of where stock hangs
                log.warning("watchdog: %s", line)
            self._kill()
            raise ReceiveError(
                f"failover from epoch {epoch}: {self} {why} (the stock libxl "
                f"failover hang); killed it, its paused copy {self.incoming_name()} is "
                "left for inspection")
        if rc != 0:
            raise ReceiveError(f"failover from epoch {epoch}: {self} exited "
                               f"with status {rc}")
        watch.exited()

    def hold(self, epoch: int) -> None:
        """Stop without resuming (a failed fence): kill xl and its helper while they still
        wait for more of the stream, since the end of it is their signal to resume. The
        paused copy of ``epoch`` stays as it is, under incoming_name(). First let xl read
        what was sent to it (the committed epochs; bounded): killed with them still in
        its pipe, its copy would lag behind what was ACKed."""
        deadline = time.monotonic() + HOLD_DRAIN_S
        waited = False
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                left = struct.unpack("i", fcntl.ioctl(self._in, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                break
            if not left:
                if waited:  # it just read the last of it: let it act on that
                    time.sleep(HOLD_SETTLE_S)
                break
            waited = True
            time.sleep(0.01)
        self._kill()
        log.warning("%s killed before it resumed; its paused copy %s (epoch %d) is left "
                    "in place", self, self.incoming_name(), epoch)

    def _watch(self, timeout: float, stall: float, watch: ResumeWatch
               ) -> tuple[int | None, str]:
        """Wait for xl to exit: (its status, "") or (None, why it was given up on). Its
        children are looked at every failover_poll s, its CPU use every 0.5 s."""
        t0 = last_t = next_cpu = time.monotonic()
        last_cpu = -1
        while True:
            watch.observe(_children_cmdlines(self.proc.pid))
            try:
                return self.proc.wait(timeout=self.cfg.failover_poll), ""
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now < next_cpu:
                continue
            next_cpu, cpu = now + 0.5, _tree_cpu(self.proc.pid)
            if cpu != last_cpu:
                last_cpu, last_t = cpu, now
            if now - t0 >= timeout:
                return None, f"did not finish within {timeout:g} s"
            if now - last_t >= stall:
                return None, f"used no CPU for {stall:g} s (of {now - t0:.0f} s)"

    def finish_plain(self, upstream: Upstream, proto: ReceiverSide) -> int:
        """The handshake after a plain stream, relayed between the sender and xl."""
        self._got += self.proto.stream_done()
        self._await("ready message", self.cfg.ready_timeout)
        upstream.write(proto.ready())
        upstream.await_go(proto)
        self.send([self.proto.go()])
        status = self._await("success/failure report", self.cfg.io_timeout)
        assert status is not None
        upstream.write(proto.report(status))
        if status:
            self._got += self.proto.expect_resume_permission()
            self._await("permission for sender to resume", self.cfg.io_timeout)
            upstream.write(proto.resume_permission())
        self._close_input()
        try:
            self.proc.wait(timeout=self.cfg.io_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s still running after the handshake; leaving it", self)
        return status

    def incoming_name(self) -> str:
        return f"{self.domain_name}--incoming" if self.domain_name else "(unknown name)"

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def abort(self, why: str) -> None:
        self._close_input()
        self._kill()
        if self.domain_name:
            # xl died mid-restore: its half-built domain must go (stock xl does the same).
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([self.cfg.xl, "destroy", self.incoming_name()],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30, check=False)


def _children_cmdlines(pid: int) -> list[str]:
    """The command lines of ``pid``'s live children (none if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # it ended meanwhile
    return out


def _tree_cpu(pid: int) -> int:
    """CPU ticks used so far by ``pid`` and its live descendants (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        return 0
    # utime, stime, and the reaped children's cutime, cstime: short-lived hotplug helpers
    return sum(int(x) for x in fields[11:15]) + sum(_tree_cpu(k) for k in kids)


def _describe_tree(pid: int, depth: int = 0) -> list[str]:
    """``pid`` and its descendants: name, state, CPU ticks and what each waits in."""
    proc = f"/proc/{pid}"
    try:
        with open(f"{proc}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"{proc}/comm") as f:
            comm = f.read().strip()
        with open(f"{proc}/wchan") as f:
            wchan = f.read().strip() or "-"
        fds = sorted(os.listdir(f"{proc}/fd"), key=int)
        links = [f"{fd}->{os.readlink(f'{proc}/fd/{fd}')}" for fd in fds[:8]]
    except OSError:
        return []
    state, utime, stime = fields[0], fields[11], fields[12]
    out = [f"{'  ' * depth}pid {pid} ({comm}) state {state} utime {utime} stime {stime} "
           f"wchan {wchan} fds {' '.join(links)}"]
    try:
        with open(f"{proc}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for kid in kids:
        out += _describe_tree(kid, depth + 1)
    return out

