"""Incremental, sans-IO decoder of xl / libxl v2 / libxc v2-v3 migration streams.

Feed bytes of any chunking, get events (headers, records, epoch ends, stream end), each
with its absolute offset and the exact bytes it occupied. Items wholly inside a fed chunk
are returned as memoryviews of that chunk (no copy: do not modify a buffer after feeding it
while its events are alive); an item split across chunks is copied once into a buffer of
its exact size (``buffers`` lists those the decoder holds, for its caller's accounting).

Layering (libxl-migration-stream.pandoc): after LIBXC_CONTEXT the libxc stream is inline.
libxc records run until libxc END (then libxl records again until libxl END) or libxc
CHECKPOINT (then libxl records until CHECKPOINT_END, then the next epoch's libxc records,
with no new headers). A bare libxc stream ends an epoch at each CHECKPOINT.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C
from xen_remus.stream import events, libxl_rules
from xen_remus.stream.errors import FieldError, StreamError
from xen_remus.stream.events import Buffer, EpochEnd, Event, StreamEnd
from xen_remus.stream.records import BODY_TYPES, LIBXC, LIBXL, Record, record_name

_RH = struct.Struct("<II")

# Phases: what the next item is.
DETECT, XL_HDR, LIBXL_HDR, LIBXL_REC, IMAGE_HDR, DOMAIN_HDR, LIBXC_REC, DONE = range(8)
_PHASE_ITEM = {XL_HDR: "xl header", LIBXL_HDR: "libxl header", IMAGE_HDR: "image header",
               DOMAIN_HDR: "domain header"}
_HEAD = {XL_HDR: C.XL_HDR_SIZE, LIBXL_HDR: C.LIBXL_HDR_SIZE, IMAGE_HDR: C.IHDR_SIZE,
         DOMAIN_HDR: C.DHDR_SIZE, LIBXL_REC: C.REC_HDR_SIZE, LIBXC_REC: C.REC_HDR_SIZE}
# Header items: parser and the phase that follows.
_HEADERS: dict[int, tuple[Callable[[Buffer], Event], int]] = {
    XL_HDR: (events.XlHeader.unpack, LIBXL_HDR),
    LIBXL_HDR: (events.LibxlHeader.unpack, LIBXL_REC),
    IMAGE_HDR: (events.ImageHeader.unpack, DOMAIN_HDR),
    DOMAIN_HDR: (events.DomainHeader.unpack, LIBXC_REC)}

# libxc records by kind, for the ordering rules of libxc-migration-stream.pandoc.
_STATIC = {C.REC_TYPE_X86_PV_INFO, C.REC_TYPE_X86_CPUID_POLICY, C.REC_TYPE_X86_MSR_POLICY}
_V3_ONLY = {C.REC_TYPE_STATIC_DATA_END, C.REC_TYPE_X86_CPUID_POLICY, C.REC_TYPE_X86_MSR_POLICY}
_VCPU = {C.REC_TYPE_X86_PV_VCPU_BASIC, C.REC_TYPE_X86_PV_VCPU_EXTENDED,
         C.REC_TYPE_X86_PV_VCPU_XSAVE, C.REC_TYPE_X86_PV_VCPU_MSRS}
_PV_ONLY = _VCPU | {C.REC_TYPE_X86_PV_INFO, C.REC_TYPE_X86_PV_P2M_FRAMES,
                    C.REC_TYPE_SHARED_INFO}
_HVM_ONLY = {C.REC_TYPE_HVM_CONTEXT, C.REC_TYPE_HVM_PARAMS}
# Reassembly buffers up to this size are kept for reuse (a PAGE_DATA of MAX_BATCH_SIZE
# pages fits); a larger one is freed once its record is.
SPARE_MAX = 8 << 20


class Decoder:
    """Feed bytes with ``feed``; ``feed(b"")`` signals EOF.

    ``fmt``: 'xl', 'libxl', 'libxc' or None (detect from the first byte).
    ``checkpointed``: None accepts plain and checkpointed streams; False rejects CHECKPOINT
    (a plain receiver); True additionally accepts EOF at an epoch boundary as the end of a
    checkpointed stream (the primary went away: failover), reported as
    StreamEnd(complete=False).
    ``relay``: also refuse the libxl records stock libxl would refuse (libxl_rules.py),
    as the stream goes on into it.
    """

    def __init__(self, fmt: str | None = None, checkpointed: bool | None = None,
                 relay: bool = False) -> None:
        if fmt is not None and fmt not in C.FORMATS:
            raise ValueError(f"unknown stream format {fmt!r}")
        self.fmt = fmt
        self.expect_checkpointed = checkpointed
        self.relay = relay
        # Largest item collected (a caller's memory ceiling): refused at its header,
        # before its buffer is allocated.
        self.max_item = C.REC_HDR_SIZE + C.REC_LENGTH_MAX
        self.guest: str | None = None  # "pv", "hvm", "pvh" as libxl knows it, if known
        self.checkpointed = False
        self.epoch = 0
        self.offset = 0  # absolute offset of the next item
        self.image: events.ImageHeader | None = None
        self.domain: events.DomainHeader | None = None
        self.error: StreamError | None = None
        self._phase = {None: DETECT, "xl": XL_HDR, "libxl": LIBXL_HDR,
                       "libxc": IMAGE_HDR}[fmt]
        self._wrapped = fmt in ("xl", "libxl")
        self._partial: memoryview | None = None
        self._spares: list[npt.NDArray[np.uint8]] = []
        self._pfill = 0
        self._ptotal = 0  # 0 while only the fixed head is being collected
        # Ordering state.
        self._libxc_seen = False  # LIBXC_CONTEXT
        self._libxc_done = False  # libxc END
        self._in_checkpoint = False  # between libxc CHECKPOINT and CHECKPOINT_END
        self._at_epoch_boundary = False
        self._static_end = False
        self._pv_info = False
        self._p2m = False
        self._pages = False
        self._item_end = 0

    # -- public ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase == DONE

    def collecting(self) -> str | None:
        """The item whose bytes are being collected (at ``offset``), if one is."""
        if self._partial is None:
            return None
        what = _PHASE_ITEM.get(self._phase)
        if what is None:  # a record
            rtype = _RH.unpack_from(self._partial)[0] if self._pfill >= 8 else None
            layer = LIBXL if self._phase == LIBXL_REC else LIBXC
            what = record_name(layer, rtype) if rtype is not None else "record header"
        return what

    def buffers(self, partial: bool = True) -> list[npt.NDArray[np.uint8]]:
        """The reassembly buffers the decoder holds: kept for reuse, and (``partial``)
        the one the item at ``offset`` is being collected in."""
        part: object = self._partial.obj if self._partial is not None else None
        out = [a for a in self._spares if a is not part]
        if partial and isinstance(part, np.ndarray):
            out.append(part)
        return out

    def feed(self, data: Buffer) -> list[Event]:
        """Decode ``data``; returns the events it completes. Raises StreamError (whose
        ``events`` holds the events completed before the error in this call)."""
        if self.error is not None:
            raise self.error
        out: list[Event] = []
        try:
            if len(data) == 0:
                self._eof(out)
            else:
                self._feed(memoryview(data).cast("B"), out)
        except StreamError as exc:
            exc.events = out
            self.error = exc
            raise
        return out

    # -- framing ----------------------------------------------------------------

    def _feed(self, mv: memoryview, out: list[Event]) -> None:
        pos, n = 0, len(mv)
        part = self._partial
        if part is not None and self._ptotal - self._pfill > n:
            # The middle of an item larger than the chunks it comes in (a record of page
            # data read from a pipe or socket): most chunks end here, so no loop for them.
            part[self._pfill:self._pfill + n] = mv
            self._pfill += n
            return
        while pos < n:
            if self._phase == DETECT:
                self._detect(mv[0])
                continue
            if self._phase == DONE:
                raise StreamError(f"{n - pos} bytes of data after the final END",
                                  self.offset, epoch=self.epoch)
            head = _HEAD[self._phase]
            part = self._partial
            if part is not None:
                want = self._ptotal or head
                take = min(want - self._pfill, n - pos)
                part[self._pfill:self._pfill + take] = mv[pos:pos + take]
                self._pfill += take
                pos += take
                if self._pfill < want:
                    continue
                if not self._ptotal:
                    fixed = memoryview(bytes(part[:head]))
                    total = self._size(fixed)
                    if total > head:
                        part = self._partial = None  # drop our view: the buffer is reusable
                        self._partial, self._ptotal = self._buffer(total, fixed), total
                        continue
                self._partial = None
                self._item(part[:want], out)
                continue
            if n - pos < head:
                self._start_partial(mv[pos:], head, 0)
                pos = n
                continue
            total = self._size(mv[pos:pos + head])
            if n - pos < total:
                self._start_partial(mv[pos:], total, total)
                pos = n
                continue
            self._item(mv[pos:pos + total], out)
            pos += total

    def _start_partial(self, data: memoryview, size: int, total: int) -> None:
        self._partial = self._buffer(size, data)
        self._pfill, self._ptotal = len(data), total

    def _buffer(self, size: int, data: memoryview) -> memoryview:
        """A writable buffer of ``size`` bytes starting with ``data``: one of the last two
        reassembly buffers if no event refers to it any more (the record completed in the
        same feed still does, hence two), else a new one (numpy empty: no zero-filling of
        memory about to be overwritten)."""
        for arr in self._spares:
            # References: the list, ``arr``, getrefcount's argument; more = views alive.
            if len(arr) >= size and sys.getrefcount(arr) == 3:
                break
        else:
            arr = np.empty(max(size, 64), np.uint8)
            if size <= SPARE_MAX:
                self._spares = [*self._spares[-1:], arr]
        buf = arr.data[:size]
        buf[:len(data)] = data
        return buf

    def _detect(self, first: int) -> None:
        if first == C.XL_MAGIC[0]:
            self.fmt, self._phase = "xl", XL_HDR
        elif first == (C.LIBXL_IDENT >> 56):
            self.fmt, self._phase = "libxl", LIBXL_HDR
        elif first == 0xFF:
            self.fmt, self._phase = "libxc", IMAGE_HDR
        else:
            raise StreamError(f"unknown stream format (first byte 0x{first:02x}; expected "
                              "xl, libxl or libxc)", 0, field="magic")
        self._wrapped = self.fmt != "libxc"

    def _size(self, head: memoryview) -> int:
        """Total size of the item whose fixed head is ``head``."""
        phase = self._phase
        if phase == XL_HDR:
            try:
                total = events.XlHeader.total_size(head)
            except FieldError as exc:
                raise self._field_error("xl header", exc, 0) from None
            if total > self.max_item:
                raise StreamError(f"{total} bytes exceed the receiver's ceiling of "
                                  f"{self.max_item} bytes (--max-epoch-mib)", self.offset + 44,
                                  "xl header", "optional_data_len", self.epoch)
            return total
        if phase in (LIBXL_REC, LIBXC_REC):
            rtype, length = _RH.unpack_from(head)
            layer = LIBXL if phase == LIBXL_REC else LIBXC
            if length > C.REC_LENGTH_MAX:
                raise StreamError(f"{length} exceeds REC_LENGTH_MAX ({C.REC_LENGTH_MAX})",
                                  self.offset + 4, record_name(layer, rtype), "length",
                                  self.epoch)
            total = int(C.REC_HDR_SIZE + C.pad8(length))
            if total > self.max_item:
                raise StreamError(f"{length}: the record alone exceeds the receiver's ceiling "
                                  f"of {self.max_item} bytes (--max-epoch-mib)",
                                  self.offset + 4, record_name(layer, rtype), "length",
                                  self.epoch)
            return total
        return _HEAD[phase]

    def _field_error(self, record: str, exc: FieldError, base: int) -> StreamError:
        return StreamError(exc.message, self.offset + base + exc.rel, record, exc.field,
                           self.epoch)

    # -- items -------------------------------------------------------------------

    def _item(self, item: memoryview, out: list[Event]) -> None:
        phase = self._phase
        self._item_end = self.offset + len(item)
        if phase in (LIBXL_REC, LIBXC_REC):
            self._record(item, LIBXL if phase == LIBXL_REC else LIBXC, out)
        else:
            self._header(item, out)
        self.offset += len(item)

    def _header(self, item: memoryview, out: list[Event]) -> None:
        phase = self._phase
        parse, nxt = _HEADERS[phase]
        try:
            ev = parse(item)
        except FieldError as exc:
            raise self._field_error(_PHASE_ITEM[phase], exc, 0) from None
        ev.offset, ev.wire, ev.epoch = self.offset, item, self.epoch
        if isinstance(ev, events.ImageHeader):
            self.image = ev
        elif isinstance(ev, events.DomainHeader):
            self.domain = ev
            if self.guest is None and ev.is_pv:
                self.guest = "pv"
        elif isinstance(ev, events.XlHeader):
            self.guest = ev.guest_type()
        out.append(ev)
        self._phase = nxt

    def _record(self, item: memoryview, layer: str, out: list[Event]) -> None:
        rtype, length = _RH.unpack_from(item)
        name = record_name(layer, rtype)
        end = C.REC_HDR_SIZE + length
        if any(item[end:]):
            raise StreamError("padding not zero", self.offset + end, name, "padding",
                              self.epoch)
        if layer == LIBXL and self.relay:
            why = libxl_rules.refusal(rtype, self._in_checkpoint, self.guest)
            if why is not None:
                raise self._fail(name, why)
        known = (layer, rtype) in BODY_TYPES
        if not known and not rtype & C.REC_TYPE_OPTIONAL:
            raise StreamError(f"unknown mandatory record type 0x{rtype:08x}", self.offset,
                              name, "type", self.epoch)
        rec = Record(layer=layer, rtype=rtype, length=length, body=item[C.REC_HDR_SIZE:end],
                     offset=self.offset, wire=item, epoch=self.epoch)
        if known:
            if layer == LIBXC:
                self._order_libxc(rtype, name)
            else:
                self._order_libxl(rtype, name)
            try:
                rec.parse()
            except FieldError as exc:
                raise self._field_error(name, exc, C.REC_HDR_SIZE) from None
        self._at_epoch_boundary = False
        out.append(rec)
        if known:
            self._after(layer, rtype, out)

    def _fail(self, name: str, message: str, fld: str = "type") -> StreamError:
        return StreamError(message, self.offset, name, fld, self.epoch)

    # -- ordering rules (libxc-migration-stream.pandoc "Record Ordering") ---------

    def _order_libxc(self, rtype: int, name: str) -> None:
        assert self.image is not None and self.domain is not None
        v2 = self.image.version == 2
        pv = self.domain.is_pv
        if rtype == C.REC_TYPE_TOOLSTACK:
            raise self._fail(name, "obsolete TOOLSTACK record (Xen 4.5/4.6) is unsupported")
        if rtype == C.REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST:
            raise self._fail(name, "only valid on the COLO back channel")
        if v2 and rtype in _V3_ONLY:
            raise self._fail(name, "not valid in a version 2 stream")
        if pv and rtype in _HVM_ONLY:
            raise self._fail(name, "HVM record in a PV stream")
        if not pv and rtype in _PV_ONLY:
            raise self._fail(name, "PV record in an HVM stream")
        if rtype in _STATIC:
            if self._static_end:
                raise self._fail(name, "static data record after STATIC_DATA_END")
            if rtype == C.REC_TYPE_X86_PV_INFO and self._pv_info:
                raise self._fail(name, "duplicate X86_PV_INFO")
            return
        if rtype == C.REC_TYPE_STATIC_DATA_END:
            if self._static_end:
                raise self._fail(name, "duplicate STATIC_DATA_END")
            if pv and not self._pv_info:
                raise self._fail(name, "STATIC_DATA_END before X86_PV_INFO")
            return
        if v2 and rtype in (C.REC_TYPE_X86_PV_P2M_FRAMES, C.REC_TYPE_PAGE_DATA):
            if pv and not self._pv_info:
                raise self._fail(name, f"{name} before X86_PV_INFO")
            self._static_end = True  # implied in v2 (spec: "Version 2 compatibility")
        if not self._static_end and not v2 and rtype != C.REC_TYPE_VERIFY:
            raise self._fail(name, f"{name} before STATIC_DATA_END")
        if rtype == C.REC_TYPE_PAGE_DATA and pv and not self._p2m:
            raise self._fail(name, "PAGE_DATA before X86_PV_P2M_FRAMES")
        if rtype in _VCPU and not self._pages:
            raise self._fail(name, f"{name} before any PAGE_DATA")
        if rtype == C.REC_TYPE_CHECKPOINT and self.expect_checkpointed is False:
            raise self._fail(name, "CHECKPOINT in a non-checkpointed stream")

    def _order_libxl(self, rtype: int, name: str) -> None:
        if rtype == C.LIBXL_LIBXC_CONTEXT:
            if self._libxc_seen:
                raise self._fail(name, "second LIBXC_CONTEXT")
        elif rtype == C.LIBXL_CHECKPOINT_END:
            if not self._in_checkpoint:
                raise self._fail(name, "CHECKPOINT_END without a libxc CHECKPOINT")
        elif rtype == C.LIBXL_END:
            if self._in_checkpoint:
                raise self._fail(name, "END inside a checkpoint (expected CHECKPOINT_END)")
            if not self._libxc_done:
                raise self._fail(name, "END before the libxc stream ended")

    def _after(self, layer: str, rtype: int, out: list[Event]) -> None:
        """State changes once a record is accepted."""
        if layer == LIBXC:
            if rtype == C.REC_TYPE_X86_PV_INFO:
                self._pv_info = True
            elif rtype == C.REC_TYPE_STATIC_DATA_END:
                self._static_end = True
            elif rtype == C.REC_TYPE_X86_PV_P2M_FRAMES:
                self._p2m = True
            elif rtype == C.REC_TYPE_PAGE_DATA:
                self._pages = True
            elif rtype == C.REC_TYPE_CHECKPOINT:
                self.checkpointed = True
                if self._wrapped:
                    self._in_checkpoint = True
                    self._phase = LIBXL_REC
                else:
                    self._end_epoch(out)
            elif rtype == C.REC_TYPE_END:
                self._libxc_done = True
                if self._wrapped:
                    self._phase = LIBXL_REC
                else:
                    self._finish(out)
            return
        if rtype == C.LIBXL_LIBXC_CONTEXT:
            self._libxc_seen = True
            self._phase = IMAGE_HDR
        elif rtype == C.LIBXL_CHECKPOINT_END:
            self._in_checkpoint = False
            self._end_epoch(out)
            self._phase = LIBXC_REC
        elif rtype == C.LIBXL_END:
            self._finish(out)

    def _end_epoch(self, out: list[Event]) -> None:
        out.append(EpochEnd(offset=self._item_end, wire=b"", epoch=self.epoch))
        self.epoch += 1
        self._at_epoch_boundary = True

    def _finish(self, out: list[Event]) -> None:
        out.append(StreamEnd(offset=self._item_end, wire=b"", epoch=self.epoch))
        self._phase = DONE

    def _eof(self, out: list[Event]) -> None:
        if self._phase == DONE:
            return
        if self._partial is not None:
            have = self._pfill
            want = self._ptotal or _HEAD[self._phase]
            raise StreamError(f"truncated: stream ends after {have} of {want} bytes",
                              self.offset, self.collecting(), None, self.epoch)
        if self._phase == DETECT:
            raise StreamError("empty stream", 0, field="magic")
        if self.checkpointed and self._at_epoch_boundary and self.expect_checkpointed:
            out.append(StreamEnd(offset=self.offset, epoch=self.epoch, complete=False))
            self._phase = DONE
            return
        what = _PHASE_ITEM.get(self._phase, "record")
        hint = ""
        if self.checkpointed and self._at_epoch_boundary:
            hint = (f"; checkpointed stream stopped after epoch {self.epoch - 1} "
                    "(accepted only when a checkpointed stream is expected)")
        raise StreamError(f"truncated: stream ends before the next {what}, without END{hint}",
                          self.offset, None, None, self.epoch)
