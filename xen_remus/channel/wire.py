"""Record types of our extensions and the framing of the back channel, sans-IO.

Forward (primary -> backup): our records are libxc records in the spec's optional range
(type bit 31 set: "may be ignored"), sent only after negotiation and only at libxc record
boundaries (pre-copy, or between libxl CHECKPOINT_END and the next libxc CHECKPOINT: where
the sender idles). Our receiver removes them before the sink, so stock libxl never sees one.

Back (backup -> primary, the receiver's stdout / the socket's other direction): after the
offer line, frames in the same shape as records (u32 type, u32 length, body, zero padding
to 8 octets; little-endian like libxc records), so one framing rule serves both ways.
Once mac is agreed, the control frames' bodies end in a MAC trailer (mac.py); the bodies
below are what is left once it is checked and stripped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xen_remus.channel.errors import ChannelError
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer

# 0x8058_52xx: optional (bit 31), "XR" for xen-remus; the low byte is ours to assign.
REC_REMUS_ACCEPT = 0x80585200  # fwd: extensions the sender accepted (text tokens)
REC_REMUS_HEARTBEAT = 0x80585201  # both: u64 sequence number
REC_REMUS_PAGE_DATA_LZ4XOR = 0x80585202  # fwd: PAGE_DATA as lz4 of an XOR delta
REC_REMUS_EPOCH_STATS = 0x80585203  # fwd: the sender's figures for one epoch
REC_REMUS_ACK = 0x80585204  # back: u64 epoch committed, u32 commit time in µs
REC_REMUS_CLOSE = 0x80585205  # back: the backup stops protecting (text reason)
REC_REMUS_DISK = 0x80585210  # fwd: a guest disk's replication frames (disk/replica.py)
REC_REMUS_DISK_BACK = 0x80585211  # back: a replica's answers to its disk (BASE, NEED)
# Reserved for more of the disk channel: 0x80585212-0x8058521f.

NAMES = {
    REC_REMUS_ACCEPT: "REMUS_ACCEPT",
    REC_REMUS_HEARTBEAT: "REMUS_HEARTBEAT",
    REC_REMUS_PAGE_DATA_LZ4XOR: "REMUS_PAGE_DATA_LZ4XOR",
    REC_REMUS_EPOCH_STATS: "REMUS_EPOCH_STATS",
    REC_REMUS_ACK: "REMUS_ACK",
    REC_REMUS_CLOSE: "REMUS_CLOSE",
    REC_REMUS_DISK: "REMUS_DISK",
    REC_REMUS_DISK_BACK: "REMUS_DISK_BACK",
}
OURS_MASK, OURS_BASE = 0xFFFFFF00, 0x80585200
BACK_FRAME_MAX = 4096  # no back-channel frame is larger; more means a desynchronised channel

_RH = struct.Struct("<II")
_HEARTBEAT = struct.Struct("<Q")
_ACK = struct.Struct("<QI4x")
_PAD = bytes(8)
DISK_NAME_SIZE = 16  # REMUS_DISK: the disk's vdev (e.g. b"xvda"), NUL-padded; frames follow
DISK_RECORD_MAX = 4 << 20  # frames are split over records of about this size


def is_ours(rtype: int) -> bool:
    return rtype & OURS_MASK == OURS_BASE


def name(rtype: int) -> str:
    return NAMES.get(rtype, f"REMUS_0x{rtype:08x}")


def frame(rtype: int, parts: list[Buffer]) -> list[Buffer]:
    """One record/frame: header, body parts, zero padding to 8 octets."""
    length = sum(len(p) for p in parts)
    if length > C.REC_LENGTH_MAX:
        raise ValueError(f"{name(rtype)}: body of {length} bytes exceeds REC_LENGTH_MAX")
    out: list[Buffer] = [_RH.pack(rtype, length), *(p for p in parts if len(p))]
    pad = C.pad8(length) - length
    if pad:
        out.append(_PAD[:pad])
    return out


def frame_bytes(rtype: int, body: bytes) -> bytes:
    return b"".join(bytes(p) for p in frame(rtype, [body]))


# The bodies of the control frames (with mac agreed, the channel ends seal them first).
def heartbeat_body(seq: int) -> bytes:
    return _HEARTBEAT.pack(seq)


def ack_body(epoch: int, commit_us: int) -> bytes:
    return _ACK.pack(epoch, min(max(commit_us, 0), 0xFFFFFFFF))


def close_body(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[:1024]


# The same frames unauthenticated (no mac agreed).
def heartbeat(seq: int) -> bytes:
    return frame_bytes(REC_REMUS_HEARTBEAT, heartbeat_body(seq))


def ack(epoch: int, commit_us: int) -> bytes:
    return frame_bytes(REC_REMUS_ACK, ack_body(epoch, commit_us))


def close(reason: str) -> bytes:
    return frame_bytes(REC_REMUS_CLOSE, close_body(reason))


def disk_bodies(vdev: str, frames: bytes, frame_ends: list[int]) -> list[list[Buffer]]:
    """Bodies of the REMUS_DISK records carrying ``frames`` of ``vdev``, cut only where a
    frame ends (``frame_ends``, ascending offsets in ``frames``), about DISK_RECORD_MAX
    each."""
    name_ = vdev.encode("ascii", "replace")
    if not 0 < len(name_) < DISK_NAME_SIZE:
        raise ValueError(f"REMUS_DISK: disk name {vdev!r} is not 1..15 ASCII bytes")
    head = name_.ljust(DISK_NAME_SIZE, b"\0")
    out: list[list[Buffer]] = []
    start = 0
    for end in frame_ends:
        if end - start >= DISK_RECORD_MAX or end >= len(frames):
            out.append([head, memoryview(frames)[start:end]])
            start = end
    if start < len(frames):
        out.append([head, memoryview(frames)[start:]])
    return out


def disk_body(vdev: str, frames: bytes) -> bytes:
    """One REMUS_DISK_BACK body (the same shape as REMUS_DISK's)."""
    name_ = vdev.encode("ascii", "replace")
    if not 0 < len(name_) < DISK_NAME_SIZE:
        raise ValueError(f"REMUS_DISK_BACK: disk name {vdev!r} is not 1..15 ASCII bytes")
    return name_.ljust(DISK_NAME_SIZE, b"\0") + frames


def parse_disk(body: Buffer, where: str) -> tuple[str, memoryview]:
    """The vdev and the frames of a REMUS_DISK (or REMUS_DISK_BACK) body."""
    view = memoryview(body).cast("B")
    name_ = bytes(view[:DISK_NAME_SIZE]).rstrip(b"\0")
    if len(view) < DISK_NAME_SIZE or not name_ or not name_.isascii() or b"\0" in name_:
        raise ChannelError(f"{where}: REMUS_DISK without a disk name")
    return name_.decode("ascii"), view[DISK_NAME_SIZE:]


@dataclass(frozen=True)
class Frame:
    """A whole back-channel frame; ``offset`` is where it starts on that channel."""

    rtype: int
    body: bytes
    offset: int


def parse_heartbeat(body: Buffer, where: str) -> int:
    if len(body) != _HEARTBEAT.size:
        raise ChannelError(f"{where}: REMUS_HEARTBEAT body of {len(body)} bytes, expected 8")
    return int(_HEARTBEAT.unpack_from(body)[0])


def parse_ack(body: Buffer, where: str) -> tuple[int, int]:
    if len(body) != _ACK.size:
        raise ChannelError(f"{where}: REMUS_ACK body of {len(body)} bytes, expected 16")
    epoch, commit_us = _ACK.unpack_from(body)
    return int(epoch), int(commit_us)


class FrameDecoder:
    """Splits back-channel bytes (any chunking) into frames; only our types are valid."""

    def __init__(self, channel: str, offset: int = 0) -> None:
        self.channel = channel
        self.offset = offset  # of the next frame
        self._buf = bytearray()

    def feed(self, data: Buffer) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= _RH.size:
            rtype, length = _RH.unpack_from(self._buf)
            if not is_ours(rtype) or length > BACK_FRAME_MAX:
                raise ChannelError(f"{self.channel}: bad frame header at offset {self.offset}"
                                   f" (type 0x{rtype:08x}, length {length})")
            total = _RH.size + C.pad8(length)
            if len(self._buf) < total:
                break
            body = bytes(self._buf[_RH.size:_RH.size + length])
            if any(self._buf[_RH.size + length:total]):
                raise ChannelError(f"{self.channel}: {name(rtype)} at offset {self.offset}: "
                                   "padding not zero")
            out.append(Frame(rtype, body, self.offset))
            del self._buf[:total]
            self.offset += total
        return out

    def eof(self) -> None:
        if self._buf:
            raise ChannelError(f"{self.channel}: truncated frame at offset {self.offset} "
                               f"({len(self._buf)} bytes)")
