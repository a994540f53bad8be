"""The receive's driver: reads the sender, feeds the continuous restore
(restore_continuous.py) and carries out its decisions on the sink, in order: forward,
commit (then ACK), fail over (timed, logged), abort; then the plain stream's handshake."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from xen_remus.channel.ends import ReceiverChannel
from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.stats import StatusFile
from xen_remus.disk.backup import DiskReplicas, disk_images
from xen_remus.errors import XenRemusError
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import (
    DEFAULT_MAX_EPOCH_BYTES,
    Abort,
    Committed,
    Complete,
    ContinuousRestore,
    Decision,
    FailOver,
    Forward,
    HeaderSeen,
    Outcome,
    PartialDropped,
    ReceiveError,
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


class Relay:
    """The continuous restore with its decisions carried out on ``sink``, in order.

    ``feed``/``eof`` return None while the stream goes on, or the Outcome once it ended;
    an Abort raises ReceiveError (after ``sink.abort``). ``on_header`` sees the xl header
    (the guest's config) before its bytes go on; ``on_commit`` each epoch the sink has
    whole, after ``sink.committed``.
    """

    def __init__(self, sink: Sink, checkpointed: bool,
                 max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
                 rewrite: Rewrite | None = None) -> None:
        self.sink = sink
        self.core = ContinuousRestore(checkpointed, max_epoch_bytes, rewrite)
        self.outcome: Outcome | None = None
        self.on_header: Callable[[XlHeader], None] | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.on_failover: Callable[[int], None] | None = None  # before the sink resumes

    @property
    def committed(self) -> int | None:
        return self.core.committed

    @property
    def trailing(self) -> bytes:
        return self.core.trailing

    def feed(self, data: bytes) -> Outcome | None:
        return self._act(self.core.feed(data))

    def eof(self, why: str | None = None) -> Outcome:
        """The input ended; ``why`` (e.g. a heartbeat timeout) goes into the log line."""
        out = self._act(self.core.eof(why))
        assert out is not None  # EOF always ends the stream one way or another
        return out

    def _act(self, decisions: list[Decision]) -> Outcome | None:
        for d in decisions:
            match d:
                case HeaderSeen(header):
                    if self.on_header is not None:
                        self.on_header(header)
                case Forward(bufs):
                    self.sink.send(bufs)
                case Committed(epoch):
                    self.sink.committed(epoch)
                    if self.on_commit is not None:
                        self.on_commit(epoch)
                case PartialDropped(epoch, nbytes, offset):
                    log.warning("failover: discarding partial epoch %d (%d bytes from "
                                "offset %d)", epoch, nbytes, offset)
                case FailOver():
                    self.outcome = self._fail_over(d)
                case Abort(offset, why, error):
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
        if self.on_failover is not None:
            self.on_failover(d.epoch)
        self.sink.failover(d.epoch)
        secs = time.monotonic() - t0
        log.warning("failover: guest resumed from epoch %d in %.3f s", d.epoch, secs)
        return Outcome("failover", d.epoch, d.offset, d.reason, secs, d.error)


def receive(upstream: Upstream, sink: GuestSink, checkpointed: bool,
            max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES,
            chan: ReceiverChannel | None = None) -> Outcome:
    """Run one receive to its end: banner, stream, then the handshake or the failover.
    With ``chan`` (checkpointed only) the offer follows the banner; if a xen-remus
    sender accepts, each committed epoch is ACKed and a silent primary is failed over
    from after the agreed heartbeat timeout."""
    proto = ReceiverSide()
    rx = Relay(sink, checkpointed, max_epoch_bytes,
               chan.on_record if chan is not None else None)
    link = ReceiverLink(chan, upstream.wfd) if chan is not None else None
    bstatus: StatusFile | None = None  # ours: the backup's status file
    images: dict[str, str] = {}  # the guest's disks (vdev -> image), from its config
    disks = DiskReplicas(images.get)
    if chan is not None and link is not None:
        chan.on_disk = disks.feed
        rx.on_failover = disks.failover

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
                bstatus.write()

        rx.on_commit = committed
    upstream.write(proto.banner() + (chan.offer_line() if chan is not None else b""))
    log.info("ready to receive (%s stream) into %s",
             "checkpointed" if checkpointed else "plain", sink)

    def on_header(hdr: XlHeader) -> None:
        nonlocal bstatus
        sink.domain_name = _domain_name(hdr)
        with contextlib.suppress(TypeError, ValueError):
            images.update(disk_images(hdr.config_json()))
        if chan is not None and sink.domain_name:
            bstatus = StatusFile(sink.domain_name, "backup")
            bstatus.state("receiving", "initial copy")

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
            out = rx.feed(chunk) if chunk else rx.eof(upstream.gone)
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


def _domain_name(hdr: XlHeader) -> str | None:
    """The guest's name from the JSON config in the xl header (libxl_domain_config)."""
    try:
        return str(hdr.config_json()["c_info"]["name"])
    except (TypeError, KeyError, ValueError):
        return None
