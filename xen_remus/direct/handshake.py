"""The direct transport's mutual authentication under a pre-shared key, sans-IO.

Why: with `protect --tcp` no ssh stands between the hosts, so the backup must refuse a
peer that does not know the key before it starts a receiver (and the primary must not
send guest memory to a listener that does not know it). Four fixed-size messages, the
primary (the connecting end) first:

  1. primary -> backup  HELLO:  MAGIC, u16 version, 32-octet nonce Np
  2. backup -> primary  HELLO:  MAGIC, u16 version, 32-octet nonce Nb,
                                proof Pb = HMAC(K, "backup" label, version, Np, Nb)
  3. primary -> backup  FINISH: u8 1 and proof Pp = HMAC(K, "primary" label, version,
                                Np, Nb); or u8 0 and 32 zero octets: "your proof failed"
  4. backup -> primary  VERDICT: u8 1 (accepted) or 0 (refused)

Each end proves knowledge of K over a nonce the other just chose, so a recorded exchange
replayed to either end does not verify; the role labels keep one end's proof from being
reflected back as the other's. Tags are compared in constant time. After the verdict both
ends hold the session key HMAC(K, "session" label, version, Np, Nb): the channel's MAC key
for the control frames (channel/mac.py, as a pre-shared key), fresh per connection and
unknown to anyone who relayed the handshake without K. Nothing is encrypted: the stream
that follows is readable on the wire (README, "Split brain and fencing").
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from xen_remus.errors import XenRemusError

VERSION = 1
MAGIC = b"XRDIRECT"
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256, whole
_HEAD = struct.Struct("!8sH")  # magic, version
PRIMARY_HELLO_SIZE = _HEAD.size + NONCE_SIZE
BACKUP_HELLO_SIZE = _HEAD.size + NONCE_SIZE + PROOF_SIZE
FINISH_SIZE = 1 + PROOF_SIZE
VERDICT_SIZE = 1
_LABEL = {"primary": b"xen-remus direct primary proof\0",
          "backup": b"xen-remus direct backup proof\0",
          "session": b"xen-remus direct session key\0"}


class HandshakeRefused(XenRemusError):
    """The peer is not authenticated (or refused us): the connection must be dropped."""


def _mac(key: bytes, label: str, version: int, primary_nonce: bytes,
         backup_nonce: bytes) -> bytes:
    m = hmac.new(key, _LABEL[label], hashlib.sha256)
    m.update(struct.pack("!H", version))
    m.update(primary_nonce)
    m.update(backup_nonce)
    return m.digest()


def _head(data: bytes, size: int, who: str) -> bytes:
    """The nonce (and what follows) of a HELLO, its magic and version checked."""
    if len(data) != size:
        raise HandshakeRefused(f"{who}'s hello: {len(data)} bytes, expected {size}")
    magic, version = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise HandshakeRefused(f"{who}'s hello: magic {magic!r} at offset 0, expected "
                               f"{MAGIC!r} (not a xen-remus direct transport)")
    if version != VERSION:
        raise HandshakeRefused(f"{who} speaks version {version} of the direct transport, "
                               f"this end {VERSION}")
    return data[_HEAD.size:]


class Primary:
    """The connecting end's side: ``hello()``, then ``finish(backup's hello)``, then
    ``verdict(byte)``; ``session_key`` is set once the backup accepted."""

    def __init__(self, key: bytes, nonce: bytes | None = None) -> None:
        self._key = key
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._backup_nonce: bytes | None = None
        self.session_key: bytes | None = None

    def hello(self) -> bytes:
        return _HEAD.pack(MAGIC, VERSION) + self.nonce

    def finish(self, backup_hello: bytes) -> tuple[bytes, HandshakeRefused | None]:
        """Our FINISH; with an error if the backup's proof fails (send the FINISH, which
        then says so, and drop the connection)."""
        rest = _head(backup_hello, BACKUP_HELLO_SIZE, "the backup")
        nonce, proof = rest[:NONCE_SIZE], rest[NONCE_SIZE:]
        if nonce == self.nonce:
            return bytes(FINISH_SIZE), HandshakeRefused(
                "the backup sent our own nonce back (a reflection): refused")
        want = _mac(self._key, "backup", VERSION, self.nonce, nonce)
        if not hmac.compare_digest(proof, want):
            return bytes(FINISH_SIZE), HandshakeRefused(
                "the backup's proof does not verify under our key: the two hosts have "
                "different --key-file keys (or this is not our backup, or a replayed "
                "answer): refused before anything was sent")
        self._backup_nonce = nonce
        return b"\1" + _mac(self._key, "primary", VERSION, self.nonce, nonce), None

    def verdict(self, data: bytes) -> bytes:
        """The session key once the backup accepted our proof; HandshakeRefused if not."""
        if self._backup_nonce is None:
            raise HandshakeRefused("verdict before the backup proved itself")
        if data != b"\1":
            raise HandshakeRefused("the backup refused our proof: the two hosts have "
                                   "different --key-file keys")
        self.session_key = _mac(self._key, "session", VERSION, self.nonce,
                                self._backup_nonce)
        return self.session_key


class Backup:
    """The listening end's side: ``hello(primary's hello)``, then ``verdict(FINISH)``."""

    def __init__(self, key: bytes, nonce: bytes | None = None) -> None:
        self._key = key
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._primary_nonce: bytes | None = None
        self.session_key: bytes | None = None

    def hello(self, primary_hello: bytes) -> bytes:
        """Our HELLO (with our proof) for the primary's; HandshakeRefused if it is none."""
        nonce = _head(primary_hello, PRIMARY_HELLO_SIZE, "the peer")
        if nonce == self.nonce:
            raise HandshakeRefused("the peer sent our own nonce (a reflection): refused")
        self._primary_nonce = nonce
        return (_HEAD.pack(MAGIC, VERSION) + self.nonce
                + _mac(self._key, "backup", VERSION, nonce, self.nonce))

    def verdict(self, finish: bytes) -> tuple[bytes, HandshakeRefused | None]:
        """Our VERDICT for the primary's FINISH, with an error if it is refused (send the
        verdict, then drop the connection); ``session_key`` is set if accepted."""
        if self._primary_nonce is None or len(finish) != FINISH_SIZE:
            return b"\0", HandshakeRefused(f"the peer's finish: {len(finish)} bytes, "
                                           f"expected {FINISH_SIZE}")
        if finish[0] != 1:
            return b"\0", HandshakeRefused(
                "the peer refused our proof: it has a different key (--key-file)")
        want = _mac(self._key, "primary", VERSION, self._primary_nonce, self.nonce)
        if not hmac.compare_digest(finish[1:], want):
            return b"\0", HandshakeRefused(
                "the peer's proof does not verify under our key: a different --key-file "
                "key, or a replayed handshake")
        self.session_key = _mac(self._key, "session", VERSION, self._primary_nonce,
                                self.nonce)
        return b"\1", None
