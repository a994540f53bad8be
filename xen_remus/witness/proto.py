"""The witness protocol, sans-IO: frames, their authentication, the messages.

A frame on the byte stream (TCP, a Unix socket, a virtio-serial port, a command's pipes):

    "XRWT"  u8 version  u8 type  u16 length    then `length` bytes:
    body, u64 sequence number, 16-octet HMAC-SHA256 tag (channel/mac.py's trailer)

Every frame is authenticated under the pre-shared key. A session starts with the client's
HELLO (its fresh nonce) and the witness's WELCOME (the client's nonce echoed, its own
fresh nonce), both tagged under the key itself; every later frame (REQUEST, RESPONSE) is
tagged under a key derived from both nonces and numbered 1, 2, 3... per direction, so a
recorded frame replays into no other session and not twice into one. A HELLO may come at
any time and starts a new session: one long stream (QEMU's chardev to the witness) carries
many clients one after another. Bytes before a frame's magic are skipped (what a killed
client left in the stream); a client skips frames until the WELCOME to its own nonce.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from xen_remus.channel import mac
from xen_remus.errors import XenRemusError

MAGIC = b"XRWT"
VERSION = 1
HELLO, WELCOME, REQUEST, RESPONSE = 1, 2, 3, 4
FRAME_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", REQUEST: "REQUEST", RESPONSE: "RESPONSE"}
_HEAD = struct.Struct("<4sBBH")
FRAME_MAX = 2048  # after the head; a request or response is a few hundred bytes
NONCE_SIZE = 16
NAME_MAX = 255  # a guest's or a holder's name, UTF-8 octets

# What each frame's tag is under, and in which direction it goes.
_HELLO_C2S = b"xen-remus witness hello client->witness"
_HELLO_S2C = b"xen-remus witness hello witness->client"
_C2S = b"xen-remus witness client->witness"
_S2C = b"xen-remus witness witness->client"

# Requests.
ACQUIRE, RENEW, RELEASE, QUERY = 1, 2, 3, 4
OP_NAMES = {ACQUIRE: "acquire", RENEW: "renew", RELEASE: "release", QUERY: "query"}
# Answers: GRANTED (the lease is the client's for duration_ms from when it sent the
# request), BUSY (another holder's lease runs: try again), STALE (a higher or equal
# generation is another's: never), DENIED (not the holder; a bad request), INFO (query).
GRANTED, BUSY, STALE, DENIED, INFO = 0, 1, 2, 3, 4
STATUS_NAMES = {GRANTED: "granted", BUSY: "busy", STALE: "stale", DENIED: "denied",
                INFO: "info"}
GENERATION_MAX = (1 << 64) - 1
DURATION_MAX_MS = (1 << 32) - 1

_REQ = struct.Struct("<BQI")  # op, generation, duration_ms; then guest, holder
_RESP = struct.Struct("<BIB")  # status, duration_ms, has a record; then record?, message
_REC = struct.Struct("<QIB")  # generation, remaining_ms, released; then holder
_STR = struct.Struct("<H")


class WitnessProtocolError(XenRemusError):
    """A frame or message that breaks the protocol, or is not authentic: names it."""


@dataclass(frozen=True)
class Request:
    op: int
    guest: str
    generation: int = 0
    holder: str = ""
    duration_ms: int = 0

    def __str__(self) -> str:
        return (f"{OP_NAMES.get(self.op, self.op)} {self.guest!r} generation "
                f"{self.generation} for {self.holder!r}")


@dataclass(frozen=True)
class Record:
    """The witness's record of a guest, as it answers it."""

    holder: str
    generation: int
    remaining_ms: int  # of the holder's lease, as the witness counts it (0: expired)
    released: bool = False

    def __str__(self) -> str:
        state = ("released" if self.released else
                 f"{self.remaining_ms} ms left" if self.remaining_ms else "expired")
        return f"generation {self.generation} held by {self.holder!r} ({state})"


@dataclass(frozen=True)
class Response:
    status: int
    duration_ms: int = 0  # granted
    record: Record | None = None
    message: str = ""

    def __str__(self) -> str:
        text = STATUS_NAMES.get(self.status, str(self.status))
        if self.record is not None:
            text += f": {self.record}"
        return f"{text}; {self.message}" if self.message else text


# -- messages -----------------------------------------------------------------------------
def _put_str(s: str, what: str) -> bytes:
    raw = s.encode()
    if len(raw) > NAME_MAX:
        raise WitnessProtocolError(f"{what} of {len(raw)} bytes (at most {NAME_MAX})")
    return _STR.pack(len(raw)) + raw


