"""A sans-IO NBD server: bytes from the client in, events and reply bytes out.

The subset (NBD doc/proto.md): fixed newstyle handshake; options EXPORT_NAME, INFO, GO and
ABORT, every other option answered NBD_REP_ERR_UNSUP; simple replies only (no structured
replies, so a READ reply is header + data); commands READ, WRITE, FLUSH and DISC, with FUA.
One export of a fixed size. Use::

    conn = ServerConnection(size)
    conn.receive_data(chunk)              # b"" at EOF
    while (ev := conn.next_event()) is not NEED_DATA:
        Send -> write ev.data;  Read/Write/Flush -> do it, write conn.reply(...) (+ data)
        Closed -> close the socket (ev.error: log ev.reason as an error)

Requests the server must refuse (unknown command or flag, out of range, too long) never
reach the caller: the connection answers them itself with the spec's error value in a
Send event, in order with the others. A broken framing (bad magic) ends the connection
with a Closed event naming the stream offset; nothing raises.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

# -- Values of doc/proto.md ("Values", "Handshake phase") ------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
OPT_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Transmission flags (16 bits). SEND_FLUSH matters beyond NBD: without it the kernel's nbd
# reports no write cache, blkback offers no feature-flush-cache and the guest never flushes.
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
TRANSMISSION_FLAGS: Final = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA

# Options and option replies.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_INFO: Final = 6
OPT_GO: Final = 7
REP_ACK: Final = 1
REP_INFO: Final = 3
REP_ERR_UNSUP: Final = 2**31 + 1
REP_ERR_INVALID: Final = 2**31 + 3
REP_ERR_UNKNOWN: Final = 2**31 + 6
INFO_EXPORT: Final = 0
INFO_BLOCK_SIZE: Final = 3


class Command(enum.IntEnum):
    """NBD_CMD_* values: READ, WRITE, DISC and FLUSH are served, the others refused."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


# Command flags, error values.
CMD_FLAG_FUA: Final = 1 << 0
EPERM: Final = 1
EIO: Final = 5
EINVAL: Final = 22
ENOSPC: Final = 28

# Limits. A request longer than MAX_REQUEST is refused (its payload skipped, never held):
# 32 MiB is what Linux's nbd sends at most and what BLOCK_SIZE advertises. An option's data
# is at most a 4096-byte name plus a little; more is skipped and refused.
MAX_REQUEST: Final = 32 * 1024 * 1024
MAX_OPTION_DATA: Final = 16 * 1024
PREFERRED_BLOCK: Final = 4096
MAX_NAME: Final = 4096

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
REQUEST_SIZE: Final = _REQUEST.size  # 28
REPLY_SIZE: Final = _REPLY.size  # 16
_COMPACT = 256 * 1024  # drop consumed input once this much has piled up


# -- Events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Bytes the connection itself answers with (handshake, option replies, refusals)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """Option haggling is over: transmission of ``export`` starts."""

    export: str
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request the caller serves and answers with a reply for ``handle``."""

    handle: int


@dataclass(frozen=True, slots=True)
class Read(Request):
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Write(Request):
    """Write ``data`` at ``offset``; with ``fua`` it must be durable before the reply."""

    offset: int
    data: bytes
    fua: bool


@dataclass(frozen=True, slots=True)
class Flush(Request):
    """Every write already answered must be durable before this reply."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; ``error`` marks a protocol violation (log ``reason``)."""

    reason: str
    error: bool


class NeedData:
    """The type of NEED_DATA: next_event has nothing until more bytes are fed."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
Event = Send | Ready | Read | Write | Flush | Closed

# Phases.
_CLIENT_FLAGS_PHASE, _OPTIONS, _TRANSMISSION, _CLOSED = range(4)


def simple_reply(handle: int, error: int = 0) -> bytes:
    """The 16-byte simple reply header; a successful READ's data follows it."""
    return _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


