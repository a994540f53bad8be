"""Events the decoder returns; the header events double as the encoder's header types."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from xen_remus.stream import consts as C
from xen_remus.stream.errors import FieldError

Buffer = bytes | bytearray | memoryview


@dataclass(kw_only=True)
class Event:
    """Common to all events: absolute ``offset``, the exact ``wire`` bytes, the ``epoch``."""

    offset: int = field(default=-1, compare=False)
    wire: Buffer = field(default=b"", compare=False, repr=False)
    epoch: int = field(default=0, compare=False)


_XL = struct.Struct("<32sIIII")
_U32 = struct.Struct("<I")


@dataclass
class XlHeader(Event):
    """xl save header (tools/xl/xl.h) and its optional data (u32 length + JSON config)."""

    mandatory_flags: int = C.XL_MANDATORY_FLAG_STREAMV2
    optional_flags: int = 0
    config: bytes = b""  # as written: JSON text including its NUL, or b""
    extra: bytes = b""  # optional data after the config chunk (none in Xen 4.17)

    @classmethod
    def with_config(cls, config_json: str) -> XlHeader:
        return cls(
            mandatory_flags=C.XL_MANDATORY_FLAG_STREAMV2 | C.XL_MANDATORY_FLAG_JSON,
            config=config_json.encode() + b"\0",
        )

    def pack(self) -> bytes:
        opt = _U32.pack(len(self.config)) + self.config + self.extra
        hdr = _XL.pack(C.XL_MAGIC, C.XL_BYTEORDER, self.mandatory_flags,
                       self.optional_flags, len(opt))
        return hdr + opt

    @staticmethod
    def total_size(fixed: Buffer) -> int:
        """Size of header + optional data, from the first XL_HDR_SIZE bytes."""
        magic, order, mand, _opt, optlen = _XL.unpack_from(fixed)
        if magic != C.XL_MAGIC:
            raise FieldError("magic", f"not the xl save magic ({bytes(magic[:27])!r}…)", 0)
        if order != C.XL_BYTEORDER:
            raise FieldError("byteorder", f"0x{order:08x}, expected 0x{C.XL_BYTEORDER:08x}"
                             " (foreign byte order)", 32)
        if mand & ~C.XL_MANDATORY_FLAGS_KNOWN:
            raise FieldError("mandatory_flags", f"unknown mandatory flags 0x{mand:x}", 36)
        if not mand & C.XL_MANDATORY_FLAG_STREAMV2:
            raise FieldError("mandatory_flags", "STREAMv2 flag clear: legacy v1 stream "
                             "is not supported", 36)
        if optlen > C.REC_LENGTH_MAX:
            raise FieldError("optional_data_len", f"{optlen} exceeds {C.REC_LENGTH_MAX}", 44)
        return int(C.XL_HDR_SIZE + optlen)

    @classmethod
    def unpack(cls, data: Buffer) -> XlHeader:
        cls.total_size(data)
        _m, _o, mand, optf, optlen = _XL.unpack_from(data)
        opt = bytes(data[C.XL_HDR_SIZE:C.XL_HDR_SIZE + optlen])
        config = b""
        extra = b""
        if opt:
            if len(opt) < 4:
                raise FieldError("optional_data", f"{len(opt)} bytes, shorter than the "
                                 "u32 config length", C.XL_HDR_SIZE)
            (clen,) = _U32.unpack_from(opt)
            if clen > len(opt) - 4:
                raise FieldError("config_len", f"{clen} exceeds optional data "
                                 f"({len(opt) - 4} bytes)", C.XL_HDR_SIZE)
            config, extra = opt[4:4 + clen], opt[4 + clen:]
        if mand & C.XL_MANDATORY_FLAG_JSON:
            rel = C.XL_HDR_SIZE + 4
            if not config or config[-1] != 0:
                raise FieldError("config", "JSON flag set but config is empty or not "
                                 "NUL-terminated", rel)
            try:
                json.loads(config[:-1].decode())
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise FieldError("config", f"invalid JSON: {exc}", rel) from None
        return cls(mandatory_flags=mand, optional_flags=optf, config=config, extra=extra)

    def config_json(self) -> Any:
        """The domain configuration as parsed JSON (None without one)."""
        if not self.config or not self.mandatory_flags & C.XL_MANDATORY_FLAG_JSON:
            return None
        return json.loads(self.config.rstrip(b"\0").decode())

    def guest_type(self) -> str | None:
        """The guest's type as libxl sees it ("pv", "hvm", "pvh"): the key of b_info's
        type union ("type.hvm": {...}), else c_info.type; None if the config says neither."""
        cfg = self.config_json()
        if not isinstance(cfg, dict):
            return None
        b_info, c_info = cfg.get("b_info"), cfg.get("c_info")
        if isinstance(b_info, dict):
            for key in b_info:
                if isinstance(key, str) and key.startswith("type."):
                    return key[5:]
        kind = c_info.get("type") if isinstance(c_info, dict) else None
        return kind if isinstance(kind, str) else None

    def describe(self) -> dict[str, Any]:
        return {"mandatory_flags": self.mandatory_flags, "optional_flags": self.optional_flags,
                "config_len": len(self.config), "extra_len": len(self.extra)}


def _check_options(options: int, big_endian: int, other: int, offset: int,
                   digits: int) -> None:
    """The options word of the libxl and the libxc image header: the big-endian bit is
    known but not supported; bits outside ``big_endian | other`` are reserved."""
    if options & big_endian:
        raise FieldError("options", "big-endian streams are not supported", offset)
    if options & ~(big_endian | other):
        raise FieldError("options", f"reserved bits set (0x{options:0{digits}x})", offset)


@dataclass
class VersionedHeader(Event):
    """What the libxl header and the libxc image header have in common."""

    version: int
    options: int = 0

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "options": self.options}


_LIBXL = struct.Struct(">QII")


@dataclass
class LibxlHeader(VersionedHeader):
    """libxl stream header: ident "LibxlFmt", version 2, options (big-endian)."""

    version: int = C.LIBXL_VERSION

    def pack(self) -> bytes:
        return _LIBXL.pack(C.LIBXL_IDENT, self.version, self.options)

    @classmethod
    def unpack(cls, data: Buffer) -> LibxlHeader:
        ident, version, options = _LIBXL.unpack_from(data)
        if ident != C.LIBXL_IDENT:
            raise FieldError("ident", f"0x{ident:016x}, expected 0x{C.LIBXL_IDENT:016x} "
                             "(LibxlFmt)", 0)
        if version != C.LIBXL_VERSION:
            raise FieldError("version", f"{version}, expected {C.LIBXL_VERSION}", 8)
        _check_options(options, C.LIBXL_OPT_BIG_ENDIAN, C.LIBXL_OPT_LEGACY, 12, 8)
        return cls(version=version, options=options)


_IHDR = struct.Struct(">QIIHHI")


@dataclass
class ImageHeader(VersionedHeader):
    """libxc image header: marker, "XENF", version 3 (2 accepted), options (big-endian)."""

    version: int = 3

    def pack(self) -> bytes:
        return _IHDR.pack(C.IHDR_MARKER, C.IHDR_ID, self.version, self.options, 0, 0)

    @classmethod
    def unpack(cls, data: Buffer) -> ImageHeader:
        marker, ident, version, options, res1, res2 = _IHDR.unpack_from(data)
        if marker != C.IHDR_MARKER:
            why = " (legacy pre-v2 image?)" if marker != 0 else ""
            raise FieldError("marker", f"0x{marker:016x}, expected all ones{why}", 0)
        if ident != C.IHDR_ID:
            raise FieldError("id", f"0x{ident:08x}, expected 0x{C.IHDR_ID:08x} (XENF)", 8)
        if version not in C.IHDR_VERSIONS:
            raise FieldError("version", f"{version}, expected 2 or 3", 12)
        _check_options(options, C.IHDR_OPT_BIG_ENDIAN, 0, 16, 4)
        if res1 or res2:
            raise FieldError("reserved", "not zero", 18 if res1 else 20)
        return cls(version=version, options=options)


_DHDR = struct.Struct("<IHHII")


@dataclass
class DomainHeader(Event):
    """libxc domain header: guest type, page shift, Xen version that wrote it."""

    type: int = C.DHDR_TYPE_X86_HVM
    page_shift: int = C.PAGE_SHIFT
    xen_major: int = 4
    xen_minor: int = 17

    def pack(self) -> bytes:
        return _DHDR.pack(self.type, self.page_shift, 0, self.xen_major, self.xen_minor)

    @classmethod
    def unpack(cls, data: Buffer) -> DomainHeader:
        dtype, shift, res, major, minor = _DHDR.unpack_from(data)
        if dtype not in C.DHDR_TYPES:
            raise FieldError("type", f"unknown domain type {dtype}", 0)
        if shift != C.PAGE_SHIFT:
            raise FieldError("page_shift", f"{shift}, expected {C.PAGE_SHIFT}", 4)
        if res:
            raise FieldError("reserved", "not zero", 6)
        return cls(type=dtype, page_shift=shift, xen_major=major, xen_minor=minor)

    @property
    def is_pv(self) -> bool:
        return self.type == C.DHDR_TYPE_X86_PV

    def describe(self) -> dict[str, Any]:
        return {"type": C.DHDR_TYPES[self.type], "page_shift": self.page_shift,
                "xen_major": self.xen_major, "xen_minor": self.xen_minor}


@dataclass
class EpochEnd(Event):
    """The epoch ``epoch`` is complete (after libxl CHECKPOINT_END or bare libxc CHECKPOINT)."""


@dataclass
class StreamEnd(Event):
    """The stream is over: final END, or (``complete`` False) EOF at an epoch boundary of a
    checkpointed stream when the caller expected one (the primary stopped: failover)."""

    complete: bool = True
