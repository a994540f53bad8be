"""The sender (primary) end of the channel, sans-IO: the save engine drives it (the
order of its calls: ends.py, "Sender")."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xen_remus.channel import compress, mac, wire
from xen_remus.channel.ends import Config, End
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.negotiate import Accept, Extensions, OfferReader, agree
from xen_remus.channel.pagecache import PageCache
from xen_remus.channel.stats import EpochStats
from xen_remus.stream import consts as C
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxc_bodies import PageData


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


class SenderChannel(End):
    def __init__(self, config: Config, now: float) -> None:
        super().__init__(config)
        self.acked: int | None = None
        self.last_sent_epoch: int | None = None
        self._offer = OfferReader()
        self._frames = wire.FrameDecoder("receiver channel (after the banner)")
        self._accept_due: Extensions | None = None
        self._compressor: compress.Compressor | None = None
        self._std_page_sent = False
        self._unacked: dict[int, tuple[float, EpochStats]] = {}
        # ACK of the epoch still being written: (epoch, commit_us), settled by epoch_sent
        self._early: tuple[int, int] | None = None
        self._early_acked: list[Acked] = []
        self._stats_out: deque[EpochStats] = deque(maxlen=64)
        self._raw = self._wire = 0

    @property
    def agreement(self) -> Extensions | None:
        """What was agreed, as soon as the offer came (``agreed`` only once our accept
        is sent)."""
        return self.agreed if self.agreed is not None else self._accept_due

    @property
    def offer(self) -> Extensions | None:
        """The backup's offer, once read (None: not yet, or a stock backup)."""
        return self._offer.offer

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
            out.append(self._sealed(wire.REC_REMUS_EPOCH_STATS,
                                    self._stats_out.popleft().pack()))
        if self._timer is not None and (out or self._timer.due(now)):
            if not out:
                out.append(self._heartbeat(now))
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
            self._start_heartbeats(ext.heartbeat, now, self.config.initial_grace_ms / 1000)
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
