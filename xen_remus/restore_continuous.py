"""The receiver: decode the incoming stream, commit whole epochs to a sink, fail over.

Sink choice. Committed epochs are relayed, byte for byte, as a standard checkpointed
stream into stock `xl migrate-receive -r` on this host (XlSink below). Why not
libxl-save-helper directly: its argv and callback protocol are libxl-internal (they
carry xenstore/console event channels that libxl allocates while building the domain),
so driving it means re-implementing libxl's domain build; xl does that, and takes the
same stream we already have. Why not materialise the guest ourselves: a later fallback,
if stock restore cannot be made reliable (see below).

Why stock failover hangs and why ours should not (LAB-NOTES item 11). libxl reads a
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

Memory: the initial full copy (epoch 0) streams through — there is nothing to fail
over to before it completes; every later epoch is held whole (one in flight) under
`max_epoch_bytes`, and only a whole, fully validated epoch reaches the sink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xen_remus.channel.ends import ReceiverChannel
from xen_remus.channel.errors import ChannelError, CompressionError
from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.stats import StatusFile
from xen_remus.errors import XenRemusError
from xen_remus.stream import Decoder, EpochEnd, Record, StreamEnd, StreamError
from xen_remus.stream.events import Buffer, Event, XlHeader
from xen_remus.xlproto import Message, ReceiverSide, SenderSide

log = logging.getLogger("xen_remus.receive")

DEFAULT_MAX_EPOCH_BYTES = 512 << 20


class ReceiveError(XenRemusError):
    """The receive failed and no guest was resumed here."""


class EpochTooLarge(XenRemusError):
    """An epoch outgrew the ceiling before its end."""

    def __init__(self, epoch: int, held: int, ceiling: int, offset: int) -> None:
        super().__init__(f"epoch {epoch}: {held} bytes buffered at offset {offset} exceed "
                         f"the ceiling of {ceiling} bytes (--max-epoch-mib)")
        self.epoch, self.offset = epoch, offset


# What makes the epoch in flight unusable (the stream's own errors aside): too big, or one
# of our channel records (compressed pages, stats) that does not decode.
BAD_EPOCH = (EpochTooLarge, ChannelError, CompressionError)


class Sink(Protocol):
    """Where committed bytes go. ``send`` gets whole validated units only."""

    def send(self, bufs: Sequence[Buffer]) -> None: ...

    def committed(self, epoch: int) -> None: ...

    def failover(self, epoch: int) -> None:
        """End the stream at the boundary after ``epoch`` and resume the guest there;
        returns once it runs, raises (bounded in time) if it does not."""

    def abort(self, why: str) -> None:
        """Nothing to resume: tear the partial copy down."""


@dataclass
class Outcome:
    """How a receive ended: ``complete`` (plain END) or ``failover`` (from ``epoch``)."""

    kind: str
    epoch: int | None = None
    offset: int = 0
    reason: str = ""
    seconds: float = 0.0
    error: XenRemusError | None = None


class Receiver:
    """Feed it the sender's bytes; it forwards whole epochs to ``sink``.

    ``feed`` returns None while the stream goes on, or the Outcome once it ended; bytes
    after the stream (the sender's GO) are left in ``trailing``.
    """

    def __init__(self, sink: Sink, checkpointed: bool,
                 max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES) -> None:
        self.sink = sink
        self.checkpointed = checkpointed
        self.max_epoch_bytes = max_epoch_bytes
        self.dec = Decoder(fmt=None, checkpointed=True if checkpointed else False)
        self.committed: int | None = None  # last epoch the sink has whole
        self.offset = 0  # bytes received
        self.trailing = b""
        self.outcome: Outcome | None = None
        self._held: list[Buffer] = []
        self._held_bytes = 0
        self._committed_end = 0  # stream offset just past the last whole epoch
        self.on_header: Callable[[XlHeader], None] | None = None  # sees the config first
        self.rewrite: Callable[[Record], Sequence[Buffer] | None] | None = None
        self.on_commit: Callable[[int], None] | None = None  # the sink has the epoch whole
        self._eof_why = "EOF"  # what ended the input, for the failover's log line

    @property
    def streaming(self) -> bool:
        """Initial copy (or a plain stream): records go straight to the sink."""
        return self.committed is None

    def feed(self, data: bytes) -> Outcome | None:
        if self.outcome is not None:
            raise ReceiveError("data fed after the stream ended")
        start = self.offset
        self.offset += len(data)
        try:
            events = self.dec.feed(data)
        except StreamError as exc:
            end = next((e for e in exc.events if isinstance(e, StreamEnd)), None)
            try:
                self._take(exc.events)
            except BAD_EPOCH as bad:
                return self._broken(bad, eof=False)
            if end is not None and self.outcome is not None:
                # Bytes after the final END: the handshake that follows the stream.
                self.trailing = data[end.offset - start:]
                return self.outcome
            return self._broken(exc, eof=not data)
        if not events:  # a chunk in the middle of a record
            return None
        try:
            self._take(events)
        except BAD_EPOCH as exc:
            return self._broken(exc, eof=False)
        return self.outcome

    def eof(self, why: str | None = None) -> Outcome:
        """The input ended; ``why`` (e.g. a heartbeat timeout) goes into the log line."""
        if why:
            self._eof_why = why
        out = self.feed(b"") if self.outcome is None else self.outcome
        assert out is not None  # EOF always ends the stream one way or another
        return out

    def _take(self, events: Sequence[Event]) -> None:
        through: list[Buffer] = []
        for ev in events:
            if isinstance(ev, XlHeader) and self.on_header is not None:
                self.on_header(ev)
            if isinstance(ev, StreamEnd):
                self._flush(through)
                if ev.complete:
                    self._commit_held()
                    self.outcome = Outcome("complete", self.committed, ev.offset)
                else:
                    self._failover(f"stream ended at offset {ev.offset} ({self._eof_why} "
                                   "at an epoch boundary)", None)
                return
            bufs = self._bufs(ev)
            if self.streaming:
                through += bufs
                if isinstance(ev, EpochEnd):
                    self._flush(through)
                    self._set_committed(ev.epoch, ev.offset)
                continue
            if bufs:
                self._held += bufs
                self._held_bytes += sum(len(b) for b in bufs)
                if self._held_bytes > self.max_epoch_bytes:
                    raise EpochTooLarge(ev.epoch, self._held_bytes, self.max_epoch_bytes,
                                        ev.offset)
            if isinstance(ev, EpochEnd):
                self._commit_held()
                self._set_committed(ev.epoch, ev.offset)
        self._flush(through)

    def _bufs(self, ev: Event) -> list[Buffer]:
        """What goes to the sink for ``ev``: its wire bytes, or what ``rewrite`` (the
        xen-remus channel: our records vanish, compressed pages become PAGE_DATA) returns."""
        if self.rewrite is not None and isinstance(ev, Record):
            rep = self.rewrite(ev)
            if rep is not None:
                return [b for b in rep if len(b)]
        return [ev.wire] if len(ev.wire) else []

    def _flush(self, through: list[Buffer]) -> None:
        if through:
            self.sink.send(through)
            through.clear()

    def _commit_held(self) -> None:
        if self._held:
            self.sink.send(self._held)
        self._held, self._held_bytes = [], 0

    def _set_committed(self, epoch: int, end: int) -> None:
        self.committed, self._committed_end = epoch, end
        self.sink.committed(epoch)
        if self.on_commit is not None:
            self.on_commit(epoch)

    def _broken(self, exc: XenRemusError, eof: bool) -> Outcome:
        if not self.checkpointed or self.committed is None:
            why = (f"stream broken before any complete epoch: {exc}" if self.checkpointed
                   else f"stream broken, the guest was not received: {exc}")
            self.sink.abort(why)
            self.outcome = Outcome("aborted", None, self.offset, why, error=exc)
            raise ReceiveError(why) from exc
        # EOF mid-epoch is the primary dying mid-send: a normal failover, no error.
        kind = f"{self._eof_why} mid-epoch" if eof else "invalid stream"
        self._failover(f"{kind}: {exc}", None if eof else exc)
        assert self.outcome is not None
        return self.outcome

    def _failover(self, reason: str, error: XenRemusError | None) -> None:
        epoch = self.committed
        if epoch is None:
            why = f"{reason}; no complete epoch to resume from"
            self.sink.abort(why)
            self.outcome = Outcome("aborted", None, self.offset, why, error=error)
            raise ReceiveError(why)
        partial = self.offset - self._committed_end
        if partial:
            log.warning("failover: discarding partial epoch %d (%d bytes from offset %d)",
                        epoch + 1, partial, self._committed_end)
        self._held, self._held_bytes = [], 0
        log.warning("failover: %s; resuming from epoch %d", reason, epoch)
        t0 = time.monotonic()
        self.sink.failover(epoch)
        secs = time.monotonic() - t0
        log.warning("failover: guest resumed from epoch %d in %.3f s", epoch, secs)
        self.outcome = Outcome("failover", epoch, self.offset, reason, secs, error)


# -- I/O: bounded reads and writes on pipes ---------------------------------------------

def _wait_fd(fd: int, events: int, deadline: float | None, what: str) -> None:
    """Block until ``fd`` is ready, or raise once ``deadline`` (monotonic) has passed."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise IoTimeout(what)
        if poller.poll(None if left is None else max(1, int(left * 1000))):
            return


class IoTimeout(XenRemusError):
    def __init__(self, what: str) -> None:
        super().__init__(f"timed out waiting for {what}")


def write_all(fd: int, bufs: Sequence[Buffer], timeout: float | None, what: str) -> None:
    """writev every byte of ``bufs`` to ``fd`` (blocking or not), within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    i = 0
    while i < len(views):
        _wait_fd(fd, select.POLLOUT, deadline, what)
        try:
            n = os.writev(fd, views[i:i + 1024])  # IOV_MAX
        except BlockingIOError:
            continue
        while n and i < len(views):
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


# At most this much per read: a pipe holds 64 KiB by default, and glibc serves a request
# above its mmap threshold (128 KiB by default) with mmap, so os.read(fd, 1 MiB) of a pipe
# holding 8 KiB (socat's blocks) costs an mmap, an mremap and a munmap each time (in a
# fresh process: 37 us a read against 2 us for a 64 KiB request).
READ_SIZE = 64 << 10


def read_some(fd: int, timeout: float | None, what: str, size: int = READ_SIZE) -> bytes:
    deadline = None if timeout is None else time.monotonic() + timeout
    _wait_fd(fd, select.POLLIN, deadline, what)
    return os.read(fd, size)


# -- the sink: stock `xl migrate-receive` on this host -----------------------------------

@dataclass
class SinkConfig:
    xl: str = "xl"
    remus: bool = False
    no_daemon: bool = False  # -e
    io_timeout: float = 60.0  # the sink must take each write / send each message
    ready_timeout: float = 600.0  # plain stream: restore may take a while after END
    # The watchdog. Failover runs the device hotplug scripts, which take 20-40 s under
    # TCG (lab run 30450: vif-bridge still busy at 30 s): kill xl only when its process
    # tree has used no CPU for failover_stall s, or after failover_timeout s in all.
    failover_timeout: float = 300.0
    failover_stall: float = 30.0


class XlSink:
    """Relays to `xl migrate-receive [-r] [-e]`: we are its sender, it builds the guest."""

    def __init__(self, cfg: SinkConfig) -> None:
        self.cfg = cfg
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

    def _what(self) -> str:
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
                                 f"the {name} from {self._what()}", 4096)
            except IoTimeout as exc:
                raise ReceiveError(str(exc)) from None
            if not data:
                self.proto.eof()
            self._got += self.proto.feed(data)

    def send(self, bufs: Sequence[Buffer]) -> None:
        try:
            write_all(self._in, bufs, self.cfg.io_timeout, f"{self._what()} to take data")
        except BrokenPipeError:
            rc = self.proc.wait(timeout=self.cfg.io_timeout)
            raise ReceiveError(f"{self._what()} exited (status {rc}) while receiving") from None
        except IoTimeout as exc:
            raise ReceiveError(str(exc)) from None

    def committed(self, epoch: int) -> None:
        log.debug("epoch %d committed to %s", epoch, self._what())

    def _close_input(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def failover(self, epoch: int) -> None:
        self._close_input()
        rc, why = self._watch(self.cfg.failover_timeout, self.cfg.failover_stall)
        if rc is None:
            for line in _describe_tree(self.proc.pid):  # evidence of where stock hangs
                log.warning("watchdog: %s", line)
            self._kill()
            raise ReceiveError(
                f"failover from epoch {epoch}: {self._what()} {why} (the stock libxl "
                f"failover hang); killed it, its paused copy {self.incoming_name()} is "
                "left for inspection")
        if rc != 0:
            raise ReceiveError(f"failover from epoch {epoch}: {self._what()} exited "
                               f"with status {rc}")

    def _watch(self, timeout: float, stall: float) -> tuple[int | None, str]:
        """Wait for xl to exit: (its status, "") or (None, why it was given up on)."""
        t0 = last_t = time.monotonic()
        last_cpu = -1
        while True:
            try:
                return self.proc.wait(timeout=0.5), ""
            except subprocess.TimeoutExpired:
                pass
            now, cpu = time.monotonic(), _tree_cpu(self.proc.pid)
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
            log.warning("%s still running after the handshake; leaving it", self._what())
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


# -- the driver: our sender side of the pipes ---------------------------------------------

class Upstream:
    """The sender's two pipes: the stream (and GO) in, the handshake out."""

    def __init__(self, rfd: int, wfd: int, idle_timeout: float | None,
                 io_timeout: float = 60.0) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.pending = b""
        self.gone: str | None = None  # why a read returned b"" other than plain EOF

    def lost(self, why: str) -> bytes:
        log.warning("%s: treating the sender as gone", why)
        self.gone = why
        return b""

    def write(self, data: bytes) -> None:
        try:
            write_all(self.wfd, [data], self.io_timeout, "the sender to read")
        except (BrokenPipeError, IoTimeout) as exc:
            raise ReceiveError(f"cannot answer the sender: {exc}") from None

    def read(self) -> bytes:
        """The next chunk of the stream; b"" at EOF, read error or idle timeout (the
        sender is gone either way: fail over)."""
        try:
            return read_some(self.rfd, self.idle_timeout, "the sender")
        except IoTimeout:
            return self.lost(f"no data from the sender for {self.idle_timeout or 0:g} s")
        except OSError as exc:
            return self.lost(f"reading the stream: {exc}")

    def read_ready(self) -> bytes:
        """Like read, for when poll/select has just said the stream is readable."""
        try:
            return os.read(self.rfd, READ_SIZE)
        except OSError as exc:
            return self.lost(f"reading the stream: {exc}")

    def read_within(self, timeout: float | None) -> bytes | None:
        """Like read, but None if nothing came within ``timeout`` (time to heartbeat)."""
        try:
            return read_some(self.rfd, timeout, "the sender")
        except IoTimeout:
            return None
        except OSError as exc:
            return self.lost(f"reading the stream: {exc}")

    def await_go(self, proto: ReceiverSide) -> None:
        data, self.pending = self.pending, b""
        deadline = time.monotonic() + self.io_timeout
        while True:
            if data and any(m.name == "GO message" for m in proto.feed(data)):
                return
            try:
                data = read_some(self.rfd, deadline - time.monotonic(), "the sender's GO")
            except IoTimeout as exc:
                raise ReceiveError(str(exc)) from None
            if not data:
                proto.eof()


def receive(upstream: Upstream, sink: XlSink, checkpointed: bool,
            max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
            chan: ReceiverChannel | None = None) -> Outcome:
    """Run one receive to its end: banner, stream, then the handshake or the failover.
    With ``chan`` (checkpointed only) the offer follows the banner; if a xen-remus
    sender accepts, each committed epoch is ACKed and a silent primary is failed over
    from after the agreed heartbeat timeout."""
    proto = ReceiverSide()
    rx = Receiver(sink, checkpointed, max_epoch_bytes)
    link = _Beating(ReceiverLink(chan, upstream.wfd)) if chan is not None else None
    bstatus: StatusFile | None = None  # ours: the backup's status file
    if chan is not None and link is not None:
        rx.rewrite = chan.on_record

        def committed(epoch: int) -> None:
            link.committed(epoch)
            if bstatus is not None:  # `xen-remus status` on the backup: the primary's figures
                for st in chan.take_stats():
                    bstatus.epoch(st)
                bstatus.doc["committed"] = epoch
                bstatus.write()

        rx.on_commit = committed
    upstream.write(proto.banner() + (chan.offer_line() if chan is not None else b""))
    log.info("ready to receive (%s stream) into %s",
             "checkpointed" if checkpointed else "plain", sink._what())
    def on_header(hdr: XlHeader) -> None:
        nonlocal bstatus
        sink.domain_name = _domain_name(hdr)
        if chan is not None and sink.domain_name:
            bstatus = StatusFile(sink.domain_name, "backup")
            bstatus.state("receiving", "initial copy")

    rx.on_header = on_header
    out: Outcome | None = None
    t0 = time.monotonic()
    try:
        while out is None:
            chunk = upstream.read() if link is None else _read_beating(
                upstream, link, armed=rx.committed is not None)
            out = rx.feed(chunk) if chunk else rx.eof(upstream.gone)
    finally:
        if link is not None:
            link.stop()
    if bstatus is not None:
        bstatus.state(out.kind, out.reason)
    if out.kind == "complete":
        log.info("stream complete: %d bytes, %d epochs, %.2f s", out.offset,
                 (out.epoch or 0) + 1 if rx.dec.checkpointed else 1, time.monotonic() - t0)
        upstream.pending = rx.trailing
        status = sink.finish_plain(upstream, proto)
        if status:
            raise ReceiveError(f"xl migrate-receive reported startup failure (status "
                               f"{status}); the sender was given the domain back")
    return out


class _Beating:
    """The ReceiverLink with a thread that sends heartbeats when due, so that a sink slow
    to take an epoch (xl builds the domain before it reads on; TCG) or a long decode does
    not look like a dead backup to the primary. Only the main loop declares the primary
    dead, and only after looking for pending input first (our own stall is no silence)."""

    def __init__(self, link: ReceiverLink) -> None:
        self.link, self.chan = link, link.chan
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="xen-remus heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                self.link.tick()

    def tick(self) -> bool:
        with self._lock:
            return self.link.tick()

    def committed(self, epoch: int) -> None:
        with self._lock:
            self.link.committed(epoch)

    def timeout(self) -> float | None:
        with self._lock:
            return self.link.timeout()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


INITIAL_GRACE_S = 30.0  # silence allowed before the first committed epoch


def _read_beating(upstream: Upstream, link: _Beating, armed: bool) -> bytes:
    """The next chunk, sending heartbeats while waiting; b"" (fail over) once the
    primary was silent past the heartbeat timeout or ``idle_timeout``. Before the first
    committed epoch (not ``armed``: nothing to fail over to, and dom0s stall while
    domains are built) the timeout is INITIAL_GRACE_S longer."""
    last = time.monotonic()
    while True:
        # Input already here (we were busy, not the primary silent): take it first.
        chunk = upstream.read_ready() if select.select([upstream.rfd], [], [], 0)[0] else None
        if chunk is not None:
            with link._lock:
                link.chan.seen(time.monotonic())
            return chunk
        dead = link.tick()
        det = link.chan.detector
        if dead and not armed and det is not None:
            dead = det.silence(time.monotonic()) > det.timeout + INITIAL_GRACE_S
        if dead:
            return upstream.lost("no word from the primary for more than the heartbeat "
                                  "timeout")
        wait = link.timeout()
        if not armed and wait is not None:
            wait = max(wait, 0.05)  # in the grace the deadline has passed: do not spin
        if upstream.idle_timeout is not None:
            left = last + upstream.idle_timeout - time.monotonic()
            if left <= 0:
                return upstream.lost(f"no data from the sender for {upstream.idle_timeout:g} s")
            wait = left if wait is None else min(wait, left)
        chunk = upstream.read_within(wait)
        if chunk is not None:
            with link._lock:
                link.chan.seen(time.monotonic())
            return chunk


def _domain_name(hdr: XlHeader) -> str | None:
    """The guest's name from the JSON config in the xl header (libxl_domain_config)."""
    try:
        return str(hdr.config_json()["c_info"]["name"])
    except (TypeError, KeyError, ValueError):
        return None
