"""The continuous restore, sans-IO: the sender's bytes in, decisions out.

One epoch on the backup, as in the Remus figure, is "buffer it whole, then commit":

    bytes ─► Decoder ─► records of epoch N ──held──► CHECKPOINT_END ─► Forward(epoch N)
                                                                       Committed(N)  (ACK)
    EOF / silence mid-epoch ──► PartialDropped(N+1) ─► FailOver(N)
    an invalid record or too big an epoch N+1 ──► PartialDropped(N+1) ─► Refused(N)
    END ──► Complete                              nothing committed yet ─► Abort

``ContinuousRestore.feed`` returns those decisions in the order to act on them; it never
blocks and touches no fd, process or clock. The driver (xen_remus/receive/driver.py)
carries them out on a Sink: Forward is ``send``, Committed is ``committed`` (then the ACK),
FailOver is the (blocking, watched) ``failover``, Refused is ``hold`` (the primary, alive
since it is still sending, is told why and runs on; the copy is neither resumed nor
destroyed), Abort is ``abort``; it also logs and times them. The sink that builds the
guest is stock `xl migrate-receive` (xen_remus/receive/xlsink.py says why).

Memory: the initial full copy (epoch 0) streams through, as it comes: there is nothing to
fail over to before it completes. Every later epoch is held whole (one in flight), and only
a whole, fully validated epoch is forwarded. ``max_epoch_bytes`` bounds what the restore
keeps alive at any time, in any epoch: the held records (by the memory they pin,
restore_held.py), the decoder's reassembly buffers, and the pages a compressed record
would expand to, checked before it is expanded (``rewrite`` gets what is left).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xen_remus.channel.errors import ChannelError, CompressionError
from xen_remus.errors import XenRemusError
from xen_remus.receive.limits import DEFAULT_MAX_EPOCH_BYTES
from xen_remus.restore_held import Held
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import Buffer, EpochEnd, Event, StreamEnd, XlHeader
from xen_remus.stream.records import Record


class ReceiveError(XenRemusError):
    """The receive failed and no guest was resumed here."""


class EpochTooLarge(XenRemusError):
    """An epoch outgrew the ceiling before its end."""

    def __init__(self, epoch: int, held: int, ceiling: int, offset: int, record: str) -> None:
        super().__init__(f"epoch {epoch}: {held} bytes buffered at offset {offset} ({record}) "
                         f"exceed the ceiling of {ceiling} bytes (--max-epoch-mib)")
        self.epoch, self.offset = epoch, offset


class EpochRefused(ReceiveError):
    """An invalid epoch after committed ones: dropped; the copy was held, not resumed."""


# What makes the epoch in flight unusable (the stream's own errors aside): too big, or one
# of our channel records (compressed pages, stats) that does not decode.
BAD_EPOCH = (EpochTooLarge, ChannelError, CompressionError)


class Sink(Protocol):
    """Where committed bytes go. ``send`` gets whole validated units only."""

    def send(self, bufs: Sequence[Buffer]) -> None: ...

    def committed(self, epoch: int) -> None: ...

    def failover(self, epoch: int) -> None:
        """End the stream at the boundary after ``epoch`` and resume the guest there;
        returns once it runs, raises (bounded in time) if it does not."""

    def hold(self, epoch: int) -> None:
        """Stop without resuming: the paused copy of ``epoch`` stays as it is."""

    def abort(self, why: str) -> None:
        """Nothing to resume: tear the partial copy down."""


@dataclass
class Outcome:
    """How a receive ended: ``complete`` (plain END) or ``failover`` (from ``epoch``)."""

    kind: str
    epoch: int | None = None
    offset: int = 0
    reason: str = ""
    seconds: float = 0.0
    error: XenRemusError | None = None


# -- the decisions ---------------------------------------------------------------------

@dataclass(frozen=True)
class HeaderSeen:
    """The xl header arrived (the guest's config: its name); its bytes follow."""

    header: XlHeader


@dataclass(frozen=True)
class Forward:
    """Give these bytes to the sink now: validated records, in stream order."""

    bufs: list[Buffer]


@dataclass(frozen=True)
class Committed:
    """The sink has epoch ``epoch`` whole (the Forwards before this): ACK it."""

    epoch: int


@dataclass(frozen=True)
class PartialDropped:
    """Failing over: ``nbytes`` of epoch ``epoch``, from stream offset ``offset``, are
    thrown away (they never reached the sink)."""

    epoch: int
    nbytes: int
    offset: int


@dataclass(frozen=True)
class FailOver:
    """Resume the guest from epoch ``epoch`` now. ``error``: the stream was invalid (the
    receive resumed, but not cleanly); None for the primary's EOF or silence."""

    epoch: int
    offset: int
    reason: str
    error: XenRemusError | None


@dataclass(frozen=True)
class Refused:
    """Epoch ``epoch`` + 1 is invalid (``error``) and was dropped, never forwarded; the
    sink keeps ``epoch``. The primary is alive (it sent the epoch): tell it ``reason``
    and neither resume nor destroy the copy."""

    epoch: int
    offset: int
    reason: str
    error: XenRemusError


@dataclass(frozen=True)
class Abort:
    """Nothing to resume: tear the partial copy down; the receive failed (``why``)."""

    offset: int
    why: str
    error: XenRemusError | None


@dataclass(frozen=True)
class Complete:
    """The stream ended with END; the sink has all of it (the handshake follows)."""

    epoch: int | None
    offset: int


Decision = (HeaderSeen | Forward | Committed | PartialDropped | FailOver | Refused | Abort
            | Complete)
# A record -> the buffers to forward instead (None: its own bytes). The int is how many
# more bytes it may add under the ceiling (compressed pages are checked against it).
Rewrite = Callable[[Record, int], Sequence[Buffer] | None]


class ContinuousRestore:
    """Feed it the sender's bytes; it decides what reaches the sink and when.

    ``feed`` returns the decisions for those bytes (the last one FailOver, Refused, Abort
    or Complete once the stream ended; ``finished`` then). Bytes after the stream (the
    sender's GO) are left in ``trailing``. ``rewrite`` maps a record to the buffers to
    forward instead of its wire bytes (the xen-remus channel: our records vanish,
    compressed pages become PAGE_DATA); it may raise ChannelError/CompressionError.
    ``on_header`` gets the xl header as soon as it is decoded, before any later record of
    the same bytes is rewritten (the channel's disk records need the guest's config);
    HeaderSeen still reports it among the decisions.
    """

    def __init__(self, checkpointed: bool, max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
                 rewrite: Rewrite | None = None) -> None:
        self.checkpointed = checkpointed
        self.max_epoch_bytes = max_epoch_bytes
        self.rewrite = rewrite
        self.on_header: Callable[[XlHeader], None] | None = None
        self.dec = Decoder(fmt=None, checkpointed=checkpointed, relay=True)
        self.dec.max_item = max_epoch_bytes
        self.committed: int | None = None  # last epoch the sink has whole
        self.offset = 0  # bytes received
        self.trailing = b""
        self.finished = False
        self._out: list[Decision] = []
        self._held = Held()  # epoch 0: this feed's records; later: the epoch in flight
        self._committed_end = 0  # stream offset just past the last whole epoch
        self._eof_why = "EOF"  # what ended the input, for the failover's reason

    @property
    def streaming(self) -> bool:
        """Initial copy (or a plain stream): records go straight to the sink."""
        return self.committed is None

    def feed(self, data: bytes) -> list[Decision]:
        """The decisions for the next bytes of the stream; b"" is the end of the input."""
        if self.finished:
            raise ReceiveError("data fed after the stream ended")
        start = self.offset
        self.offset += len(data)
        try:
            events = self.dec.feed(data)
        except StreamError as exc:
            end = next((e for e in exc.events if isinstance(e, StreamEnd)), None)
            try:
                self._take(exc.events)
            except BAD_EPOCH as bad:
                self._broken(bad, eof=False)
                return self._decided()
            if end is not None and self.finished:
                # Bytes after the final END: the handshake that follows the stream.
                self.trailing = data[end.offset - start:]
            else:
                self._broken(exc, eof=not data)
            return self._decided()
        try:
            self._take(events)
        except BAD_EPOCH as exc:
            self._broken(exc, eof=False)
        return self._decided()

    def eof(self, why: str | None = None) -> list[Decision]:
        """The input ended; ``why`` (e.g. a heartbeat timeout) goes into the reason."""
        if why:
            self._eof_why = why
        if self.finished:
            return []
        out = self.feed(b"")
        assert self.finished  # EOF always ends the stream one way or another
        return out

    def _decided(self) -> list[Decision]:
        out, self._out = self._out, []
        return out

    def _take(self, events: Sequence[Event]) -> None:
        for ev in events:
            if isinstance(ev, XlHeader):
                if self.on_header is not None:
                    self.on_header(ev)
                self._out.append(HeaderSeen(ev))
            if isinstance(ev, StreamEnd):
                self._forward()
                if ev.complete:
                    self._end(Complete(self.committed, ev.offset))
                else:
                    self._failover(f"stream ended at offset {ev.offset} ({self._eof_why} "
                                   "at an epoch boundary)", None)
                return
            for b in self._bufs(ev):
                self._held.add(b)
            self._check(ev.epoch, ev.offset, getattr(ev, "name", type(ev).__name__), False)
            if isinstance(ev, EpochEnd):
                self._forward()
                self._set_committed(ev.epoch, ev.offset)
        if self.streaming:
            self._forward()
        # The item the decoder is collecting now (after these events) counts too.
        self._check(self.dec.epoch, self.dec.offset,
                    f"{self.dec.collecting() or 'next item'}, being received", True)

    def cost(self, partial: bool = True) -> int:
        """The memory the restore keeps alive now: what it holds, by the memory that
        pins, and the decoder's reassembly buffers (each counted once)."""
        return self._held.cost + sum(a.nbytes for a in self.dec.buffers(partial)
                                     if not self._held.holds(a))

    def _check(self, epoch: int, offset: int, what: str, partial: bool) -> None:
        cost = self.cost(partial)
        if cost > self.max_epoch_bytes:
            raise EpochTooLarge(epoch, cost, self.max_epoch_bytes, offset, what)

    def _bufs(self, ev: Event) -> list[Buffer]:
        """What goes to the sink for ``ev``: its wire bytes, or what ``rewrite`` returns."""
        if self.rewrite is not None and isinstance(ev, Record):
            rep = self.rewrite(ev, max(0, self.max_epoch_bytes - self.cost(False)))
            if rep is not None:
                return [b for b in rep if len(b)]
        return [ev.wire] if len(ev.wire) else []

    def _forward(self) -> None:
        if len(self._held):
            self._out.append(Forward(self._held.take()))

    def _set_committed(self, epoch: int, end: int) -> None:
        self.committed, self._committed_end = epoch, end
        self._out.append(Committed(epoch))

    def _end(self, last: FailOver | Refused | Abort | Complete) -> None:
        self._out.append(last)
        self.finished = True

    def _broken(self, exc: XenRemusError, eof: bool) -> None:
        if not self.checkpointed or self.committed is None:
            why = (f"stream broken before any complete epoch: {exc}" if self.checkpointed
                   else f"stream broken, the guest was not received: {exc}")
            self._end(Abort(self.offset, why, exc))
            return
        if eof:  # EOF mid-epoch is the primary dying mid-send: a normal failover
            self._failover(f"{self._eof_why} mid-epoch: {exc}", None)
            return
        epoch = self.committed
        self._drop_partial()
        self._end(Refused(epoch, self.offset, f"epoch {epoch + 1} refused: {exc}", exc))

    def _drop_partial(self) -> None:
        assert self.committed is not None
        partial = self.offset - self._committed_end
        if partial:
            self._out.append(PartialDropped(self.committed + 1, partial, self._committed_end))
        self._held.take()

    def _failover(self, reason: str, error: XenRemusError | None) -> None:
        epoch = self.committed
        if epoch is None:
            self._end(Abort(self.offset, f"{reason}; no complete epoch to resume from", error))
            return
        self._drop_partial()
        self._end(FailOver(epoch, self.offset, reason, error))
