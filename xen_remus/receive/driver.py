"""The receive's driver: reads the sender, feeds the continuous restore
(restore_continuous.py) and carries out its decisions on the sink, in order: forward,
commit (then ACK), fail over (timed, logged), hold a refused epoch's predecessor, abort;
then the plain stream's handshake.

Nothing committed is lost to a bad stream or a failure here: an invalid epoch after
committed ones is dropped and the paused copy of the last committed one is held (not
resumed: the primary that sent the epoch is alive; not destroyed), and a xen-remus
primary is told why in a CLOSE frame, so it reports that reason and runs on unprotected.
Any other failure after a commit holds the copy the same way.

Split brain (README, "Split brain and fencing"): with a xen-remus sender the driver
checks its generation at the accept (generation.py: a stale primary is refused, told so
in a CLOSE frame) and records this host's own generation before a failover; with
``--fence`` nothing of a failover happens before the fence succeeded (receive/fence.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.negotiate import Accept
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import StatusFile
from xen_remus.disk.backup import DiskReplicas, disk_images
from xen_remus.errors import XenRemusError
from xen_remus.generation import GenerationError, GenerationRefused, GenerationStore
from xen_remus.receive import timeline as T
from xen_remus.receive.fence import FailoverGate, FenceFailed
from xen_remus.receive.limits import DEFAULT_MAX_EPOCH_BYTES
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import (
    Abort,
    Committed,
    Complete,
    ContinuousRestore,
    Decision,
    EpochRefused,
    FailOver,
    Forward,
    HeaderSeen,
    Outcome,
    PartialDropped,
    ReceiveError,
    Refused,
    Rewrite,
    Sink,
)
from xen_remus.stream.events import XlHeader
from xen_remus.xlproto import ReceiverSide

log = logging.getLogger("xen_remus.receive")


class GuestSink(Sink, Protocol):
    """A sink that builds the guest (XlSink): named after the guest once its header came
    (``domain_name``), and with the plain stream's closing handshake to relay."""

    domain_name: str | None

    def finish_plain(self, upstream: Upstream, proto: ReceiverSide) -> int:
        """Relay the handshake after a plain stream; the restore's status (0: ok)."""
        ...

    def incoming_name(self) -> str:
        """The name of the paused copy while it is received."""
        ...


