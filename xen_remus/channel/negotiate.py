"""Negotiation between our two ends, invisible to stock xl.

Why the receiver offers and the sender answers in-band (tools/xl/xl_migrate.c):
- A stock sender reads exactly the banner's bytes (migrate_read_fixedmessage), then, for a
  plain migration, exactly the READY message after the stream; for `xl remus` (stream type
  REMUS) it never reads the receiver's channel again (libxl uses it only for COLO).
- A stock receiver reads an xl header straight after writing its banner; any other byte
  there is "wrong magic".
So only a receiver in checkpointed mode (`-r`) may say more: it writes its OFFER line
right after the banner, where a stock `xl remus` leaves it unread in the pipe. Nothing
else goes that way until the sender accepts, so a stock sender's pipe never fills. Our
sender answers with a REMUS_ACCEPT record in the stream (an optional libxc record, at the
next record boundary, before any other record of ours); from then on both ends use what
it names. A plain receive never offers, a sender that saw no offer never accepts: with a
stock peer in either direction the wire carries exactly the standard bytes.

Syntax (ASCII, space-separated tokens; unknown tokens are ignored, so new extensions such
as ``disk=...`` can be offered to old senders):
  OFFER  = "xen-remus-ext offer version=1 ack heartbeat=250:1000 lz4-xor=256\\n"
  ACCEPT = "version=1 ack heartbeat=250:1000 lz4-xor=256"   (body of REMUS_ACCEPT)
heartbeat=INTERVAL_MS:TIMEOUT_MS (each end sends something at least every interval and
declares its peer dead after timeout of silence); lz4-xor=CACHE_MIB (the last-sent page
cache, the same size at both ends since their eviction must agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xen_remus.channel.errors import ChannelError

OFFER_PREFIX = b"xen-remus-ext offer "
OFFER_LINE_MAX = 512
VERSION = 1
HEARTBEAT_TIMEOUT_MS = 1000  # the legacy Remus HEARTBEAT_MS
CACHE_MIB = 256
_LIMITS = {"interval": (1, 60_000), "timeout": (10, 600_000), "cache": (1, 1 << 20)}


@dataclass(frozen=True)
class Extensions:
    """What one end proposes (offer), wants (sender config) or what was agreed (accept).

    ``heartbeat`` is (interval_ms, timeout_ms) or None; ``lz4_xor_mib`` the cache size or
    None; ``other`` keeps tokens this version does not know (offered by a newer peer).
    """

    version: int = VERSION
    ack: bool = True
    heartbeat: tuple[int, int] | None = (HEARTBEAT_TIMEOUT_MS // 4, HEARTBEAT_TIMEOUT_MS)
    lz4_xor_mib: int | None = CACHE_MIB
    other: tuple[str, ...] = field(default=())
    disk: bool = False  # REMUS_DISK records: the guest's disks, sealed per checkpoint

    def tokens(self) -> str:
        out = [f"version={self.version}"]
        if self.ack:
            out.append("ack")
        if self.heartbeat is not None:
            out.append(f"heartbeat={self.heartbeat[0]}:{self.heartbeat[1]}")
        if self.lz4_xor_mib is not None:
            out.append(f"lz4-xor={self.lz4_xor_mib}")
        if self.disk:
            out.append("disk")
        return " ".join(out)

    def offer_line(self) -> bytes:
        return OFFER_PREFIX + self.tokens().encode() + b"\n"

    @classmethod
    def parse(cls, text: str, what: str) -> Extensions:
        version, ack, hb, lz, disk, other = 0, False, None, None, False, []
        for tok in text.split():
            key, _, val = tok.partition("=")
            try:
                if key == "version":
                    version = int(val)
                elif key == "ack" and not val:
                    ack = True
                elif key == "heartbeat":
                    i, t = val.split(":")
                    hb = (_ranged(int(i), "interval"), _ranged(int(t), "timeout"))
                    if hb[0] >= hb[1]:
                        raise ValueError("interval must be below the timeout")
                elif key == "lz4-xor":
                    lz = _ranged(int(val), "cache")
                elif key == "disk" and not val:
                    disk = True
                else:
                    other.append(tok)
            except ValueError as exc:
                raise ChannelError(f"{what}: bad token {tok!r}: {exc}") from None
        if version < 1:
            raise ChannelError(f"{what}: no version token in {text!r}")
        return cls(version, ack, hb, lz, tuple(other), disk)

    def agree(self, offer: Extensions) -> Extensions:
        """The sender's choice (self = its wishes) given the receiver's offer: what both
        support; heartbeats at the faster interval and the more lenient timeout (neither
        end then declares a live peer dead); compression with the smaller cache."""
        hb = None
        if self.heartbeat and offer.heartbeat:
            hb = (min(self.heartbeat[0], offer.heartbeat[0]),
                  max(self.heartbeat[1], offer.heartbeat[1]))
        lz = None
        if self.lz4_xor_mib and offer.lz4_xor_mib:
            lz = min(self.lz4_xor_mib, offer.lz4_xor_mib)
        return Extensions(min(self.version, offer.version), self.ack and offer.ack, hb, lz,
                          disk=self.disk and offer.disk)


def _ranged(v: int, what: str) -> int:
    lo, hi = _LIMITS[what]
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} outside {lo}..{hi}")
    return v


class OfferReader:
    """The sender's view of the receiver's channel after the banner: one offer line or
    nothing. Feed it bytes; ``offer`` is set once the line is whole, and the bytes after
    it (back-channel frames) are returned by ``feed``."""

    def __init__(self) -> None:
        self.offer: Extensions | None = None
        self.length = 0  # bytes of the line, once read
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        if self.offer is not None:
            return data
        self._buf += data
        head = bytes(self._buf[:len(OFFER_PREFIX)])
        if head != OFFER_PREFIX[:len(head)]:
            raise ChannelError(f"receiver channel after the banner (offset 0): expected the "
                               f"xen-remus offer line, got {head!r}")
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > OFFER_LINE_MAX:
                raise ChannelError(f"receiver channel: offer line longer than "
                                   f"{OFFER_LINE_MAX} bytes")
            return b""
        line = bytes(self._buf[len(OFFER_PREFIX):nl]).decode("ascii", "replace")
        self.offer = Extensions.parse(line, "offer line")
        self.length = nl + 1
        rest = bytes(self._buf[nl + 1:])
        self._buf.clear()
        return rest
