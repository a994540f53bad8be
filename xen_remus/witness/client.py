"""Reaching a witness: over TCP or a Unix socket (``--witness ADDR``), or through a
command whose stdin/stdout is the stream (``--witness-via CMD``, as ssh's -s: e.g.
`socat - /dev/virtio-ports/xen-remus.witness`). Blocking, every call bounded in time.

The connection (and the command) is kept between calls and opened again after any
failure; a new connection starts a new session (proto.py), so whatever a broken one left
in the stream is skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from xen_remus.errors import XenRemusError
from xen_remus.fdio import IoTimeout, read_some, write_all
from xen_remus.witness import proto as P
from xen_remus.witness.address import Address

CALL_TIMEOUT_S = 5.0


class WitnessUnreachable(XenRemusError):
    """No answer from the witness in time (names it and why): nothing was decided here."""


class WitnessClient:
    """One host's connection to the witness; ``call`` is thread-safe (one at a time)."""

    def __init__(self, key: bytes, address: Address | None = None, via: str | None = None,
                 timeout: float = CALL_TIMEOUT_S,
                 opener: Callable[[float], socket.socket] | None = None) -> None:
        """``address`` (TCP, Unix), ``via`` (a command), or ``opener`` (given the
        deadline, a connected socket: a socketpair in tests)."""
        assert [address, via, opener].count(None) == 2, "one way to reach the witness"
        self.key, self.address, self.via, self.timeout = key, address, via, timeout
        self.opener = opener if opener is not None else self._connect
        self.what = (f"`{via}`" if via is not None else str(address) if address is not None
                     else "(socket)")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._fds: tuple[int, int] | None = None  # read, write
        self._session: P.ClientSession | None = None

    def call(self, req: P.Request, timeout: float | None = None) -> P.Response:
        """The witness's answer to ``req``; WitnessUnreachable if none came within
        ``timeout`` (default: the client's) for whatever reason."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            while True:
                # A kept connection may have died since (the command, the witness
                # restarted): one more try on a new one. Every request may come twice.
                reused = self._session is not None and self._session.ready
                try:
                    return self._call(req, deadline)
                except (OSError, IoTimeout, P.WitnessProtocolError,
                        WitnessUnreachable) as exc:
                    self._close()
                    if not reused or isinstance(exc, IoTimeout):
                        raise WitnessUnreachable(f"witness {self.what}: {req}: {exc}"
                                                 ) from None

    def _call(self, req: P.Request, deadline: float) -> P.Response:
        if self._session is None or not self._session.ready:
            self._open(deadline)
        assert self._session is not None
        self._write(self._session.request(req), deadline)
        while True:
            answers = self._session.receive(self._read(deadline, "its answer"))
            if answers:
                return answers[0]

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- the connection -----------------------------------------------------------------
    def _open(self, deadline: float) -> None:
        self._close()
        if self.via is not None:
            # Own session: the whole command goes when we close it (an ssh under a shell).
            self._proc = subprocess.Popen(self.via, shell=True, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=sys.stderr.fileno(),
                                          start_new_session=True)
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._fds = (self._proc.stdout.fileno(), self._proc.stdin.fileno())
        else:
            self._sock = sock = self.opener(deadline)
            sock.setblocking(False)
            self._fds = (sock.fileno(), sock.fileno())
        self._session = P.ClientSession(self.key)
        self._write(self._session.hello(), deadline)
        while not self._session.ready:
            self._session.receive(self._read(deadline, "its WELCOME"))

    def _connect(self, deadline: float) -> socket.socket:
        assert self.address is not None
        a = self.address
        sock = (socket.socket(socket.AF_UNIX) if a.unix is not None
                else socket.socket(_family(a.host)))
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sock.connect(a.unix if a.unix is not None else (a.host, a.port))
        except TimeoutError:
            sock.close()
            raise IoTimeout("the connection") from None
        except OSError:
            sock.close()
            raise
        return sock

    def _write(self, data: bytes, deadline: float) -> None:
        assert self._fds is not None
        write_all(self._fds[1], [data], max(0.0, deadline - time.monotonic()),
                  f"witness {self.what} to take a frame")

    def _read(self, deadline: float, what: str) -> bytes:
        assert self._fds is not None
        data = read_some(self._fds[0], max(0.0, deadline - time.monotonic()), what)
        if not data:
            raise WitnessUnreachable("the connection closed")
        return data

    def _close(self) -> None:
        self._session, self._fds = None, None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
