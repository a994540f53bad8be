"""The sender's end of xl's migration transport: `ssh HOST xl migrate-receive` (or the
-s command) as a child whose stdin carries the stream and whose stdout carries the
receiver's handshake messages (tools/xl/xl.h; each is sent with its trailing NUL)."""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import time

from xen_remus.errors import XenRemusError

BANNER = b"xl migration receiver ready, send binary domain data.\n\0"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"


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
    """The child process running the receiver."""

    def __init__(self, rune: str) -> None:
        self.rune = rune
        self.proc = subprocess.Popen(["/bin/sh", "-c", rune], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send_fd = self.proc.stdin.fileno()
        self.recv_fd = self.proc.stdout.fileno()

    def expect(self, msg: bytes, what: str, timeout: float) -> None:
        got = self.read_exactly(len(msg), what, timeout)
        if got != msg:
            want = msg.rstrip(b"\0")
            raise MigrationRefused(f"receiver `{self.rune}`: expected the {what} "
                                   f"{want!r}, got {got!r}")

    def read_exactly(self, n: int, what: str, timeout: float) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.recv_fd], [], [], left)[0]:
                raise MigrationRefused(f"receiver `{self.rune}`: no {what} within "
                                       f"{timeout:.0f} s (got {buf!r})")
            chunk = os.read(self.recv_fd, n - len(buf))
            if not chunk:
                rc = self.proc.poll()
                raise MigrationRefused(f"receiver `{self.rune}` closed the connection before "
                                       f"the {what} (got {buf!r}; exit status {rc})")
            buf += chunk
        return buf

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
