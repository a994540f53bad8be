"""A small client of the QEMU Machine Protocol (QMP), for qemu-xen, the device model of
HVM guests, over the Unix socket libxl gives it.

``QmpProtocol`` is the protocol without I/O: bytes in, messages out, commands framed with
their ids. ``QmpClient`` runs it over a connected socket, one command at a time, and can
pass a file descriptor with a command (SCM_RIGHTS, as `add-fd` wants it).

The QMP rules followed (QEMU's qmp-spec): the server speaks first, a greeting
``{"QMP": {...}}``; nothing but ``qmp_capabilities`` is accepted until it has succeeded;
each message is one JSON object on its own line; a command's ``id`` comes back in its
reply (``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``); events
(``{"event": ...}``) may come between at any time.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from xen_remus.xen.errors import XenError

# libxl puts each device model's QMP socket here (libxl_dm.c, "-chardev socket,path=..."),
# one per domain.
QMP_SOCKET = "/var/run/xen/qmp-libxl-{domid}"
MESSAGE_MAX = 1 << 20  # a reply larger than this is not one we asked for (libxl: 1 MiB)
COMMAND_TIMEOUT = 60.0  # xen-save-devices-state of a busy guest under TCG takes seconds


class QmpError(XenError):
    """The QMP connection failed (connect, read, write, a malformed message, a timeout);
    the message names the socket and what was being done."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error: ``command``, its QMP error ``error_class``
    (GenericError, CommandNotFound, ...) and QEMU's ``desc``."""

    def __init__(self, command: str, error_class: str, desc: str, where: str) -> None:
        self.command, self.error_class, self.desc = command, error_class, desc
        super().__init__(f"QMP command {command} failed: {error_class}: {desc} ({where})")


@dataclass(frozen=True)
class Greeting:
    version: str  # "major.minor.micro" of QEMU
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    """The answer to command ``id``: ``value`` (the "return" member) or ``error``."""

    id: int | None
    value: Any = None
    error: tuple[str, str] | None = None  # (class, desc)


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)


Message = Greeting | Reply | Event


