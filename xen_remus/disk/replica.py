"""The disk replication stream, sans-IO: frames, the primary's log, the backup's reader.

Primary -> backup: W(epoch, offset, data) for every completed guest write, in the order
the writes reached the image, and SEAL(epoch) when the epoch loop seals that epoch (the
guest is suspended). Backup -> primary: ACK(epoch) once SEAL(epoch) and every write before
it are in the backup's store ("disk sealed through epoch"); the primary then no longer
counts those bytes as unacknowledged.

The initial synchronisation (sync.py) precedes the first SEAL, in the same stream:
BEGIN (the primary's dirty-bitmap base), answered by BASE (whether the replica is still at
that base); then either CHUNKs of the dirty blocks, or SUMS (chunk hashes) each answered
by NEED (which of those chunks differ) and the CHUNKs asked for; SYNCED ends it. Until
SYNCED the backup writes everything (CHUNK and W) straight into its replica, in stream
order: it holds no checkpoint yet, so there is nothing to keep apart. The epoch loop's
requests to the server (it relays the stream) use the same frames: SEAL(N) asks for the
seal of N, START(0, offset=generation) opens a protection. CONTROL(0, offset=generation)
opens a second connection of that protection, for the seals alone: there SEAL(N) asks
for the seal of N and the server answers SEAL(N) once it is done, ahead of the stream,
whose SEAL(N) may wait behind many writes.

A frame (big-endian) is a 36-byte header, then ``length`` bytes of data (W only)::

    u32 magic "XRDK"  u8 type  u8 flags (0)  u16 reserved (0)  u64 epoch  u64 offset
    u32 length  u32 crc32(data)  u32 crc32(the 32 header bytes before it)

The header has its own CRC so that a damaged length is caught before its data is awaited.
The decoder takes any chunking and names the stream offset of a bad frame; a frame cut
short by EOF (the primary died mid-frame) is simply never delivered.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from xen_remus.disk.errors import DiskError, ReplicaStreamError
from xen_remus.disk.store import EpochStore

if TYPE_CHECKING:
    from xen_remus.disk.sync import ReplicaSync

MAGIC: Final = 0x5852444B  # "XRDK"
W: Final = 1
SEAL: Final = 2
ACK: Final = 3
BEGIN: Final = 4  # fwd: data is a sync.Begin
BASE: Final = 5  # back: offset 1 if the replica is at BEGIN's base (dirty blocks only)
SUMS: Final = 6  # fwd: SHA-256 of consecutive chunks from offset
NEED: Final = 7  # back: bitmap of the SUMS at offset whose chunks differ
CHUNK: Final = 8  # fwd: image data at offset (synchronisation; W is a guest write)
SYNCED: Final = 9  # fwd: the synchronisation is complete (offset: bytes sent)
START: Final = 10  # epoch loop -> server: protection begins (offset: its generation)
CONTROL: Final = 11  # epoch loop -> server: its seal connection (offset: the generation)
FRAME_NAMES: Final = {W: "W", SEAL: "SEAL", ACK: "ACK", BEGIN: "BEGIN", BASE: "BASE",
                      SUMS: "SUMS", NEED: "NEED", CHUNK: "CHUNK", SYNCED: "SYNCED",
                      START: "START", CONTROL: "CONTROL"}
WITH_DATA: Final = frozenset({W, BEGIN, SUMS, NEED, CHUNK})  # the others carry none
SYNC_FRAMES: Final = frozenset({BEGIN, SUMS, CHUNK, SYNCED})  # fwd, to sync.ReplicaSync
MAX_DATA: Final = 64 * 1024 * 1024  # a W carries one NBD write (at most 32 MiB)
#: Unacknowledged bytes (frames sent, not yet covered by an ACK) at which the primary's
#: server stops taking guest requests.
DEFAULT_CAP: Final = 256 * 1024 * 1024

_HEAD = struct.Struct(">IBBHQQII")  # through the data CRC; the header CRC follows
_CRC = struct.Struct(">I")
HEADER_SIZE: Final = _HEAD.size + _CRC.size  # 36


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    epoch: int
    offset: int
    data: bytes
    at: int  # stream offset of the frame's first byte

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.kind, str(self.kind))


def _header(kind: int, epoch: int, offset: int, data: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, kind, 0, 0, epoch, offset, len(data), zlib.crc32(data))
    return head + _CRC.pack(zlib.crc32(head))


def write_frame(epoch: int, offset: int, data: bytes) -> tuple[bytes, bytes]:
    """Header and data of W (two buffers, for writelines without a copy)."""
    if len(data) > MAX_DATA:
        raise DiskError(f"disk replication: a write of {len(data)} bytes at {offset} exceeds"
                        f" the frame limit {MAX_DATA}")
    return _header(W, epoch, offset, data), data


def seal_frame(epoch: int) -> bytes:
    return _header(SEAL, epoch, 0, b"")


def frame_bytes(kind: int, epoch: int, offset: int, data: bytes = b"") -> bytes:
    """Any frame, whole (the synchronisation's and the control frames)."""
    return _header(kind, epoch, offset, data) + data


def ack_frame(epoch: int) -> bytes:
    return _header(ACK, epoch, 0, b"")


class FrameDecoder:
    """Frames out of bytes of any chunking; raises ReplicaStreamError on a bad frame."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._error: ReplicaStreamError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet part of a delivered frame."""
        return self._base

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (what EOF would cut off)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[Frame] = []
        pos = 0
        try:
            while len(self._buf) - pos >= HEADER_SIZE:
                frame = self._frame(pos)
                if frame is None:
                    break
                out.append(frame)
                pos += HEADER_SIZE + len(frame.data)
        finally:
            del self._buf[:pos]
            self._base += pos
        return out

    def _fail(self, message: str, at: int, epoch: int | None = None) -> ReplicaStreamError:
        self._error = ReplicaStreamError(message, at, epoch)
        return self._error

    def _frame(self, pos: int) -> Frame | None:
        at = self._base + pos
        magic, kind, flags, reserved, epoch, offset, length, dcrc = _HEAD.unpack_from(
            self._buf, pos)
        (hcrc,) = _CRC.unpack_from(self._buf, pos + _HEAD.size)
        if magic != MAGIC:
            raise self._fail(f"bad frame magic 0x{magic:08x} (want 0x{MAGIC:08x})", at)
        with memoryview(self._buf) as mv:
            got = zlib.crc32(mv[pos:pos + _HEAD.size])
        if got != hcrc:
            raise self._fail(f"frame header CRC 0x{got:08x} != 0x{hcrc:08x}", at)
        if kind not in FRAME_NAMES or flags or reserved:
            raise self._fail(f"unknown frame type {kind} (flags {flags}, reserved"
                             f" {reserved})", at, epoch)
        if length > MAX_DATA or (kind not in WITH_DATA and length):
            raise self._fail(f"{FRAME_NAMES[kind]} frame with {length} data bytes", at, epoch)
        if len(self._buf) - pos < HEADER_SIZE + length:
            return None
        start = pos + HEADER_SIZE
        with memoryview(self._buf) as mv:
            data = bytes(mv[start:start + length])
        if zlib.crc32(data) != dcrc:
            raise self._fail(f"{FRAME_NAMES[kind]} data CRC mismatch (offset {offset},"
                             f" {length} bytes)", at, epoch)
        return Frame(kind, epoch, offset, data, at)


class PrimaryLog:
    """The primary's side: frames to send, and the bytes the backup has not yet ACKed."""

    def __init__(self, first_epoch: int = 0, cap: int = DEFAULT_CAP) -> None:
        self.epoch = first_epoch  # the open epoch: the next SEAL closes it
        self.cap = cap
        self.acked_through = first_epoch - 1
        self._unacked: dict[int, int] = {}  # epoch -> bytes sent, not yet ACKed
        self.unacked = 0

    @property
    def full(self) -> bool:
        """At the cap: the server must stop taking guest requests until an ACK."""
        return self.unacked >= self.cap

    def write(self, epoch: int, offset: int, data: bytes) -> tuple[bytes, bytes]:
        if epoch != self.epoch:
            raise DiskError(f"disk replication: write at {offset} labelled epoch {epoch},"
                            f" but epoch {self.epoch} is open")
        frame = write_frame(epoch, offset, data)
        n = HEADER_SIZE + len(data)
        self._unacked[epoch] = self._unacked.get(epoch, 0) + n
        self.unacked += n
        return frame

    def seal(self, epoch: int) -> bytes:
        if epoch != self.epoch:
            raise DiskError(f"disk replication: SEAL({epoch}) while epoch {self.epoch} is"
                            " open")
        self.epoch += 1
        self._unacked[epoch] = self._unacked.get(epoch, 0) + HEADER_SIZE
        self.unacked += HEADER_SIZE
        return seal_frame(epoch)

    def ack(self, epoch: int) -> None:
        """The backup holds every epoch through ``epoch``; earlier or repeated ACKs are no-ops."""
        if epoch >= self.epoch:
            raise DiskError(f"disk replication: ACK({epoch}) for an epoch not sealed (open"
                            f" epoch {self.epoch})")
        if epoch <= self.acked_through:
            return
        for e in [e for e in self._unacked if e <= epoch]:
            self.unacked -= self._unacked.pop(e)
        self.acked_through = epoch


class AckReader:
    """The primary reading what comes back: ACKs (returned by ``feed``) and the backup's
    synchronisation answers (BASE, NEED), collected in ``requests``. With ``from_loop``
    the peer is the epoch loop (the protect process relays the stream): its SEAL(N) frames
    ask the server to seal epoch N and START opens a protection; they join ``requests``
    too. Any other frame is refused."""

    def __init__(self, from_loop: bool = False) -> None:
        self._dec = FrameDecoder()
        self._allowed = {BASE, NEED} | ({SEAL, START} if from_loop else set())
        self.requests: list[Frame] = []

    def feed(self, data: bytes) -> list[int]:
        acks = []
        for f in self._dec.feed(data):
            if f.kind == ACK:
                acks.append(f.epoch)
            elif f.kind in self._allowed:
                self.requests.append(f)
            else:
                raise ReplicaStreamError(f"{f.name} frame from the backup (only ACK, BASE"
                                         " and NEED come back)", f.at, f.epoch)
        return acks


class BackupStream:
    """The backup's reader: frames into the epoch store (the synchronisation's through
    ``sync``); returns the bytes to send back (ACKs unless ``acks`` is False, and the
    synchronisation's answers)."""

    def __init__(self, store: EpochStore, sync: ReplicaSync | None = None,
                 acks: bool = True) -> None:
        from xen_remus.disk.sync import ReplicaSync  # sync.py builds on these frames
        self.store = store
        self.sync = sync if sync is not None else ReplicaSync(store)
        self._acks = acks
        self._dec = FrameDecoder()
        self.frames = 0

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not complete (dropped if the stream ends now)."""
        return self._dec.pending

    @property
    def offset(self) -> int:
        return self._dec.offset

    def feed(self, data: bytes) -> bytes:
        out = []
        sync = self.sync
        for f in self._dec.feed(data):
            self.frames += 1
            try:
                if f.kind == W:
                    if sync.active:  # nothing to hold apart yet: straight into the image
                        sync.through(f.epoch, f.offset, f.data)
                    else:
                        self.store.write(f.epoch, f.offset, f.data)
                elif f.kind == SEAL:
                    sync.seal()
                    self.store.seal(f.epoch)
                    if self._acks:
                        out.append(ack_frame(f.epoch))
                elif f.kind in SYNC_FRAMES:
                    reply = sync.frame(f)
                    if reply:
                        out.append(reply)
                else:
                    raise DiskError(f"{f.name} frame from the primary (it goes the other"
                                    " way)")
            except DiskError as exc:
                raise ReplicaStreamError(f"{f.name} frame refused: {exc}", f.at,
                                         f.epoch) from exc
        return b"".join(out)

