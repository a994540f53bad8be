"""The sender's end of xl's migration transport: `ssh HOST xl migrate-receive` (or the
-s command) as a child whose stdin carries the stream and whose stdout carries the
receiver's handshake messages (parsed by xen_remus.xlproto.SenderSide); or, with --tcp,
an authenticated connection to `xen-remus migrate-receive --listen` (direct/conn.py)
carrying both."""

from __future__ import annotations

import os
import shlex
import subprocess
import time

from xen_remus.direct.conn import Connection
from xen_remus.errors import XenRemusError
from xen_remus.fdio import IoTimeout, read_some
from xen_remus.xlproto import HandshakeError, Message, SenderSide


class MigrationRefused(XenRemusError):
    """The receiving side did not answer as xl migrate-receive does."""


def receiver_command(host: str, ssh: str | None, extra: list[str]) -> str:
    """xl's rune: `exec ssh HOST xl migrate-receive`; -s CMD replaces ssh; -s '' means HOST
    is itself the command."""
    if ssh == "":
        return host
    args = " ".join(shlex.quote(a) for a in extra)
    return f"exec {ssh or 'ssh'} {host} xl migrate-receive{' ' + args if args else ''}"


class Receiver:
    """The receiver as the sender sees it: ``send_fd`` for the stream, ``recv_fd`` for
    its answers; ``rune`` names it in errors."""

    rune: str
    send_fd: int
    recv_fd: int

    def _status(self) -> str:
        """What became of the receiver, for an error after its end closed."""
        return ""

    def await_message(self, proto: SenderSide, what: str, timeout: float) -> Message:
        """Read until ``proto`` recognises the next expected message (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = read_some(self.recv_fd, deadline - time.monotonic(), what, 4096)
            except IoTimeout:
                raise MigrationRefused(f"receiver `{self.rune}`: no {what} within "
                                       f"{timeout:.0f} s") from None
            if not chunk:
                rc = self._status()
                try:
                    proto.eof()
                except XenRemusError as exc:
                    raise MigrationRefused(f"receiver `{self.rune}` closed the connection "
                                           f"before the {what}{rc}: {exc}") from None
                raise MigrationRefused(f"receiver `{self.rune}` closed the connection before "
                                       f"the {what}{rc}")
            try:
                msgs = proto.feed(chunk)
            except HandshakeError as exc:
                raise MigrationRefused(f"receiver `{self.rune}`: {exc}") from None
            if msgs:
                return msgs[0]

    def send(self, msg: bytes) -> None:
        try:
            os.write(self.send_fd, msg)
        except OSError as exc:
            raise MigrationRefused(f"receiver `{self.rune}`: sending failed: errno "
                                   f"{exc.errno}") from None

    def close(self, timeout: float = 30.0) -> int | None:
        """Close our end; the receiver's exit status if known."""
        raise NotImplementedError

    def detach(self) -> None:
        """Close our end and leave the receiver to finish on its own (a handover: it
        resumes the guest later, and must keep its transport until then)."""
        self.close(0)


class ReceiverProcess(Receiver):
    """The child process running the receiver (ssh HOST xl migrate-receive, or -s CMD)."""

    def __init__(self, rune: str) -> None:
        self.rune = rune
        self.proc = subprocess.Popen(["/bin/sh", "-c", rune], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send_fd = self.proc.stdin.fileno()
        self.recv_fd = self.proc.stdout.fileno()

    def _status(self) -> str:
        return f" (exit status {self.proc.poll()})"

    def close(self, timeout: float = 30.0) -> int | None:
        """Close our ends and wait (bounded) for the child; kill it if it lingers."""
        self.detach()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def detach(self) -> None:
        """Close our pipe ends, neither wait nor kill: ssh lives on (reparented when we
        exit) until the receiver exits, carrying its stderr (and xl's) meanwhile."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class DirectReceiver(Receiver):
    """The receiver behind an authenticated direct connection (--tcp): one socket for
    the stream and the answers."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.rune = f"tcp {conn.peer}"
        self.send_fd = self.recv_fd = conn.sock.fileno()
        self.closed = False

    def close(self, timeout: float = 30.0) -> int | None:
        """Close the connection (the receiver sees the stream end); idempotent."""
        if not self.closed:
            self.closed = True
            self.conn.close()
        return None