class Relay:
    """The continuous restore with its decisions carried out on ``sink``, in order.

    ``feed``/``eof`` return None while the stream goes on, or the Outcome once it ended;
    an Abort raises ReceiveError (after ``sink.abort``). ``on_header`` sees the xl header
    (the guest's config) as soon as it is decoded: before its bytes go on, and before
    any record that came with it in the same read (a disk's first frames) is taken;
    ``on_commit`` each epoch the sink has whole, after ``sink.committed``. At a failover,
    ``fence`` first (it raises to refuse the resume, leaving the sink as it leaves it),
    then ``on_failover``, then the sink.
    ``on_stop`` gets the reason before a refusal or an abort and returns whether the
    primary was told it (a CLOSE frame).
    ``timeline`` gets the failover's phases (the sink marks its own on it too) and is
    logged once the guest runs.
    """

    def __init__(self, sink: Sink, checkpointed: bool,
                 max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
                 rewrite: Rewrite | None = None,
                 timeline: T.FailoverTimeline | None = None) -> None:
        self.sink = sink
        self.timeline = timeline if timeline is not None else T.FailoverTimeline()
        self.core = ContinuousRestore(checkpointed, max_epoch_bytes, rewrite)
        self.core.on_header = self._header
        self.outcome: Outcome | None = None
        self.on_header: Callable[[XlHeader], None] | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.on_failover: Callable[[int], None] | None = None  # before the sink resumes
        self.fence: Callable[[int], None] | None = None  # before anything of a failover
        self.on_stop: Callable[[str], bool] | None = None

    @property
    def committed(self) -> int | None:
        return self.core.committed

    @property
    def trailing(self) -> bytes:
        return self.core.trailing

    def feed(self, data: bytes) -> Outcome | None:
        return self._act(self.core.feed(data))

    def _header(self, header: XlHeader) -> None:
        if self.on_header is not None:
            self.on_header(header)

    def eof(self, why: str | None = None) -> Outcome:
        """The input ended; ``why`` (e.g. a heartbeat timeout) goes into the log line."""
        out = self._act(self.core.eof(why))
        assert out is not None  # EOF always ends the stream one way or another
        return out

    def _act(self, decisions: list[Decision]) -> Outcome | None:
        for d in decisions:
            match d:
                case HeaderSeen():
                    pass  # on_header had it from the core, in stream order (_header)
                case Forward(bufs):
                    self.sink.send(bufs)
                case Committed(epoch):
                    self.sink.committed(epoch)
                    if self.on_commit is not None:
                        self.on_commit(epoch)
                case PartialDropped(epoch, nbytes, offset):
                    refused = isinstance(decisions[-1], Refused)  # no failover then
                    if not refused:
                        self.timeline.mark(T.DECLARED_DEAD)  # unless the driver saw it first
                        self.timeline.mark(T.DROPPED)
                    log.warning("%s: discarding partial epoch %d (%d bytes from offset %d)",
                                "refusing" if refused else "failover", epoch, nbytes, offset)
                case FailOver():
                    self.timeline.mark(T.DECLARED_DEAD)
                    self.outcome = self._fail_over(d)
                case Refused(epoch, offset, reason, error):
                    told = self.on_stop is not None and self.on_stop(reason)
                    self.sink.hold(epoch)
                    self.outcome = Outcome("refused", epoch, offset, reason, error=error)
                    raise EpochRefused(
                        f"{reason}; it was dropped, never applied. The copy of epoch {epoch} "
                        "stays paused here, not resumed: the primary sent that epoch, so it "
                        "is alive" + (" and was told why" if told else "")) from error
                case Abort(offset, why, error):
                    if self.on_stop is not None:
                        self.on_stop(why)
                    self.sink.abort(why)
                    self.outcome = Outcome("aborted", None, offset, why, error=error)
                    if error is not None:
                        raise ReceiveError(why) from error
                    raise ReceiveError(why)
                case Complete(epoch, offset):
                    self.outcome = Outcome("complete", epoch, offset)
        return self.outcome

    def _fail_over(self, d: FailOver) -> Outcome:
        log.warning("failover: %s; resuming from epoch %d", d.reason, d.epoch)
        t0 = time.monotonic()
        if self.fence is not None:
            # The fence comes first, before the disks drop their later writes and before
            # the sink resumes: nothing of a failover may happen for a copy that will not
            # run. If it fails, the disks stay as they were at the last ACK, with the
            # paused copy (committing those epochs earlier was harmless: no copy ran).
            self.fence(d.epoch)
        if self.on_failover is not None:
            self.on_failover(d.epoch)
        self.sink.failover(d.epoch)
        self.timeline.mark(T.RUNNING)  # the sink returns once it runs, if it did not say
        secs = time.monotonic() - t0
        log.warning("failover: guest resumed from epoch %d in %.3f s", d.epoch, secs)
        log.warning("%s", self.timeline.line())
        return Outcome("failover", d.epoch, d.offset, d.reason, secs, d.error)


