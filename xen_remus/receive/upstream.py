"""The sender's side of the receive: its two pipes (the stream and GO in, the handshake
out) and, with a xen-remus sender, the heartbeats on the way back."""

from __future__ import annotations

import logging
import os
import time

from xen_remus.channel.link import ReceiverLink
from xen_remus.fdio import READ_SIZE, IoTimeout, read_some, readable, write_all
from xen_remus.restore_continuous import ReceiveError
from xen_remus.xlproto import ReceiverSide

log = logging.getLogger("xen_remus.receive")

INITIAL_GRACE_S = 30.0  # silence allowed before the first committed epoch


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

    def read_beating(self, link: ReceiverLink, armed: bool) -> bytes:
        """The next chunk, with ``link`` sending heartbeats (its thread does while the
        caller is busy elsewhere); b"" (fail over) once the primary was silent past the
        heartbeat timeout or ``idle_timeout``. Only here is the primary declared dead,
        and only after looking for pending input first (our own stall is no silence).
        Before the first committed epoch (not ``armed``: nothing to fail over to, and
        dom0s stall while domains are built) the timeout is INITIAL_GRACE_S longer."""
        last = time.monotonic()
        while True:
            # Input already here (we were busy, not the primary silent): take it first.
            chunk = self.read_ready() if readable(self.rfd) else None
            if chunk is not None:
                link.seen(time.monotonic())
                return chunk
            dead = link.tick()
            det = link.chan.detector
            if dead and not armed and det is not None:
                dead = det.silence(time.monotonic()) > det.timeout + INITIAL_GRACE_S
            if dead:
                return self.lost("no word from the primary for more than the heartbeat "
                                 "timeout")
            wait = link.timeout()
            if not armed and wait is not None:
                wait = max(wait, 0.05)  # in the grace the deadline has passed: do not spin
            if self.idle_timeout is not None:
                left = last + self.idle_timeout - time.monotonic()
                if left <= 0:
                    return self.lost(f"no data from the sender for {self.idle_timeout:g} s")
                wait = left if wait is None else min(wait, left)
            chunk = self.read_within(wait)
            if chunk is not None:
                link.seen(time.monotonic())
                return chunk

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
