"""Authenticated control frames between our two ends, sans-IO.

Why: the primary releases an epoch's network output when an ACK of it arrives. If anyone
who can write into the back channel could forge that ACK, output the backup never had
would reach clients. So once ``mac=hmac-sha256`` is agreed, every control frame (back:
ACK, heartbeat, CLOSE; forward: heartbeat, EPOCH_STATS) ends in a trailer

    u64 sequence number (little-endian), 16-octet HMAC-SHA256 tag (truncated)

The tag covers the direction, the frame's type, the sequence number and the body, under a
key of this protection only (``session_key``: the shared key, the sender's random session
nonce and the protection's generation). Each direction numbers its frames 1, 2, 3... and
the other end takes exactly the next number, so a recorded frame cannot be replayed,
reordered or reflected back, and one from another protection never verifies, even under
the same pre-shared key. The bulk of the stream (pages, vCPU state, disk writes) is not
authenticated here: it travels over the transport (ssh by default).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from xen_remus.channel.errors import ChannelError

ALGORITHM = "hmac-sha256"  # the token's value: ``mac=hmac-sha256``
KEY_SIZE = 32  # a generated key
SESSION_SIZE = 16  # the sender's nonce for one protection
TAG_SIZE = 16
KEY_MIN = 16  # a shorter pre-shared key is refused
_SEQ = struct.Struct("<Q")
_KDF = struct.Struct("<Q")
TRAILER_SIZE = _SEQ.size + TAG_SIZE
FORWARD = b"xen-remus primary->backup"
BACK = b"xen-remus backup->primary"
_HEAD = struct.Struct("<IQ")  # type, sequence number: what the tag covers before the body


class MacError(ChannelError):
    """A control frame whose MAC is missing, wrong, or out of sequence: refused."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def new_session() -> bytes:
    return secrets.token_bytes(SESSION_SIZE)


def session_key(key: bytes, session: bytes, generation: int) -> bytes:
    """The key of one protection: a pre-shared key is used by many, the nonce and the
    generation make each one's frames its own."""
    return hmac.new(key, b"xen-remus session key\0" + session + _KDF.pack(generation),
                    hashlib.sha256).digest()


def ends(key: bytes, session: bytes, generation: int | None, sender: bool
         ) -> tuple[Sealer, Opener]:
    """One end's sealer (its frames) and opener (its peer's), for one protection."""
    skey = session_key(key, session, generation or 0)
    mine, theirs = (FORWARD, BACK) if sender else (BACK, FORWARD)
    return Sealer(skey, mine), Opener(skey, theirs)


def _tag(key: bytes, direction: bytes, rtype: int, seq: int, body: bytes) -> bytes:
    m = hmac.new(key, direction, hashlib.sha256)
    m.update(_HEAD.pack(rtype, seq))
    m.update(body)
    return m.digest()[:TAG_SIZE]


class Sealer:
    """Appends the trailer to the frames one end sends in ``direction``, numbering them.
    Seal frames in the order they go onto the wire (callers hold their write lock)."""

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._key, self._direction = key, direction
        self.seq = 0  # of the last frame sealed

    def seal(self, rtype: int, body: bytes) -> bytes:
        self.seq += 1
        return body + _SEQ.pack(self.seq) + _tag(self._key, self._direction, rtype,
                                                  self.seq, body)


class Opener:
    """Checks and strips the trailer of the frames that come from ``direction``."""

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._key, self._direction = key, direction
        self.seq = 0  # of the last frame accepted

    def open(self, rtype: int, body: bytes, where: str) -> bytes:
        """The frame's body without its trailer; MacError (naming ``where``) if the frame
        is not authentic or not the next one."""
        if len(body) < TRAILER_SIZE:
            raise MacError(f"{where}: no MAC (a body of {len(body)} bytes, the trailer "
                           f"alone is {TRAILER_SIZE}): refused, every control frame must "
                           "be authenticated")
        inner = body[:-TRAILER_SIZE]
        (seq,) = _SEQ.unpack_from(body, len(inner))
        tag = body[-TAG_SIZE:]
        if not hmac.compare_digest(tag, _tag(self._key, self._direction, rtype, seq, inner)):
            raise MacError(f"{where}: bad MAC: refused (a forged or corrupted frame, or "
                           "the two ends were given different --key-file keys)")
        if seq != self.seq + 1:
            raise MacError(f"{where}: sequence number {seq}, expected {self.seq + 1}: "
                           "refused (a replayed or reordered frame)")
        self.seq = seq
        return inner
