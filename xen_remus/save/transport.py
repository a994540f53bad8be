"""The sender's end of xl's migration transport: `ssh HOST xl migrate-receive` (or the
-s command) as a child whose stdin carries the stream and whose stdout carries the
receiver's handshake messages (parsed by xen_remus.xlproto.SenderSide)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time

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


class ReceiverProcess:
    """The child process running the receiver (ssh HOST xl migrate-receive, or -s CMD)."""

    def __init__(self, rune: str) -> None:
        self.rune = rune
        self.proc = subprocess.Popen(["/bin/sh", "-c", rune], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send_fd = self.proc.stdin.fileno()
        self.recv_fd = self.proc.stdout.fileno()

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
                rc = self.proc.poll()
                try:
                    proto.eof()
                except XenRemusError as exc:
                    raise MigrationRefused(f"receiver `{self.rune}` closed the connection "
                                           f"before the {what} (exit status {rc}): {exc}"
                                           ) from None
                raise MigrationRefused(f"receiver `{self.rune}` closed the connection before "
                                       f"the {what} (exit status {rc})")
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
        """Close our ends and wait (bounded) for the child; kill it if it lingers."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