def receive(upstream: Upstream, sink: GuestSink, checkpointed: bool,
            max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
            chan: ReceiverChannel | None = None, fence: FailoverGate | None = None,
            generations: GenerationStore | None = None,
            timeline: T.FailoverTimeline | None = None,
            metrics_file: Path | None = None) -> Outcome:
    """Run one receive to its end: banner, stream, then the handshake or the failover.
    With ``chan`` (checkpointed only) the offer follows the banner; if a xen-remus
    sender accepts, each committed epoch is ACKed and a silent primary is failed over
    from after the agreed heartbeat timeout. With ``fence`` (a failover gate: the fence
    command or the witness) the failover waits for it and does not happen if it fails
    (FenceFailed, the copy held). ``generations``: this host's records (default: under
    STATE_DIR). ``timeline``: the failover's phases, the sink's among them (default: the
    driver's own, on time.monotonic). ``metrics_file``: the status also kept there in
    Prometheus' format (`--metrics-file`)."""
    proto = ReceiverSide()
    rx = Relay(sink, checkpointed, max_epoch_bytes,
               chan.on_record if chan is not None else None, timeline)
    tl = rx.timeline
    link = ReceiverLink(chan, upstream.wfd) if chan is not None else None
    bstatus: StatusFile | None = None  # ours: the backup's status file
    images: dict[str, str] = {}  # the guest's disks (vdev -> image), from its config
    disks = DiskReplicas(images.get)
    store = generations if generations is not None else GenerationStore()
    check = _GenerationCheck(sink, store, link) if link is not None else None
    rx.fence = _gate(sink, fence, check.refused if check is not None else [], tl,
                     lambda: chan.accepted.generation
                     if chan is not None and chan.accepted is not None else None)
    if chan is not None and link is not None and check is not None:
        def on_disk(vdev: str, frames: memoryview, where: str) -> None:
            link.disk_back(vdev, disks.feed(vdev, frames, where))

        chan.on_disk = on_disk
        chan.on_accept = check.on_accept

        def failing_over(epoch: int) -> None:
            acc, name = chan.accepted, sink.domain_name
            if acc is not None and acc.generation is not None and name:
                try:
                    new = store.failed_over(name, acc.generation)
                    log.warning("failover: %s is generation %d on this host from now on",
                                name, new)
                    if bstatus is not None:
                        bstatus.doc["generation"] = new
                except GenerationError as exc:  # resume all the same: the guest comes first
                    log.error("failover: %s; a stale primary of %s will not be refused",
                              exc, name)
            disks.failover(epoch)
            if bstatus is not None:
                bstatus.doc["failovers"] += 1

        rx.on_failover = failing_over

        def committed(epoch: int) -> None:
            try:
                disks.commit(epoch)  # the disks hold epoch N before its ACK
            except XenRemusError as exc:
                raise ReceiveError(f"epoch {epoch}: committing the disks: {exc}") from exc
            link.committed(epoch)
            if bstatus is not None:  # `xen-remus status` on the backup: the primary's figures
                for st in chan.take_stats():
                    bstatus.epoch(st)
                bstatus.doc["committed"] = epoch
                if bstatus.doc["generation"] is None and chan.accepted is not None:
                    bstatus.doc["generation"] = chan.accepted.generation
                bstatus.write()

        rx.on_commit = committed

        def stop(why: str) -> bool:
            if chan.agreed is None:
                return False
            link.close(f"the backup stops: {why}")
            return True

        rx.on_stop = stop
    upstream.write(proto.banner() + (chan.offer_line() if chan is not None else b""))
    log.info("ready to receive (%s stream) into %s",
             "checkpointed" if checkpointed else "plain", sink)

    def on_header(hdr: XlHeader) -> None:
        nonlocal bstatus
        sink.domain_name = _domain_name(hdr)
        with contextlib.suppress(TypeError, ValueError):
            images.update(disk_images(hdr.config_json()))
        if chan is not None and sink.domain_name:
            bstatus = StatusFile(sink.domain_name, "backup", metrics=metrics_file)
            bstatus.state("receiving", "initial copy")
        if check is not None:
            check.header_seen()

    rx.on_header = on_header
    out: Outcome | None = None
    t0 = time.monotonic()
    if link is not None:
        # A sink slow to take an epoch (xl builds the domain before it reads on; TCG) or
        # a long decode must not look like a dead backup to the primary.
        link.start_heartbeats()
    try:
        while out is None:
            chunk = upstream.read() if link is None else upstream.read_beating(
                link, armed=rx.committed is not None)
            if chunk:
                tl.heard()
                out = rx.feed(chunk)
            else:
                tl.mark(T.DECLARED_DEAD)
                out = rx.eof(upstream.gone)
    except (FenceFailed, EpochRefused) as exc:
        if bstatus is not None:
            bstatus.state("held", str(exc))
        raise
    except Exception as exc:
        if rx.committed is None or rx.core.finished:
            raise
        # A failure here (the sink, the disks, a bug) after epochs were committed: keep
        # the committed copy rather than lose it, and tell the primary.
        why = f"receive failed after epoch {rx.committed} was committed: {exc}"
        log.debug("%s", why, exc_info=True)
        if rx.on_stop is not None:
            rx.on_stop(why)
        sink.hold(rx.committed)
        if bstatus is not None:
            bstatus.state("held", why)
        raise ReceiveError(f"{why}; the copy of epoch {rx.committed} is left as it is "
                           f"({sink.incoming_name()}), not resumed") from exc
    finally:
        if link is not None:
            link.stop_heartbeats()
        disks.close()
    if bstatus is not None:
        bstatus.state(out.kind, out.reason)
    if out.kind == "complete":
        log.info("stream complete: %d bytes, %d epochs, %.2f s", out.offset,
                 (out.epoch or 0) + 1 if rx.core.dec.checkpointed else 1,
                 time.monotonic() - t0)
        upstream.pending = rx.trailing
        status = sink.finish_plain(upstream, proto)
        if status:
            raise ReceiveError(f"xl migrate-receive reported startup failure (status "
                               f"{status}); the sender was given the domain back")
    return out


