"""The continuous restore, sans-IO: the sender's bytes in, decisions out.

One epoch on the backup, as in the Remus figure, is "buffer it whole, then commit":

    bytes ─► Decoder ─► records of epoch N ──held──► CHECKPOINT_END ─► Forward(epoch N)
                                                                       Committed(N)  (ACK)
    EOF / silence / an invalid record mid-epoch ──► PartialDropped(N+1) ─► FailOver(N)
    END ──► Complete                              nothing committed yet ─► Abort

``ContinuousRestore.feed`` returns those decisions in the order to act on them; it never
blocks and touches no fd, process or clock. The driver (xen_remus/receive/driver.py)
carries them out on a Sink: Forward is ``send``, Committed is ``committed`` (then the ACK),
FailOver is the (blocking, watched) ``failover``, Abort is ``abort``; it also logs and
times them. The sink that builds the guest is stock `xl migrate-receive`
(xen_remus/receive/xlsink.py says why).

Memory: the initial full copy (epoch 0) streams through, as it comes: there is nothing to
fail over to before it completes. Every later epoch is held whole (one in flight) under
``max_epoch_bytes``, and only a whole, fully validated epoch is forwarded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xen_remus.channel.errors import ChannelError, CompressionError
from xen_remus.errors import XenRemusError
from xen_remus.receive.limits import DEFAULT_MAX_EPOCH_BYTES
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import Buffer, EpochEnd, Event, StreamEnd, XlHeader
from xen_remus.stream.records import Record


class ReceiveError(XenRemusError):
    """The receive failed and no guest was resumed here."""


class EpochTooLarge(XenRemusError):
    """An epoch outgrew the ceiling before its end."""

    def __init__(self, epoch: int, held: int, ceiling: int, offset: int) -> None:
        super().__init__(f"epoch {epoch}: {held} bytes buffered at offset {offset} exceed "
                         f"the ceiling of {ceiling} bytes (--max-epoch-mib)")
        self.epoch, self.offset = epoch, offset


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


Decision = HeaderSeen | Forward | Committed | PartialDropped | FailOver | Abort | Complete
Rewrite = Callable[[Record], Sequence[Buffer] | None]


class ContinuousRestore:
    """Feed it the sender's bytes; it decides what reaches the sink and when.

    ``feed`` returns the decisions for those bytes (the last one FailOver, Abort or
    Complete once the stream ended; ``finished`` then). Bytes after the stream (the
    sender's GO) are left in ``trailing``. ``rewrite`` maps a record to the buffers to
    forward instead of its wire bytes (the xen-remus channel: our records vanish,
    compressed pages become PAGE_DATA); it may raise ChannelError/CompressionError.
    """

    def __init__(self, checkpointed: bool, max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
                 rewrite: Rewrite | None = None) -> None:
        self.checkpointed = checkpointed
        self.max_epoch_bytes = max_epoch_bytes
        self.rewrite = rewrite
        self.dec = Decoder(fmt=None, checkpointed=checkpointed)
        self.committed: int | None = None  # last epoch the sink has whole
        self.offset = 0  # bytes received
        self.trailing = b""
        self.finished = False
        self._out: list[Decision] = []
        self._held: list[Buffer] = []
        self._held_bytes = 0
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
        through: list[Buffer] = []
        for ev in events:
            if isinstance(ev, XlHeader):
                self._out.append(HeaderSeen(ev))
            if isinstance(ev, StreamEnd):
                self._forward(through)
                if ev.complete:
                    self._commit_held()
                    self._end(Complete(self.committed, ev.offset))
                else:
                    self._failover(f"stream ended at offset {ev.offset} ({self._eof_why} "
                                   "at an epoch boundary)", None)
                return
            bufs = self._bufs(ev)
            if self.streaming:
                through += bufs
                if isinstance(ev, EpochEnd):
                    self._forward(through)
                    self._set_committed(ev.epoch, ev.offset)
                continue
            if bufs:
                self._held += bufs
                self._held_bytes += sum(len(b) for b in bufs)
                if self._held_bytes > self.max_epoch_bytes:
                    raise EpochTooLarge(ev.epoch, self._held_bytes, self.max_epoch_bytes,
                                        ev.offset)
            if isinstance(ev, EpochEnd):
                self._commit_held()
                self._set_committed(ev.epoch, ev.offset)
        self._forward(through)

    def _bufs(self, ev: Event) -> list[Buffer]:
        """What goes to the sink for ``ev``: its wire bytes, or what ``rewrite`` returns."""
        if self.rewrite is not None and isinstance(ev, Record):
            rep = self.rewrite(ev)
            if rep is not None:
                return [b for b in rep if len(b)]
        return [ev.wire] if len(ev.wire) else []

    def _forward(self, through: list[Buffer]) -> None:
        if through:
            self._out.append(Forward(list(through)))
            through.clear()

    def _commit_held(self) -> None:
        if self._held:
            self._out.append(Forward(self._held))
        self._held, self._held_bytes = [], 0

    def _set_committed(self, epoch: int, end: int) -> None:
        self.committed, self._committed_end = epoch, end
        self._out.append(Committed(epoch))

    def _end(self, last: FailOver | Abort | Complete) -> None:
        self._out.append(last)
        self.finished = True

    def _broken(self, exc: XenRemusError, eof: bool) -> None:
        if not self.checkpointed or self.committed is None:
            why = (f"stream broken before any complete epoch: {exc}" if self.checkpointed
                   else f"stream broken, the guest was not received: {exc}")
            self._end(Abort(self.offset, why, exc))
            return
        # EOF mid-epoch is the primary dying mid-send: a normal failover, no error.
        kind = f"{self._eof_why} mid-epoch" if eof else "invalid stream"
        self._failover(f"{kind}: {exc}", None if eof else exc)

    def _failover(self, reason: str, error: XenRemusError | None) -> None:
        epoch = self.committed
        if epoch is None:
            self._end(Abort(self.offset, f"{reason}; no complete epoch to resume from", error))
            return
        partial = self.offset - self._committed_end
        if partial:
            self._out.append(PartialDropped(epoch + 1, partial, self._committed_end))
        self._held, self._held_bytes = [], 0
        self._end(FailOver(epoch, self.offset, reason, error))
