"""The direct transport's sockets: connect and authenticate (the primary), listen and
authenticate each peer before anything else (the backup). After the handshake the socket
is a plain blocking byte stream, both ways: what the ssh pipe carried (xl's banner and
handshake, the migration stream, the channel's back frames)."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from xen_remus.direct import handshake as H
from xen_remus.direct.handshake import HandshakeRefused
from xen_remus.errors import UsageError, XenRemusError

log = logging.getLogger("xen_remus.direct")

HANDSHAKE_TIMEOUT_S = 10.0  # the listener's bound on one peer's handshake
# The primary's: room for one peer ahead of it, which the listener serves first.
CONNECT_HANDSHAKE_TIMEOUT_S = 2 * HANDSHAKE_TIMEOUT_S
# As the lab's receivers (lab/dom0tools/ka_exec.py): an idle connection to a host that
# lost power errors out within ~5 s instead of never (a stock receiver's only detector).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 2, 1, 3


class ConnectFailed(XenRemusError):
    """The backup's listener could not be reached."""


@dataclass
class Connection:
    """An authenticated connection: ``session_key`` is the control frames' MAC key."""

    sock: socket.socket
    peer: str  # host:port of the other end
    session_key: bytes

    def close(self) -> None:
        self.sock.close()


def tune(sock: socket.socket) -> None:
    """Keepalive (above) and no Nagle delay: an ACK or a heartbeat is a small write that
    must not wait for the previous one's acknowledgement."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _name(addr: tuple[object, ...]) -> str:
    host, port = str(addr[0]), addr[1]
    if host.startswith("::ffff:") and "." in host:  # IPv4 on a dual-stack listener
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _recv(sock: socket.socket, n: int, deadline: float, timeout: float, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise HandshakeRefused(f"no {what} within {timeout:g} s (got {len(buf)} of {n} "
                                   "bytes): handshake timeout") from None
        except OSError as exc:
            raise HandshakeRefused(f"reading the {what}: {exc.strerror or exc}") from None
        if not chunk:
            raise HandshakeRefused(f"the connection closed during the {what} (after "
                                   f"{len(buf)} of {n} bytes)")
        buf += chunk
    return buf


def _send(sock: socket.socket, data: bytes, deadline: float, what: str) -> None:
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(data)
    except OSError as exc:  # TimeoutError too
        raise HandshakeRefused(f"sending the {what}: {exc.strerror or exc}") from None


def authenticate_primary(sock: socket.socket, key: bytes, timeout: float) -> bytes:
    """The primary's handshake on a connected ``sock``; the session key, or
    HandshakeRefused (the caller drops the connection). Leaves ``sock`` blocking."""
    deadline = time.monotonic() + timeout
    hs = H.Primary(key)
    _send(sock, hs.hello(), deadline, "hello")
    finish, err = hs.finish(_recv(sock, H.BACKUP_HELLO_SIZE, deadline, timeout,
                                  "hello of the backup"))
    _send(sock, finish, deadline, "finish")
    if err is not None:
        raise err
    skey = hs.verdict(_recv(sock, H.VERDICT_SIZE, deadline, timeout, "backup's verdict"))
    sock.settimeout(None)
    return skey


def authenticate_backup(sock: socket.socket, key: bytes, timeout: float) -> bytes:
    """The backup's handshake on an accepted ``sock``: as authenticate_primary."""
    deadline = time.monotonic() + timeout
    hs = H.Backup(key)
    hello = hs.hello(_recv(sock, H.PRIMARY_HELLO_SIZE, deadline, timeout, "peer's hello"))
    _send(sock, hello, deadline, "hello")
    verdict, err = hs.verdict(_recv(sock, H.FINISH_SIZE, deadline, timeout,
                                    "peer's finish"))
    _send(sock, verdict, deadline, "verdict")
    if err is not None:
        raise err
    assert hs.session_key is not None
    sock.settimeout(None)
    return hs.session_key


def connect(host: str, port: int, key: bytes, connect_timeout: float,
            timeout: float = CONNECT_HANDSHAKE_TIMEOUT_S) -> Connection:
    """Connect to the listener on ``host``:``port`` and authenticate both ends;
    ConnectFailed or HandshakeRefused (naming the address) otherwise."""
    where = _name((host, port))
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise ConnectFailed(f"direct transport to {where}: cannot connect: "
                            f"{exc.strerror or exc}") from None
    try:
        tune(sock)
        skey = authenticate_primary(sock, key, timeout)
    except HandshakeRefused as exc:
        sock.close()
        raise HandshakeRefused(f"direct transport to {where}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return Connection(sock, where, skey)


def listen_address(text: str) -> tuple[str, int]:
    """``--listen [HOST:]PORT`` (``[v6]:PORT``) as (host, port); host "" listens on
    every address, port 0 on one the kernel picks (the listener says which)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) < 65536 or (sep and ":" in host and
                                                              not text.startswith("[")):
        raise UsageError(f"--listen {text}: expected [HOST:]PORT (a TCP address; "
                         "[v6]:PORT for IPv6)")
    return host, int(port)


class Listener:
    """A TCP listener that hands out authenticated connections, one at a time: a peer
    is served (its handshake bounded by ``timeout``) before the next is accepted."""

    def __init__(self, host: str, port: int, key: bytes,
                 timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.key, self.timeout = key, timeout
        v6 = ":" in host or not host and socket.has_dualstack_ipv6()
        try:
            self.sock = socket.create_server(
                (host, port), family=socket.AF_INET6 if v6 else socket.AF_INET,
                backlog=4, dualstack_ipv6=v6 and not host)
        except OSError as exc:
            raise UsageError(f"--listen {_name((host or '*', port))}: "
                             f"{exc.strerror or exc}") from None
        self.address = _name(self.sock.getsockname())
        self.port: int = self.sock.getsockname()[1]
        self.refused = 0

    def accept(self, exit_on_refusal: bool = False) -> Connection:
        """The next peer that authenticates. One that does not is logged by address
        with the reason, dropped, and (unless ``exit_on_refusal``: HandshakeRefused)
        the listener waits for the next."""
        while True:
            try:
                conn, addr = self.sock.accept()
            except ConnectionAbortedError:  # gone before we took it
                continue
            peer = _name(addr)
            try:
                tune(conn)
                skey = authenticate_backup(conn, self.key, self.timeout)
            except (HandshakeRefused, OSError) as exc:
                conn.close()
                self.refused += 1
                log.warning("refused %s: %s", peer, exc)
                if exit_on_refusal:
                    raise HandshakeRefused(f"refused {peer}: {exc}") from None
                continue
            log.info("authenticated %s", peer)
            return Connection(conn, peer, skey)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