def _gate(sink: GuestSink, fence: FailoverGate | None, refused: list[str],
          timeline: T.FailoverTimeline,
          generation: Callable[[], int | None]) -> Callable[[int], None]:
    """What must hold before a failover goes ahead (Relay.fence): the sender was not
    refused, and the failover gate, if any, let it (asked with the sender's
    ``generation``)."""

    def gate(epoch: int) -> None:
        if refused:
            # A refused sender's copy (its accept came after its first epoch) never runs.
            sink.abort(refused[0])
            raise ReceiveError(f"no failover from epoch {epoch}: {refused[0]}")
        if fence is None:
            return
        why = fence.run(sink.domain_name, epoch, generation())
        if why is not None:
            sink.hold(epoch)
            raise FenceFailed(
                f"failover from epoch {epoch} refused: {fence.what} "
                f"{why}; the primary may still be running, so this host did not resume "
                f"its copy: it stays paused as {sink.incoming_name()} (epoch {epoch} held)")
        timeline.mark(T.FENCED)

    return gate


class _GenerationCheck:
    """The receiver's check of a xen-remus sender's generation: a stale one is refused,
    and told why in a CLOSE frame. The accept comes after the xl header, which the driver
    has as soon as it is decoded (Relay._header), so the check runs at the accept; an
    accept before any header would wait for ``header_seen``."""

    def __init__(self, sink: GuestSink, store: GenerationStore, link: ReceiverLink) -> None:
        self.sink, self.store, self.link = sink, store, link
        self.refused: list[str] = []  # why the sender was refused, if it was
        self._header = False  # the driver acted on the xl header
        self._waiting: tuple[Accept, str] | None = None

    def on_accept(self, acc: Accept, where: str) -> None:
        """ReceiverChannel.on_accept: a refusal is a ChannelError there (the core then
        aborts, or fails over through the gate, which refuses that too)."""
        if not self._header:
            self._waiting = (acc, where)
        else:
            self._check(acc, where)

    def header_seen(self) -> None:
        """The driver has the guest's name: check an accept that came before it."""
        self._header = True
        if self._waiting is None:
            return
        (acc, where), self._waiting = self._waiting, None
        try:
            self._check(acc, where)
        except GenerationRefused as exc:  # before anything reached the sink: abort
            self.sink.abort(str(exc))
            raise ReceiveError(str(exc)) from exc

    def _check(self, acc: Accept, where: str) -> None:
        name = self.sink.domain_name
        if not name:
            log.warning("%s: the stream names no domain: generation %s not checked", where,
                        acc.generation)
            return
        try:
            self.store.check_sender(name, acc.generation)
        except GenerationRefused as exc:
            self.refused.append(f"{where}: {exc}")
            log.error("refusing the sender: %s", self.refused[0])
            self.link.close(f"refused by the backup: {exc}")
            raise GenerationRefused(self.refused[0]) from None


def _domain_name(hdr: XlHeader) -> str | None:
    """The guest's name from the JSON config in the xl header (libxl_domain_config)."""
    try:
        return str(hdr.config_json()["c_info"]["name"])
    except (TypeError, KeyError, ValueError):
        return None
