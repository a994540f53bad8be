"""The two ends of the channel, sans-IO: the save engine drives a SenderChannel, the
receiver a ReceiverChannel. They take bytes, records and times, and return bytes to write
and events; the callers own the file descriptors and the clock (time.monotonic()).

Sender (primary), in order:
  1. After xlproto.SenderSide has matched the banner (exactly len(BANNER) bytes of the
     receiver's channel), feed every further byte of that channel to ``feed_back``.
     A stock receiver sends none: the channel stays ``agreed is None``, standard bytes.
  2. Send every PAGE_DATA through ``page_records`` (standard, or compressed once agreed).
  3. At libxc record boundaries where it has nothing else to send (waiting for the ACK or
     the interval; never between libxc CHECKPOINT and libxl CHECKPOINT_END) write
     ``pending(now)``: the accept, queued stats, a heartbeat when due.
  4. After the last record of epoch N went out: ``epoch_sent(N, ...)``; wait for
     Acked(N) from ``feed_back`` (if ``agreed.ack``), ``peer_dead(now)`` meaning the
     backup is lost; ``wake_at()`` bounds each wait. The ACK of N may come back before
     ``epoch_sent(N)`` (a fast backup, or a reader thread): ``epoch_sent`` then returns
     None and the Acked waits in ``take_early()``. Later epochs may be sent before N's
     ACK came (pipelined epochs, ``awaiting``); their ACKs must come in epoch order.
Receiver (backup):
  1. With -r, write ``offer_line()`` right after the banner (one write with it).
  2. ``seen(now)`` for every chunk from the sender; pass every decoded Record to
     ``on_record``: None = forward its wire bytes as they are, else forward the returned
     buffers instead (our records vanish, compressed pages become standard PAGE_DATA).
  3. After the sink has epoch N whole: write ``committed(N, now)`` (the ACK); write
     ``pending(now)`` whenever woken; ``peer_dead(now)`` means fail over now.
  ``on_record`` raises ChannelError / CompressionError (XenRemusError, naming record,
  offset, epoch, pfn) for a bad record of ours: treat it as an invalid stream (fail over
  from the last whole epoch), like the decoder's StreamError.
Authentication (``Config.mac``, mac.py): the receiver offers mac=hmac-sha256 and then
requires it; the sender requires it of a xen-remus receiver. Once agreed, every control
frame is sealed on its way out and checked on its way in; a frame that fails is a MacError
(a ChannelError naming the frame, its offset and epoch) and is never acted on.
link.py wraps both ends around file descriptors (SenderLink: send, send_pages,
epoch_sent, wait_ack, idle, a heartbeat thread; ReceiverLink: tick, committed, timeout).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xen_remus.channel import compress, mac, wire
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.heartbeat import FailureDetector, HeartbeatTimer
from xen_remus.channel.negotiate import (
    HEARTBEAT_TIMEOUT_MS,
    Accept,
    Extensions,
    OfferReader,
    agree,
    check_accept,
)
from xen_remus.channel.pagecache import PageCache
from xen_remus.channel.stats import EpochStats
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import PageData
from xen_remus.stream.records import LIBXC, Record


@dataclass(frozen=True)
class Config:
    """One end's wishes. ``compression`` False is `-u`."""

    ack: bool = True
    heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS
    heartbeat_interval_ms: int | None = None  # default: a quarter of the timeout
    compression: bool = True
    cache_mib: int = 256
    initial_grace_ms: int = 0  # extra silence allowed before the first ACK (see _accept)
    disk: bool = False  # sender: it has disks to replicate; receiver: it takes them
    # Authenticated control frames, required of the peer (the commands always ask for
    # them; off here only so that the protocol tests can speak the older plain frames).
    mac: bool = False
    key: bytes | None = None  # pre-shared (--key-file); else the sender makes one
    generation: int | None = None  # sender: this protection's (generation.py)
    fence: bool = False  # receiver: it fences the primary before a failover (--fence)

    def extensions(self) -> Extensions:
        t = self.heartbeat_timeout_ms
        i = self.heartbeat_interval_ms or max(1, t // 4)
        return Extensions(ack=self.ack, heartbeat=(i, t),
                          lz4_xor_mib=self.cache_mib if self.compression else None,
                          disk=self.disk, mac=mac.ALGORITHM if self.mac else None,
                          psk=self.mac and self.key is not None, fence=self.fence)


def _sealed(sealer: mac.Sealer | None, rtype: int, body: bytes) -> bytes:
    """One control frame, with its MAC trailer once mac is agreed."""
    return wire.frame_bytes(rtype, body if sealer is None else sealer.seal(rtype, body))


# Events of the back channel, as the sender sees them.
@dataclass(frozen=True)
class Offered:
    offer: Extensions


@dataclass(frozen=True)
class Acked:
    epoch: int
    stats: EpochStats  # complete, with ack_ms
    commit_ms: float  # the backup's own time to commit


@dataclass(frozen=True)
class Closed:
    reason: str


@dataclass(frozen=True)
class DiskBack:
    """A replica's answer to its disk's server (disk/sync.py), to relay as it is."""

    vdev: str
    frames: bytes


BackEvent = Offered | Acked | Closed | DiskBack
# Room for the frames of one REMUS_DISK_BACK, under BACK_FRAME_MAX with name and MAC.
DISK_BACK_MAX = wire.BACK_FRAME_MAX - wire.DISK_NAME_SIZE - 256


class SenderChannel:
    def __init__(self, config: Config, now: float) -> None:
        self.config = config
        self.agreed: Extensions | None = None
        self.detector: FailureDetector | None = None
        self.acked: int | None = None
        self.last_sent_epoch: int | None = None
        self._offer = OfferReader()
        self._frames = wire.FrameDecoder("receiver channel (after the banner)")
        self._accept_due: Extensions | None = None
        self._timer: HeartbeatTimer | None = None
        self._compressor: compress.Compressor | None = None
        self._std_page_sent = False
        self._unacked: dict[int, tuple[float, EpochStats]] = {}
        # ACK of the epoch still being written: (epoch, commit_us), settled by epoch_sent
        self._early: tuple[int, int] | None = None
        self._early_acked: list[Acked] = []
        self._stats_out: deque[EpochStats] = deque(maxlen=64)
        self._raw = self._wire = 0
        self._sealer: mac.Sealer | None = None  # forward frames, once mac is agreed
        self._opener: mac.Opener | None = None  # back frames

    @property
    def agreement(self) -> Extensions | None:
        """What was agreed, as soon as the offer came (``agreed`` only once our accept
        is sent)."""
        return self.agreed if self.agreed is not None else self._accept_due

    # -- back channel -----------------------------------------------------------

    def feed_back(self, data: bytes, now: float) -> list[BackEvent]:
        out: list[BackEvent] = []
        if not data:
            return out
        if self.detector is not None:
            self.detector.seen(now)
        if self._offer.offer is None:
            data = self._offer.feed(data)
            if self._offer.offer is None:
                return out
            self._frames.offset = self._offer.length
            self._accept_due = agree(self.config.extensions(), self._offer.offer,
                                     "the backup's offer line")
            out.append(Offered(self._offer.offer))
        for fr in self._frames.feed(data):
            where = (f"receiver channel (after the banner), {wire.name(fr.rtype)} at offset "
                     f"{fr.offset}")
            if self.agreed is None:
                raise ChannelError(f"{where}: frame before our accept")
            body = fr.body
            if self._opener is not None:
                body = self._opener.open(fr.rtype, body, f"{where} (epoch {self._epoch()})")
            if fr.rtype == wire.REC_REMUS_ACK:
                acked = self._ack(*wire.parse_ack(body, where), now, where)
                if acked is not None:
                    out.append(acked)
            elif fr.rtype == wire.REC_REMUS_HEARTBEAT:
                wire.parse_heartbeat(body, where)
            elif fr.rtype == wire.REC_REMUS_CLOSE:
                out.append(Closed(body.decode("utf-8", "replace")))
            elif fr.rtype == wire.REC_REMUS_DISK_BACK:
                if not self.agreed.disk:
                    raise ChannelError(f"{where}: disk replication was not agreed")
                vdev, frames = wire.parse_disk(body, where)
                out.append(DiskBack(vdev, bytes(frames)))
            else:
                raise ChannelError(f"{where}: not a frame of this direction")
        return out

    def _epoch(self) -> int:
        """The epoch a back frame arrives in: the oldest awaiting its ACK, else the next."""
        in_flight = 0 if self.last_sent_epoch is None else self.last_sent_epoch + 1
        return min(self._unacked, default=in_flight)

    def _ack(self, epoch: int, commit_us: int, now: float, where: str) -> Acked | None:
        if not self.agreed or not self.agreed.ack:
            raise ChannelError(f"{where}: ACK was not agreed")
        in_flight = 0 if self.last_sent_epoch is None else self.last_sent_epoch + 1
        if epoch == in_flight and self._early is None and not self._unacked:
            # Its last bytes are out but epoch_sent() has not been called yet.
            self._early = (epoch, commit_us)
            return None
        # Several epochs may await their ACK (pipelined epochs); the backup commits and
        # ACKs them one by one, in order: any other ACK is refused, naming it.
        if epoch not in self._unacked:
            raise ChannelError(f"{where}: ACK of epoch {epoch}, but the epochs awaiting one "
                               f"are {sorted(self._unacked) or 'none'}")
        if epoch != min(self._unacked):
            raise ChannelError(f"{where}: ACK of epoch {epoch} before that of epoch "
                               f"{min(self._unacked)} (the epochs awaiting one are "
                               f"{sorted(self._unacked)}; ACKs come in epoch order)")
        if self.detector is not None and self.agreed.heartbeat is not None:
            self.detector.timeout = self.agreed.heartbeat[1] / 1000  # the grace is over
        t_end, st = self._unacked.pop(epoch)
        st.ack_ms = (now - t_end) * 1000
        self.acked = epoch
        self._stats_out.append(st)
        return Acked(epoch, st, commit_us / 1000)

    # -- forward stream -----------------------------------------------------------

    def page_records(self, pfns: npt.NDArray[np.uint64], types: npt.NDArray[np.uint8],
                     pages: compress.PagesIn, now: float) -> list[Buffer]:
        """The buffers of one PAGE_DATA (``pages``: the contents of the pfns whose type
        carries data), preceded by the accept if it is due."""
        out = self._accept(now)
        if self._compressor is not None and self._std_page_sent:
            enc = self._compressor.encode(pfns, types, pages)
            out += enc.buffers
            self._raw += enc.raw_bytes
            self._wire += enc.wire_bytes
        else:
            # The first PAGE_DATA stays standard: the stream's ordering rules (vCPU
            # records after some PAGE_DATA) must hold for the records a decoder knows.
            if isinstance(pages, np.ndarray):
                pages = pages.reshape(-1).data
            elif self._compressor is not None and not isinstance(pages, bytes):
                # One snapshot for the record and the cache: live guest pages may change
                # between two reads, and the cache must hold exactly what was sent.
                pages = (bytes(pages) if isinstance(pages, bytearray | memoryview)
                         else b"".join(pages))
            rec = wire.frame(C.REC_TYPE_PAGE_DATA, PageData.make(pfns, types, [pages] if
                             isinstance(pages, Buffer) else
                             pages).pack())
            if self._compressor is not None:
                self._compressor.observe(pfns, types, pages)
            self._std_page_sent = True
            n = sum(len(b) for b in rec)
            self._raw += n
            self._wire += n
            out += rec
        self.sent(now)
        return out

    def other_bytes(self, n: int, now: float) -> None:
        """The engine wrote ``n`` bytes of other records (they count in the epoch's raw
        and wire bytes, and as a sign of life)."""
        self._raw += n
        self._wire += n
        self.sent(now)

    def sent(self, now: float) -> None:
        if self._timer is not None:
            self._timer.sent(now)

    def pending(self, now: float) -> list[Buffer]:
        out = self._accept(now)
        if self.agreed is None:
            return out
        while self._stats_out:
            out.append(_sealed(self._sealer, wire.REC_REMUS_EPOCH_STATS,
                               self._stats_out.popleft().pack()))
        if self._timer is not None and (out or self._timer.due(now)):
            if not out:
                out.append(_sealed(self._sealer, wire.REC_REMUS_HEARTBEAT,
                                   wire.heartbeat_body(self._timer.next_seq(now))))
            self._timer.sent(now)
        return out

    def _accept(self, now: float) -> list[Buffer]:
        ext = self._accept_due
        if ext is None:
            return []
        self._accept_due = None
        self.agreed = ext
        if ext.heartbeat is not None:
            # Until the backup's first ACK (the initial copy committed) its restore builds
            # the domain, which stalls a dom0 for seconds under TCG, and there is nothing
            # to fail over to yet: allow initial_grace_ms more silence (see _ack).
            grace = self.config.initial_grace_ms / 1000
            self.detector = FailureDetector(ext.heartbeat[1] / 1000 + grace, now)
            self._timer = HeartbeatTimer(ext.heartbeat[0] / 1000, now)
        if ext.lz4_xor_mib is not None:
            self._compressor = compress.Compressor(PageCache.of_mib(ext.lz4_xor_mib))
        acc = Accept(ext, self.config.generation)
        if ext.mac is not None:
            key = self.config.key if ext.psk else mac.new_key()
            assert key is not None  # psk is agreed only with a key (Config.extensions)
            acc = Accept(ext, acc.generation, mac.new_session(), None if ext.psk else key)
            assert acc.session is not None
            self._sealer, self._opener = mac.ends(key, acc.session, acc.generation, True)
        return wire.frame(wire.REC_REMUS_ACCEPT, [acc.body()])

    # -- epochs ---------------------------------------------------------------------

    def epoch_sent(self, epoch: int, now: float, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats | None:
        """Epoch ``epoch`` (0 = the initial copy, as the receiver counts) is on the wire.
        Returns its figures now when no ACK will come, else they come with Acked."""
        want = 0 if self.last_sent_epoch is None else self.last_sent_epoch + 1
        if epoch != want:
            raise ValueError(f"epoch_sent({epoch}): the next epoch is {want}")
        self.last_sent_epoch = epoch
        st = EpochStats(epoch, pause_ms, dirty_pages, self._raw, self._wire, send_ms)
        self._raw = self._wire = 0
        if self.agreed is not None and self.agreed.ack:
            self._unacked[epoch] = (now, st)
            if self._early is not None and self._early[0] == epoch:
                early, self._early = self._early, None
                acked = self._ack(*early, now, f"early ACK of epoch {epoch}")
                assert acked is not None
                self._early_acked.append(acked)
            return None
        if self.agreed is not None:
            self._stats_out.append(st)
        return st

    @property
    def awaiting(self) -> list[int]:
        """The epochs sent and not yet ACKed, oldest first."""
        return sorted(self._unacked)

    def take_early(self) -> list[Acked]:
        """The ACKs that arrived before their epoch_sent() (see step 4)."""
        out, self._early_acked = self._early_acked, []
        return out

    @property
    def acks(self) -> bool:
        """Whether the backup will ACK each committed epoch."""
        return self.agreed is not None and self.agreed.ack

    def peer_dead(self, now: float) -> bool:
        return self.detector is not None and self.detector.dead(now)

    def wake_at(self) -> float | None:
        """When the engine must act next without input: a heartbeat due or the backup's
        deadline (None: no timers, a stock peer)."""
        times = [t for t in (self._timer.next_due if self._timer else None,
                             self.detector.deadline if self.detector else None)
                 if t is not None]
        return min(times) if times else None


class ReceiverChannel:
    def __init__(self, config: Config, now: float) -> None:
        self.config = config
        self.offered = config.extensions()
        self.agreed: Extensions | None = None
        self.detector: FailureDetector | None = None
        self._stats: deque[EpochStats] = deque(maxlen=64)  # figures from the primary
        self._timer: HeartbeatTimer | None = None
        self._decompressor: compress.Decompressor | None = None
        self._now = now
        self.accepted: Accept | None = None  # the sender's accept, with its generation
        self._sealer: mac.Sealer | None = None  # back frames, once mac is agreed
        self._opener: mac.Opener | None = None  # forward frames
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
            self.detector = FailureDetector(ext.heartbeat[1] / 1000, self._now)
            self._timer = HeartbeatTimer(ext.heartbeat[0] / 1000, self._now)
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
        return _sealed(self._sealer, wire.REC_REMUS_ACK,
                       wire.ack_body(epoch, int(commit_ms * 1000)))

    def pending(self, now: float) -> bytes:
        """A heartbeat, when one is due."""
        if self._timer is None or not self._timer.due(now):
            return b""
        return _sealed(self._sealer, wire.REC_REMUS_HEARTBEAT,
                       wire.heartbeat_body(self._timer.next_seq(now)))

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
                    out.append(_sealed(self._sealer, wire.REC_REMUS_DISK_BACK,
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
        return _sealed(self._sealer, wire.REC_REMUS_CLOSE, wire.close_body(reason))

    def peer_dead(self, now: float) -> bool:
        return self.detector is not None and self.detector.dead(now)

    def wake_at(self) -> float | None:
        times = [t for t in (self._timer.next_due if self._timer else None,
                             self.detector.deadline if self.detector else None)
                 if t is not None]
        return min(times) if times else None