class ServerConnection:
    """One client connection to one export of ``size`` bytes, as a state machine."""

    def __init__(self, size: int, export: str = "", flags: int = TRANSMISSION_FLAGS) -> None:
        if not 0 <= size < 2**63:
            raise ValueError(f"NBD export size {size} out of range")
        self.size = size
        self.export = export
        self.flags = flags | FLAG_HAS_FLAGS
        self.phase = _CLIENT_FLAGS_PHASE
        self.no_zeroes = False
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._skip = 0  # payload bytes still to discard (an oversized option or write)
        self._after_skip: Event | None = None
        self._events: deque[Event] = deque()
        self._events.append(Send(_GREETING.pack(NBDMAGIC, IHAVEOPT,
                                                FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))

    @property
    def offset(self) -> int:
        """Bytes of client input consumed so far (where the next message starts)."""
        return self._base + self._pos

    def receive_data(self, data: bytes) -> None:
        """Feed client bytes; ``b""`` means the client closed its end."""
        if not data:
            self._eof = True
        elif self.phase != _CLOSED:
            self._buf += data

    def reply(self, handle: int, error: int = 0) -> bytes:
        """The reply header for a Read/Write/Flush event; a READ's data follows on success."""
        return simple_reply(handle, error)

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA until more bytes are fed."""
        while not self._events:
            if self.phase == _CLOSED:
                return NEED_DATA
            if not self._step():
                if self._eof:
                    self._close_at_eof()
                    continue
                return NEED_DATA
        return self._events.popleft()

    # -- parsing ----------------------------------------------------------------------------
    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as mv:  # one copy, and the view is gone before a resize
            data = bytes(mv[self._pos:self._pos + n])
        self._pos += n
        if self._pos >= _COMPACT or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        return data

    def _close(self, reason: str, error: bool) -> None:
        self.phase = _CLOSED
        self._buf = bytearray()
        self._pos = 0
        self._events.append(Closed(reason, error))

    def _close_at_eof(self) -> None:
        if self._avail() or self._skip:
            self._close(f"client closed inside a message at stream offset {self.offset}"
                        f" ({self._avail()} byte(s) of it received)", True)
        elif self.phase == _TRANSMISSION:
            self._close("client closed without NBD_CMD_DISC", False)
        else:
            self._close("client closed during the handshake", False)

    def _step(self) -> bool:
        """Consume one message if it is complete; False when more bytes are needed."""
        if self._skip:
            n = min(self._skip, self._avail())
            self._take(n)
            self._skip -= n
            if self._skip:
                return False
            if self._after_skip is not None:
                self._events.append(self._after_skip)
                self._after_skip = None
            return True
        if self.phase == _TRANSMISSION:
            return self._request()
        if self.phase == _OPTIONS:
            return self._option()
        return self._client_flags()

    def _client_flags(self) -> bool:
        if self._avail() < _CLIENT_FLAGS.size:
            return False
        at = self.offset
        (cflags,) = _CLIENT_FLAGS.unpack(self._take(_CLIENT_FLAGS.size))
        # Fixed newstyle is honoured even without C_FIXED_NEWSTYLE (proto.md allows it).
        unknown = cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            # "the server MUST drop the connection if the client sets an unknown flag"
            self._close(f"client flags 0x{cflags:08x} set unknown bits 0x{unknown:x}"
                        f" at stream offset {at}", True)
            return True
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        self.phase = _OPTIONS
        return True

    def _option(self) -> bool:
        if self._avail() < _OPTION.size:
            return False
        at = self.offset
        magic, opt, length = _OPTION.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            self._take(_OPTION.size)
            self._close(f"bad option magic 0x{magic:016x} (want IHAVEOPT) at stream offset"
                        f" {at}", True)
            return True
        if length > MAX_OPTION_DATA:
            self._take(_OPTION.size)
            if opt == OPT_EXPORT_NAME:  # it cannot be answered with an error: close
                self._close(f"NBD_OPT_EXPORT_NAME of {length} bytes at stream offset {at}",
                            True)
                return True
            self._skip = length
            code = REP_ERR_INVALID if opt in (OPT_INFO, OPT_GO, OPT_ABORT) else REP_ERR_UNSUP
            self._after_skip = Send(option_reply(opt, code, b"option data too long"))
            return True
        if self._avail() < _OPTION.size + length:
            return False
        self._take(_OPTION.size)
        data = self._take(length)
        if opt == OPT_EXPORT_NAME:
            self._export_name(data, at)
        elif opt == OPT_ABORT:
            # The client may not wait for this ACK: a failed send of it is harmless.
            self._events.append(Send(option_reply(opt, REP_ACK)))
            self._close("client aborted the handshake (NBD_OPT_ABORT)", False)
        elif opt in (OPT_INFO, OPT_GO):
            self._info_or_go(opt, data)
        else:
            self._events.append(Send(option_reply(
                opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())))
        return True

    def _known(self, raw: bytes) -> str | None:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return None
        return name if name in ("", self.export) else None

    def _start(self, name: str) -> None:
        self.phase = _TRANSMISSION
        self._events.append(Ready(name, self.size, self.flags))

    def _export_name(self, raw: bytes, at: int) -> None:
        name = self._known(raw)
        if name is None:
            # "If the chosen export does not exist ... the server MUST terminate the session."
            self._close(f"NBD_OPT_EXPORT_NAME asks for unknown export {raw[:64]!r} at stream"
                        f" offset {at}", True)
            return
        reply = _EXPORT_REPLY.pack(self.size, self.flags)
        self._events.append(Send(reply if self.no_zeroes else reply + bytes(124)))
        self._start(name)

    def _info_or_go(self, opt: int, data: bytes) -> None:
        # Data: u32 name length, name, u16 count of information requests, u16 each.
        bad = None
        if len(data) < 6:
            bad = "data shorter than 6 bytes"
        else:
            (nlen,) = struct.unpack_from(">I", data)
            if nlen > MAX_NAME or 4 + nlen + 2 > len(data):
                bad = f"export name length {nlen} does not fit"
            else:
                (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
                if len(data) != 4 + nlen + 2 + 2 * nreq:
                    bad = f"{nreq} information request(s) do not match the data length"
        if bad is not None:
            self._events.append(Send(option_reply(opt, REP_ERR_INVALID, bad.encode())))
            return
        name = self._known(data[4:4 + nlen])
        if name is None:
            self._events.append(Send(option_reply(opt, REP_ERR_UNKNOWN, b"unknown export")))
            return
        reqs = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        out = [option_reply(opt, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, self.size,
                                                             self.flags))]
        if INFO_BLOCK_SIZE in reqs:
            # Any alignment works on a file (minimum 1); larger requests are refused.
            out.append(option_reply(opt, REP_INFO, _INFO_BLOCK.pack(
                INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_REQUEST)))
        out.append(option_reply(opt, REP_ACK))
        self._events.append(Send(b"".join(out)))
        if opt == OPT_GO:
            self._start(name)

    def _request(self) -> bool:
        if self._avail() < REQUEST_SIZE:
            return False
        at = self.offset
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            self._take(REQUEST_SIZE)
            self._close(f"bad request magic 0x{magic:08x} (want 0x{REQUEST_MAGIC:08x}) at"
                        f" stream offset {at}", True)
            return True
        if cmd == Command.WRITE:
            if length > MAX_REQUEST:  # skip the payload, then refuse
                self._take(REQUEST_SIZE)
                self._skip = length
                self._after_skip = Send(simple_reply(handle, EINVAL))
                return True
            if self._avail() < REQUEST_SIZE + length:
                return False
            self._take(REQUEST_SIZE)
            data = self._take(length)
            err = self._check(flags, offset, length, ENOSPC)
            if err:
                self._events.append(Send(simple_reply(handle, err)))
            elif self.flags & FLAG_READ_ONLY:
                self._events.append(Send(simple_reply(handle, EPERM)))
            else:
                self._events.append(Write(handle, offset, data, bool(flags & CMD_FLAG_FUA)))
            return True
        self._take(REQUEST_SIZE)
        if cmd == Command.READ:
            err = self._check(flags, offset, length, EINVAL)
            self._events.append(Send(simple_reply(handle, err)) if err
                                else Read(handle, offset, length))
        elif cmd == Command.FLUSH:
            # offset and length are reserved (zero); a client that sets them is not refused.
            self._events.append(Send(simple_reply(handle, EINVAL)) if flags & ~CMD_FLAG_FUA
                                else Flush(handle))
        elif cmd == Command.DISC:
            # Earlier requests are already answered (events are handled in order).
            self._close("client disconnected (NBD_CMD_DISC)", False)
        else:
            # "The server SHOULD return EINVAL if it receives an unknown command."
            self._events.append(Send(simple_reply(handle, EINVAL)))
        return True

    def _check(self, flags: int, offset: int, length: int, beyond: int) -> int:
        """The error for a READ/WRITE that cannot be served, 0 when it can.

        Unknown flags and empty or oversized requests are EINVAL; past the end of the
        export, a write is ENOSPC and a read EINVAL (proto.md, "Error values").
        """
        if flags & ~CMD_FLAG_FUA or length == 0 or length > MAX_REQUEST:
            return EINVAL
        if offset + length > self.size:
            return beyond
        return 0
