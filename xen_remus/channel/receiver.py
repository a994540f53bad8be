"""The receiver (backup) end of the channel, sans-IO: the receiver drives it (the order of
its calls: ends.py, "Receiver")."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from xen_remus.channel import compress, mac, wire
from xen_remus.channel.ends import Config, End
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.negotiate import Accept, check_accept
from xen_remus.channel.pagecache import PageCache
from xen_remus.channel.stats import EpochStats
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.records import LIBXC, Record

# Room for the frames of one REMUS_DISK_BACK, under BACK_FRAME_MAX with name and MAC.
DISK_BACK_MAX = wire.BACK_FRAME_MAX - wire.DISK_NAME_SIZE - 256


class ReceiverChannel(End):
    def __init__(self, config: Config, now: float) -> None:
        super().__init__(config)
        self.offered = config.extensions()
        self._stats: deque[EpochStats] = deque(maxlen=64)  # figures from the primary
        self._decompressor: compress.Decompressor | None = None
        self._now = now
        self.accepted: Accept | None = None  # the sender's accept, with its generation
        # Sees the sender's accept once it took effect (the receiver's generation check,
        # receive/driver.py); raises a ChannelError to refuse the sender.
        self.on_accept: Callable[[Accept, str], None] | None = None
        # REMUS_DISK records go here as they arrive (vdev, frames, where): the receiver's
        # disk replicas (disk/backup.py), which hold them per epoch. What it returns goes
        # back to the primary (disk_back).
        self.on_disk: Callable[[str, memoryview, str], None] | None = None

    def offer_line(self) -> bytes:
        return self.offered.offer_line()

    def seen(self, now: float) -> None:
        self._now = now
        if self.detector is not None:
            self.detector.seen(now)

    def on_record(self, rec: Record, room: int | None = None) -> list[Buffer] | None:
        """``room``: the bytes the receiver can still hold (a compressed record that
        would expand to more is refused unexpanded)."""
        if not wire.is_ours(rec.rtype):
            if (self._decompressor is not None and rec.layer == LIBXC
                    and rec.rtype == C.REC_TYPE_PAGE_DATA):
                self._decompressor.observe(rec.parse())
            return None
        where = f"{wire.name(rec.rtype)} at offset {rec.offset} (epoch {rec.epoch})"
        if rec.layer != LIBXC:
            raise ChannelError(f"{where}: xen-remus record in the libxl layer")
        if rec.rtype == wire.REC_REMUS_ACCEPT:
            self._accept(rec, where)
            return []
        if self.agreed is None:
            raise ChannelError(f"{where}: before REMUS_ACCEPT")
        if rec.rtype == wire.REC_REMUS_PAGE_DATA_LZ4XOR:
            if self._decompressor is None:
                raise ChannelError(f"{where}: compression was not agreed")
            return self._decompressor.decode(rec.body, rec.epoch, rec.offset, room)
        if rec.rtype == wire.REC_REMUS_DISK:
            if not self.agreed.disk or self.on_disk is None:
                raise ChannelError(f"{where}: disk replication was not agreed")
            vdev, frames = wire.parse_disk(rec.body, where)
            self.on_disk(vdev, frames, where)
        elif rec.rtype == wire.REC_REMUS_HEARTBEAT:
            wire.parse_heartbeat(self._open(rec, where), where)
        elif rec.rtype == wire.REC_REMUS_EPOCH_STATS:
            self._stats.append(EpochStats.unpack(self._open(rec, where), where))
        else:
            raise ChannelError(f"{where}: not a record of this direction")
        return []

    def _open(self, rec: Record, where: str) -> bytes:
        body = bytes(rec.body)
        return body if self._opener is None else self._opener.open(rec.rtype, body, where)

    def _accept(self, rec: Record, where: str) -> None:
        if self.agreed is not None:
            raise ChannelError(f"{where}: second REMUS_ACCEPT")
        acc = Accept.parse(bytes(rec.body).decode("ascii", "replace"), where)
        ext = acc.ext
        check_accept(self.offered, acc, where)
        if ext.mac is not None:
            key = self.config.key if ext.psk else acc.key
            assert key is not None and acc.session is not None  # check_accept saw to it
            self._sealer, self._opener = mac.ends(key, acc.session, acc.generation, False)
        self.agreed = ext
        self.accepted = acc
        if ext.heartbeat is not None:
            self._start_heartbeats(ext.heartbeat, self._now)
        if ext.lz4_xor_mib is not None:
            self._decompressor = compress.Decompressor(PageCache.of_mib(ext.lz4_xor_mib))
        if self.on_accept is not None:
            self.on_accept(acc, where)

    def take_stats(self) -> list[EpochStats]:
        """The primary's per-epoch figures received since the last call (for the status
        file: StatusFile.epoch each)."""
        out = list(self._stats)
        self._stats.clear()
        return out

    def committed(self, epoch: int, now: float, commit_ms: float = 0.0) -> bytes:
        """The ACK of epoch ``epoch`` (b"" unless agreed)."""
        if self.agreed is None or not self.agreed.ack:
            return b""
        if self._timer is not None:
            self._timer.sent(now)
        return self._sealed(wire.REC_REMUS_ACK, wire.ack_body(epoch, int(commit_ms * 1000)))

    def pending(self, now: float) -> bytes:
        """A heartbeat, when one is due."""
        if self._timer is None or not self._timer.due(now):
            return b""
        return self._heartbeat(now)

    def disk_back(self, vdev: str, frames: list[bytes]) -> bytes:
        """REMUS_DISK_BACK frames carrying a replica's answers (replica frames, each whole
        in one back frame) to the primary's server of ``vdev``."""
        if self.agreed is None or not self.agreed.disk:
            raise ChannelError(f"disk {vdev}: answers for a disk, but disk replication was"
                               " not agreed")
        out: list[bytes] = []
        part: list[bytes] = []
        size = 0
        for f in [*frames, None]:
            if f is None or (part and size + len(f) > DISK_BACK_MAX):
                if part:
                    out.append(self._sealed(wire.REC_REMUS_DISK_BACK,
                                            wire.disk_body(vdev, b"".join(part))))
                part, size = [], 0
            if f is not None:
                if len(f) > DISK_BACK_MAX:
                    raise ChannelError(f"disk {vdev}: an answer of {len(f)} bytes exceeds"
                                       f" a back frame ({DISK_BACK_MAX})")
                part.append(f)
                size += len(f)
        return b"".join(out)

    def close(self, reason: str) -> bytes:
        """A frame telling the primary this backup stops (b"" with a stock sender)."""
        if self.agreed is None:
            return b""
        return self._sealed(wire.REC_REMUS_CLOSE, wire.close_body(reason))
