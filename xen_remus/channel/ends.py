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
The sender end is sender.py, the receiver end receiver.py; this file holds what both
share (Config, End). link.py wraps both ends around file descriptors (SenderLink: send,
send_pages, epoch_sent, wait_ack, idle, a heartbeat thread; ReceiverLink: tick, committed,
timeout).
"""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.channel import mac, wire
from xen_remus.channel.heartbeat import FailureDetector, HeartbeatTimer
from xen_remus.channel.negotiate import HEARTBEAT_TIMEOUT_MS, Extensions


@dataclass(frozen=True)
class Config:
    """One end's wishes. ``compression`` False is `-u`."""

    ack: bool = True
    heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS
    heartbeat_interval_ms: int | None = None  # default: a quarter of the timeout
    compression: bool = True
    cache_mib: int = 256
    initial_grace_ms: int = 0  # extra silence before the first ACK (SenderChannel._accept)
    disk: bool = False  # sender: it has disks to replicate; receiver: it takes them
    # Authenticated control frames, required of the peer (the commands always ask for
    # them; off here only so that the protocol tests can speak the older plain frames).
    mac: bool = False
    key: bytes | None = None  # pre-shared (--key-file); else the sender makes one
    generation: int | None = None  # sender: this protection's (generation.py)
    fence: bool = False  # receiver: a gate decides its failovers (--fence, --witness...)
    fence_ms: int | None = None  # receiver: its fence command's bound (--fence-timeout)
    witness: bool = False  # receiver: that gate is the witness (--witness)

    def extensions(self) -> Extensions:
        t = self.heartbeat_timeout_ms
        i = self.heartbeat_interval_ms or max(1, t // 4)
        return Extensions(ack=self.ack, heartbeat=(i, t),
                          lz4_xor_mib=self.cache_mib if self.compression else None,
                          disk=self.disk, mac=mac.ALGORITHM if self.mac else None,
                          psk=self.mac and self.key is not None, fence=self.fence,
                          fence_ms=self.fence_ms if self.fence else None,
                          witness=self.witness)


class End:
    """What both ends share: the agreement, the failure detection and heartbeats it
    starts, and the MAC ends that seal our control frames and open the peer's."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.agreed: Extensions | None = None
        self.detector: FailureDetector | None = None
        self._timer: HeartbeatTimer | None = None
        self._sealer: mac.Sealer | None = None  # the frames we send, once mac is agreed
        self._opener: mac.Opener | None = None  # the peer's frames

    def _start_heartbeats(self, heartbeat: tuple[int, int], now: float,
                          grace: float = 0.0) -> None:
        """``heartbeat`` as agreed (interval, timeout in ms); ``grace`` (s): more silence
        allowed at first."""
        self.detector = FailureDetector(heartbeat[1] / 1000 + grace, now)
        self._timer = HeartbeatTimer(heartbeat[0] / 1000, now)

    def _sealed(self, rtype: int, body: bytes) -> bytes:
        """One control frame, with its MAC trailer once mac is agreed."""
        return wire.frame_bytes(rtype, body if self._sealer is None
                                else self._sealer.seal(rtype, body))

    def _heartbeat(self, now: float) -> bytes:
        assert self._timer is not None
        return self._sealed(wire.REC_REMUS_HEARTBEAT,
                            wire.heartbeat_body(self._timer.next_seq(now)))

    def peer_dead(self, now: float) -> bool:
        return self.detector is not None and self.detector.dead(now)

    def wake_at(self) -> float | None:
        """When this end must act next without input: a heartbeat due or the peer's
        deadline (None: no timers, a stock peer)."""
        times = [t for t in (self._timer.next_due if self._timer else None,
                             self.detector.deadline if self.detector else None)
                 if t is not None]
        return min(times) if times else None