def _put_text(s: str) -> bytes:
    raw = s.encode()[:FRAME_MAX // 2]
    return _STR.pack(len(raw)) + raw


class _Reader:
    def __init__(self, body: bytes, what: str) -> None:
        self.body, self.at, self.what = body, 0, what

    def unpack(self, st: struct.Struct, field: str) -> tuple[int, ...]:
        if self.at + st.size > len(self.body):
            raise WitnessProtocolError(f"{self.what}: ends at offset {len(self.body)} in "
                                       f"{field}")
        vals = st.unpack_from(self.body, self.at)
        self.at += st.size
        return tuple(int(v) for v in vals)

    def text(self, field: str) -> str:
        (n,) = self.unpack(_STR, field)
        raw = self.body[self.at:self.at + n]
        if len(raw) < n:
            raise WitnessProtocolError(f"{self.what}: {field} of {n} bytes at offset "
                                       f"{self.at}, only {len(raw)} there")
        self.at += n
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise WitnessProtocolError(f"{self.what}: {field} at offset {self.at - n} is "
                                       "not UTF-8") from None

    def end(self) -> None:
        if self.at != len(self.body):
            raise WitnessProtocolError(f"{self.what}: {len(self.body) - self.at} bytes "
                                       f"after the end at offset {self.at}")


def encode_request(r: Request) -> bytes:
    if r.op not in OP_NAMES:
        raise WitnessProtocolError(f"request: unknown op {r.op}")
    if not 0 <= r.generation <= GENERATION_MAX or not 0 <= r.duration_ms <= DURATION_MAX_MS:
        raise WitnessProtocolError(f"request {r}: generation or duration out of range")
    return (_REQ.pack(r.op, r.generation, r.duration_ms) + _put_str(r.guest, "guest name")
            + _put_str(r.holder, "holder name"))


def decode_request(body: bytes) -> Request:
    rd = _Reader(body, "REQUEST")
    op, gen, dur = rd.unpack(_REQ, "op, generation, duration")
    if op not in OP_NAMES:
        raise WitnessProtocolError(f"REQUEST: unknown op {op} at offset 0")
    guest, holder = rd.text("guest name"), rd.text("holder name")
    rd.end()
    if not guest:
        raise WitnessProtocolError("REQUEST: no guest name")
    return Request(op, guest, gen, holder, dur)


def encode_response(r: Response) -> bytes:
    out = _RESP.pack(r.status, r.duration_ms, r.record is not None)
    if r.record is not None:
        rec = r.record
        out += _REC.pack(rec.generation, min(rec.remaining_ms, DURATION_MAX_MS),
                         rec.released) + _put_str(rec.holder, "holder name")
    return out + _put_text(r.message)


def decode_response(body: bytes) -> Response:
    rd = _Reader(body, "RESPONSE")
    status, dur, has = rd.unpack(_RESP, "status, duration, record flag")
    if status not in STATUS_NAMES:
        raise WitnessProtocolError(f"RESPONSE: unknown status {status} at offset 0")
    rec = None
    if has:
        gen, left, released = rd.unpack(_REC, "record")
        rec = Record(rd.text("holder name"), gen, left, bool(released))
    msg = rd.text("message")
    rd.end()
    return Response(status, dur, rec, msg)


# -- frames -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    ftype: int
    body: bytes  # sealed: the trailer still on
    raw: bytes  # the whole frame as it came, head included
    end: int  # the stream offset just after it


def _rtype(ftype: int) -> int:
    return VERSION << 8 | ftype  # the version is under the tag too


def frame(ftype: int, sealed: bytes) -> bytes:
    if len(sealed) > FRAME_MAX:
        raise WitnessProtocolError(f"{FRAME_NAMES[ftype]} of {len(sealed)} bytes "
                                   f"(at most {FRAME_MAX})")
    return _HEAD.pack(MAGIC, VERSION, ftype, len(sealed)) + sealed


class FrameReader:
    """Bytes in (``feed``), whole frames out (``next``). Bytes before a magic are skipped
    (``skipped`` counts them), and so is a magic whose head makes no sense (a partial
    frame's left by an earlier client); a frame the caller rejects can be given back
    (``unread``): the search for the next magic goes on inside it, where a frame cut
    short by a killed client may hide the start of the next client's. A frame of another
    version is an error."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.buf = b""
        self.offset = 0  # of buf[0] in the stream
        self.skipped = 0

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> Frame | None:
        while True:
            at = self.buf.find(MAGIC)
            drop = at if at >= 0 else max(0, len(self.buf) - len(MAGIC) + 1)
            if drop:
                self._skip(drop)
            if len(self.buf) < _HEAD.size:
                return None
            _, version, ftype, length = _HEAD.unpack_from(self.buf)
            if ftype not in FRAME_NAMES or length > FRAME_MAX:
                self._skip(1)
                continue
            if version != VERSION:
                at = self.offset
                self._skip(1)  # the caller may go on after the error
                raise WitnessProtocolError(f"{self.what}: frame of version {version} at "
                                           f"offset {at}; this end speaks version "
                                           f"{VERSION}")
            size = _HEAD.size + length
            if len(self.buf) < size:
                return None
            raw = self.buf[:size]
            self.buf = self.buf[size:]
            self.offset += size
            return Frame(ftype, raw[_HEAD.size:], raw, self.offset)

    def unread(self, f: Frame) -> None:
        """Give back all of ``f`` but its first byte (counted as skipped)."""
        self.buf = f.raw[1:] + self.buf
        self.offset = f.end - len(f.raw) + 1
        self.skipped += 1

    def _skip(self, n: int) -> None:
        self.skipped += n
        self.buf = self.buf[n:]
        self.offset += n


def _open(opener: mac.Opener, f: Frame, where: str) -> bytes:
    try:
        return opener.open(_rtype(f.ftype), f.body, where)
    except mac.MacError as exc:
        raise WitnessProtocolError(f"{exc} (is the witness key the same on both ends?)"
                                   ) from None


class ClientSession:
    """The client's end of one session: ``hello()`` first, then ``request`` once
    ``ready``; ``receive`` gives the responses."""

    def __init__(self, key: bytes, nonce: bytes | None = None) -> None:
        self.key = key
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self.reader = FrameReader("the witness's stream")
        self.ignored = 0  # frames before our WELCOME (an earlier session's)
        self._seal: mac.Sealer | None = None
        self._open: mac.Opener | None = None

    @property
    def ready(self) -> bool:
        return self._seal is not None

    def hello(self) -> bytes:
        body = mac.Sealer(self.key, _HELLO_C2S).seal(_rtype(HELLO), self.nonce)
        return frame(HELLO, body)

    def request(self, req: Request) -> bytes:
        assert self._seal is not None, "request before the WELCOME"
        return frame(REQUEST, self._seal.seal(_rtype(REQUEST), encode_request(req)))

    def receive(self, data: bytes) -> list[Response]:
        out: list[Response] = []
        self.reader.feed(data)
        while (f := self.reader.next()) is not None:
            where = f"{FRAME_NAMES[f.ftype]} ending at offset {f.end}"
            if self._open is None:
                if f.ftype == WELCOME and self._welcome(f):
                    continue
                self.ignored += 1
                self.reader.unread(f)
                continue
            if f.ftype != RESPONSE:
                raise WitnessProtocolError(f"{where}: expected a RESPONSE")
            out.append(decode_response(_open(self._open, f, where)))
        return out

    def _welcome(self, f: Frame) -> bool:
        try:
            body = mac.Opener(self.key, _HELLO_S2C).open(_rtype(WELCOME), f.body, "WELCOME")
        except mac.MacError:
            return False  # another key's, or corrupt: not ours, as any stale frame
        if len(body) != 2 * NONCE_SIZE or body[:NONCE_SIZE] != self.nonce:
            return False  # the answer to an earlier client's HELLO
        skey = mac.session_key(self.key, self.nonce + body[NONCE_SIZE:], 0)
        self._seal, self._open = mac.Sealer(skey, _C2S), mac.Opener(skey, _S2C)
        return True


class ServerSession:
    """The witness's end of one stream: ``receive`` gives the authentic requests, and
    puts a WELCOME for each HELLO into ``output``; ``respond`` answers the last request.
    A WitnessProtocolError leaves it waiting for a new HELLO (call ``receive(b"")`` to go
    on with what is buffered: the rejected frame is searched for one)."""

    def __init__(self, key: bytes, what: str,
                 nonces: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.key, self.what, self.nonces = key, what, nonces
        self.reader = FrameReader(what)
        self.output = b""
        self._seal: mac.Sealer | None = None
        self._open: mac.Opener | None = None

    def receive(self, data: bytes) -> list[Request]:
        out: list[Request] = []
        self.reader.feed(data)
        while (f := self.reader.next()) is not None:
            where = f"{self.what}: {FRAME_NAMES[f.ftype]} ending at offset {f.end}"
            try:
                if f.ftype == HELLO:
                    self._hello(f, where)
                elif f.ftype != REQUEST:
                    raise WitnessProtocolError(f"{where}: a client sends no "
                                               f"{FRAME_NAMES[f.ftype]}")
                elif self._open is None:
                    raise WitnessProtocolError(f"{where}: a REQUEST before any HELLO")
                else:
                    out.append(decode_request(_open(self._open, f, where)))
            except WitnessProtocolError:
                self.reader.unread(f)
                self._seal = self._open = None
                raise
        return out

    def respond(self, resp: Response) -> None:
        if self._seal is None:
            return  # the session broke since: its client is gone
        self.output += frame(RESPONSE, self._seal.seal(_rtype(RESPONSE),
                                                        encode_response(resp)))

    def take_output(self) -> bytes:
        out, self.output = self.output, b""
        return out

    def _hello(self, f: Frame, where: str) -> None:
        self._seal = self._open = None
        nonce = _open(mac.Opener(self.key, _HELLO_C2S), f, where)
        if len(nonce) != NONCE_SIZE:
            raise WitnessProtocolError(f"{where}: a nonce of {len(nonce)} bytes, expected "
                                       f"{NONCE_SIZE}")
        mine = self.nonces(NONCE_SIZE)
        skey = mac.session_key(self.key, nonce + mine, 0)
        self._seal, self._open = mac.Sealer(skey, _S2C), mac.Opener(skey, _C2S)
        welcome = mac.Sealer(self.key, _HELLO_S2C).seal(_rtype(WELCOME), nonce + mine)
        self.output += frame(WELCOME, welcome)