class QmpProtocol:
    """The client's side of QMP without I/O. ``feed(bytes)`` returns the messages now
    complete; ``command(name, args)`` returns (id, bytes to send). Any violation raises
    QmpError and leaves the object in the "error" state, where it refuses everything."""

    def __init__(self, limit: int = MESSAGE_MAX) -> None:
        self.limit = limit
        self.state = "greeting"  # -> "negotiating" -> "ready"; or "error"
        self.greeting: Greeting | None = None
        self._buf = bytearray()
        self._next_id = 1
        self._negotiation_id: int | None = None

    def command(self, name: str, args: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Frame command ``name``; qmp_capabilities is sent by ``negotiate`` only."""
        if self.state != "ready":
            raise QmpError(f"QMP {name}: connection not ready (state {self.state})")
        return self._frame(name, args)

    def negotiate(self) -> bytes:
        """The qmp_capabilities command that must follow the greeting."""
        if self.state != "negotiating" or self._negotiation_id is not None:
            raise QmpError(f"QMP qmp_capabilities: not expected in state {self.state}")
        self._negotiation_id, data = self._frame("qmp_capabilities", None)
        return data

    def _frame(self, name: str, args: dict[str, Any] | None) -> tuple[int, bytes]:
        cid, self._next_id = self._next_id, self._next_id + 1
        msg: dict[str, Any] = {"execute": name, "id": cid}
        if args:
            msg["arguments"] = args
        return cid, json.dumps(msg, separators=(",", ":")).encode() + b"\r\n"

    def feed(self, data: bytes) -> list[Message]:
        if self.state == "error":
            raise QmpError("QMP connection already failed")
        self._buf += data
        out: list[Message] = []
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl]).strip()
            del self._buf[:nl + 1]
            if line:
                msg = self._message(line)
                if msg is not None:
                    out.append(msg)
        if len(self._buf) > self.limit:
            self._fail(f"a message longer than {self.limit} bytes")
        return out

    def _message(self, line: bytes) -> Message | None:
        try:
            obj = json.loads(line)
        except ValueError as exc:
            self._fail(f"not JSON ({exc}): {line[:80]!r}")
        if not isinstance(obj, dict):
            self._fail(f"not a JSON object: {line[:80]!r}")
        if "event" in obj:
            data = obj.get("data")
            return Event(str(obj["event"]), data if isinstance(data, dict) else {})
        if self.state == "greeting":
            return self._greeting(obj, line)
        cid = obj.get("id")
        cid = cid if isinstance(cid, int) else None
        if "return" in obj:
            reply = Reply(cid, obj["return"])
        elif "error" in obj and isinstance(obj["error"], dict):
            err = obj["error"]
            reply = Reply(cid, error=(str(err.get("class", "?")), str(err.get("desc", ""))))
        else:
            self._fail(f"neither a reply nor an event: {line[:80]!r}")
        if self.state == "negotiating" and cid == self._negotiation_id:
            if reply.error is not None:
                self._fail(f"qmp_capabilities refused: {reply.error[0]}: {reply.error[1]}")
            self.state = "ready"
            return None
        return reply

    def _greeting(self, obj: dict[str, Any], line: bytes) -> Greeting:
        qmp = obj.get("QMP")
        if not isinstance(qmp, dict):
            self._fail(f"expected the QMP greeting, got {line[:80]!r}")
        ver = qmp.get("version")
        qemu = ver.get("qemu") if isinstance(ver, dict) else None
        version = ".".join(str(qemu.get(k, "?")) if isinstance(qemu, dict) else "?"
                           for k in ("major", "minor", "micro"))
        caps = qmp.get("capabilities")
        self.greeting = Greeting(version, tuple(map(str, caps)) if isinstance(caps, list)
                                 else ())
        self.state = "negotiating"
        return self.greeting

    def _fail(self, why: str) -> NoReturn:
        self.state = "error"
        raise QmpError(f"QMP protocol error: {why}")


class QmpClient:
    """One QMP connection, used by one thread, one command at a time. ``what`` names the
    peer in errors (the socket path). Use as a context manager."""

    def __init__(self, sock: socket.socket, what: str,
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self.sock, self.what, self.timeout = sock, what, timeout
        self.proto = QmpProtocol()
        self.events: list[Event] = []  # what QEMU said unasked, for the curious
        self._replies: dict[int | None, Reply] = {}
        try:
            deadline = time.monotonic() + timeout
            while self.proto.state == "greeting":
                self._read(deadline, "the QMP greeting")
            self._send(self.proto.negotiate(), None, "qmp_capabilities")
            while self.proto.state == "negotiating":
                self._read(deadline, "the reply to qmp_capabilities")
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: str, timeout: float = COMMAND_TIMEOUT) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot connect to the QMP socket {path}: {exc.strerror or exc} "
                           "(is the guest's device model running?)") from None
        return cls(sock, path, timeout)

    @property
    def version(self) -> str:
        return self.proto.greeting.version if self.proto.greeting else "?"

    def execute(self, command: str, args: dict[str, Any] | None = None,
                fd: int | None = None) -> Any:
        """Run ``command`` and return its "return" value; QmpCommandError if QEMU refuses
        it. ``fd`` goes along with the command's first byte (for add-fd)."""
        cid, data = self.proto.command(command, args)
        deadline = time.monotonic() + self.timeout
        self._send(data, fd, command)
        while cid not in self._replies:
            self._read(deadline, f"the reply to {command}")
        reply = self._replies.pop(cid)
        if reply.error is not None:
            raise QmpCommandError(command, reply.error[0], reply.error[1], self.what)
        return reply.value

    def _send(self, data: bytes, fd: int | None, what: str) -> None:
        try:
            if fd is not None:
                socket.send_fds(self.sock, [data[:1]], [fd])
                data = data[1:]
            self.sock.sendall(data)
        except OSError as exc:
            raise QmpError(f"QMP {what}: writing to {self.what} failed: "
                           f"{exc.strerror or exc}") from None

    def _read(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        late = f"QMP: {what} did not come from {self.what} within {self.timeout:g} s"
        if left <= 0:
            raise QmpError(late)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise QmpError(late) from None
        except OSError as exc:
            raise QmpError(f"QMP: reading {what} from {self.what} failed: "
                           f"{exc.strerror or exc}") from None
        if not data:
            raise QmpError(f"QMP: {self.what} closed the connection while we waited for "
                           f"{what}")
        try:
            msgs = self.proto.feed(data)
        except QmpError as exc:
            raise QmpError(f"{exc} (from {self.what}, waiting for {what})") from None
        for msg in msgs:
            if isinstance(msg, Event):
                self.events.append(msg)
            elif isinstance(msg, Reply):
                self._replies[msg.id] = msg

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
