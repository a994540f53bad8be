"""The xl migration handshake (tools/xl/xl.h, xl_migrate.c), sans-IO, both sides.

Order on the wire (sender S = `xl migrate`, receiver R = `xl migrate-receive`):

  R->S  BANNER                                  (no NUL)
  S->R  the stream (xl header with the config, libxl stream)
  R->S  READY                                   (plain streams only; with NUL)
  S->R  GO                                      (with NUL)
  R->S  REPORT + one status byte                (0: guest running)
  R->S  GO again, only after a non-zero status  (permission for S to resume)

Checkpointed streams (`-r`) stop after the stream: R fails over when it ends.
Each side is an object fed with the bytes it received; it returns what it recognised
and raises HandshakeError (naming the message, the expected text and the offset) on
anything else. What our two ends say beyond this (the extension offer after the banner)
is channel/negotiate.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.errors import XenRemusError

BANNER = b"xl migration receiver ready, send binary domain data.\n"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"
_UNEXPECTED_MAX = 256


class HandshakeError(XenRemusError):
    """The peer sent something other than the expected handshake message."""

    def __init__(self, side: str, what: str, offset: int, got: bytes) -> None:
        self.what, self.offset, self.got = what, offset, got
        shown = got[:48]
        super().__init__(f"xl handshake ({side}): expected the {what} at offset {offset} of "
                         f"the {side} channel, got {shown!r}"
                         + ("…" if len(got) > len(shown) else ""))


@dataclass(frozen=True)
class Message:
    """A fixed handshake message was received whole; ``status`` for REPORT."""

    name: str
    status: int | None = None


class _Matcher:
    """Matches a sequence of expected fixed messages against bytes of any chunking."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.offset = 0  # bytes consumed on this channel
        self._buf = bytearray()
        self._want: list[tuple[str, bytes, bool]] = []  # (name, text, has status byte)

    def expect(self, name: str, text: bytes, status: bool = False) -> list[Message]:
        """Queue a message; returns it at once if its bytes already arrived."""
        self._want.append((name, text, status))
        return self.feed(b"") if self._buf else []

    @property
    def pending(self) -> bool:
        return bool(self._want)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while self._want:
            name, text, status = self._want[0]
            have = bytes(self._buf[:len(text)])
            if have != text[:len(have)]:
                raise HandshakeError(self.side, name, self.offset, have)
            need = len(text) + (1 if status else 0)
            if len(self._buf) < need:
                break
            code = self._buf[len(text)] if status else None
            del self._buf[:need]
            self.offset += need
            self._want.pop(0)
            out.append(Message(name, code))
        # Bytes nobody expects yet may be the next message (a GO right behind a failure
        # report): keep a little, judge them when it is expected or at EOF.
        if not self._want and len(self._buf) > _UNEXPECTED_MAX:
            raise HandshakeError(self.side, "end of the handshake", self.offset,
                                 bytes(self._buf))
        return out

    def eof(self) -> None:
        if self._want:
            raise HandshakeError(self.side, self._want[0][0], self.offset,
                                 bytes(self._buf) + b" <EOF>")
        if self._buf:
            raise HandshakeError(self.side, "end of the handshake", self.offset,
                                 bytes(self._buf))


class ReceiverSide:
    """What `migrate-receive` says to its sender and what it expects back."""

    def __init__(self) -> None:
        self._m = _Matcher("sender->receiver")

    def banner(self) -> bytes:
        return BANNER

    def ready(self) -> bytes:
        """After a plain stream's END: ask for permission; then feed until GO."""
        self._m.expect("GO message", GO)
        return READY

    def report(self, status: int) -> bytes:
        """0 = guest running here; non-zero: the caller destroys its copy, then sends
        ``resume_permission()`` so the sender may resume."""
        if not 0 <= status <= 255:
            raise ValueError(f"status {status} does not fit the report byte")
        return REPORT + bytes([status])

    def resume_permission(self) -> bytes:
        return GO

    def feed(self, data: bytes) -> list[Message]:
        return self._m.feed(data)

    def eof(self) -> None:
        self._m.eof()


class SenderSide:
    """What `migrate` expects from its receiver and what it says to it."""

    def __init__(self, checkpointed: bool = False) -> None:
        self.checkpointed = checkpointed
        self._m = _Matcher("receiver->sender")
        self._m.expect("banner", BANNER)

    def stream_done(self) -> list[Message]:
        """The whole plain stream has been written: now READY is due."""
        return [] if self.checkpointed else self._m.expect("ready message", READY)

    def go(self) -> bytes:
        self._m.expect("success/failure report", REPORT, status=True)
        return GO

    def expect_resume_permission(self) -> list[Message]:
        """After a non-zero report the receiver sends GO back once it cleaned up."""
        return self._m.expect("permission for sender to resume", GO)

    @property
    def waiting(self) -> bool:
        return self._m.pending

    def feed(self, data: bytes) -> list[Message]:
        return self._m.feed(data)

    def eof(self) -> None:
        self._m.eof()
