"""The libxc layer's record bodies (xg_sr_stream_format.h): pages, PV and HVM state.

Each checks its own bytes as bodies.py says; Empty and Blob bodies are there.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from xen_remus.stream import consts as C
from xen_remus.stream.bodies import II, LENGTH_REL, Blob, need_len
from xen_remus.stream.errors import FieldError
from xen_remus.stream.events import Buffer

_PAGE_HDR = struct.Struct("<II")


# The two PFN type sets of consts, as lookup tables for whole arrays of types.
_VALID = np.ones(16, dtype=np.bool_)
_VALID[list(C.PFINFO_INVALID)] = False
_DATA = np.ones(16, dtype=np.bool_)
_DATA[list(C.PFINFO_NO_DATA)] = False


def valid_types(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per entry: a type the stream may carry (0..15 but not 5..8)."""
    ok: npt.NDArray[np.bool_] = (types <= 0xF) & _VALID[types & 0xF]
    return ok


def carries_data(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per entry of a PAGE_DATA record: its page's contents follow (every type but BROKEN,
    XALLOC and XTAB; callers reject the invalid types 5..8 first)."""
    data: npt.NDArray[np.bool_] = _DATA[types & 0xF]
    return data


@dataclass
class PageData:
    """PAGE_DATA: count, pfn[count] with type in bits 63-60, then pages for data types.

    ``pfns``/``types`` are numpy arrays (uint64 / uint8). ``data`` is the page contents:
    one contiguous buffer when decoded, or a sequence of page buffers for the encoder
    (passed through untouched for writev).
    """

    pfns: npt.NDArray[np.uint64]
    types: npt.NDArray[np.uint8]
    data: Buffer | Sequence[Buffer] = b""

    @classmethod
    def make(cls, pfns: Sequence[int] | npt.NDArray[Any], types: Sequence[int] |
             npt.NDArray[Any] | None = None, pages: Sequence[Buffer] = ()) -> PageData:
        p = np.asarray(pfns, dtype=np.uint64)
        t = (np.zeros(len(p), np.uint8) if types is None
             else np.asarray(types, dtype=np.uint8))
        return cls(p, t, list(pages))

    @property
    def count(self) -> int:
        return len(self.pfns)

    @property
    def data_pages(self) -> int:
        """How many of the pfns carry page contents."""
        return int(carries_data(self.types).sum())

    def page_bytes(self) -> memoryview:
        """All page contents as one memoryview (decoded records)."""
        if isinstance(self.data, Buffer):
            return memoryview(self.data)
        return memoryview(b"".join(self.data))

    def pack(self) -> list[Buffer]:
        if len(self.pfns) != len(self.types):
            raise ValueError("PAGE_DATA: pfns and types differ in length")
        words = (self.pfns.astype("<u8") |
                 (self.types.astype("<u8") << np.uint64(C.PFN_TYPE_SHIFT)))
        head: list[Buffer] = [_PAGE_HDR.pack(len(self.pfns), 0), words.tobytes()]
        if isinstance(self.data, Buffer):
            return head + ([self.data] if len(self.data) else [])
        return head + list(self.data)

    @classmethod
    def unpack(cls, body: Buffer) -> PageData:
        n = len(body)
        if n < 8:
            raise FieldError("count", f"body of {n} bytes has no count/reserved", 0)
        count, res = _PAGE_HDR.unpack_from(body)
        if count == 0:
            raise FieldError("count", "must be > 0", 0)
        if res:
            raise FieldError("reserved", f"not zero (0x{res:08x})", 4)
        if 8 + 8 * count > n:
            raise FieldError("count", f"{count} pfns do not fit in {n} bytes", 0)
        words = np.frombuffer(body, dtype="<u8", count=count, offset=8)
        types = (words >> np.uint64(C.PFN_TYPE_SHIFT)).astype(np.uint8)
        bad = np.flatnonzero(words & np.uint64(C.PFN_RESERVED_MASK))
        if len(bad):
            i = int(bad[0])
            raise FieldError(f"pfn[{i}]", "reserved bits 59-52 set", 8 + 8 * i)
        bad = np.flatnonzero(~valid_types(types))
        if len(bad):
            i = int(bad[0])
            raise FieldError(f"pfn[{i}]", f"invalid page type 0x{int(types[i]):x}", 8 + 8 * i)
        ndata = int(carries_data(types).sum())
        want = 8 + 8 * count + C.PAGE_SIZE * ndata
        if n != want:
            raise FieldError("length", f"{n}, expected {want} for {count} pfns of which "
                             f"{ndata} carry data", LENGTH_REL)
        pfns = words & np.uint64(C.PFN_MASK)
        return cls(pfns, types, memoryview(body)[8 + 8 * count:])

    def describe(self) -> dict[str, Any]:
        hist = np.bincount(self.types, minlength=16)
        return {"count": self.count,
                "first_pfn": int(self.pfns[0]) if self.count else None,
                "last_pfn": int(self.pfns[-1]) if self.count else None,
                "types": {C.PFINFO_NAMES.get(t, hex(t)): int(hist[t])
                          for t in range(16) if hist[t]}}


@dataclass
class X86PvInfo:
    guest_width: int = 8
    pt_levels: int = 4
    _S: ClassVar[struct.Struct] = struct.Struct("<BB6s")

    def pack(self) -> list[Buffer]:
        return [self._S.pack(self.guest_width, self.pt_levels, bytes(6))]

    @classmethod
    def unpack(cls, body: Buffer) -> X86PvInfo:
        need_len(body, 8)
        width, levels, res = cls._S.unpack_from(body)
        if (width, levels) not in ((4, 3), (8, 4)):
            raise FieldError("guest_width", f"width {width} with {levels} pagetable levels"
                             " (expected 4/3 or 8/4)", 0)
        if any(res):
            raise FieldError("reserved", "not zero", 2)
        return cls(width, levels)

    def describe(self) -> dict[str, Any]:
        return {"guest_width": self.guest_width, "pt_levels": self.pt_levels}


@dataclass
class X86PvP2mFrames:
    start_pfn: int
    end_pfn: int
    frames: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))

    def pack(self) -> list[Buffer]:
        return [II.pack(self.start_pfn, self.end_pfn),
                np.asarray(self.frames, dtype="<u8").tobytes()]

    @classmethod
    def unpack(cls, body: Buffer) -> X86PvP2mFrames:
        if len(body) < 16 or len(body) % 8:
            raise FieldError("length", f"{len(body)}: needs start/end and at least one "
                             "frame, in 8-byte units", LENGTH_REL)
        start, end = II.unpack_from(body)
        if start > end:
            raise FieldError("p2m_start_pfn", f"{start} > p2m_end_pfn {end}", 0)
        frames = np.frombuffer(body, dtype="<u8", offset=8).astype(np.uint64)
        return cls(start, end, frames)

    def describe(self) -> dict[str, Any]:
        return {"p2m_start_pfn": self.start_pfn, "p2m_end_pfn": self.end_pfn,
                "frames": len(self.frames)}


@dataclass
class X86PvVcpu:
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: vcpu_id, reserved, context blob.

    A zero-length body (errata: Xen 4.6-4.8) decodes with ``vcpu_id`` None.
    """

    vcpu_id: int | None
    context: Buffer = b""
    entry: ClassVar[int] = 1

    def pack(self) -> list[Buffer]:
        if self.vcpu_id is None:
            return []
        return [II.pack(self.vcpu_id, 0), self.context]

    @classmethod
    def unpack(cls, body: Buffer) -> Self:
        if len(body) == 0:
            return cls(None)
        if len(body) < 8:
            raise FieldError("length", f"{len(body)}: shorter than the vcpu header", LENGTH_REL)
        vcpu, res = II.unpack_from(body)
        if res:
            raise FieldError("reserved", "not zero", 4)
        if (len(body) - 8) % cls.entry:
            raise FieldError("length", f"context of {len(body) - 8} bytes is not a multiple"
                             f" of {cls.entry}", LENGTH_REL)
        return cls(vcpu, memoryview(body)[8:])

    def describe(self) -> dict[str, Any]:
        return {"vcpu_id": self.vcpu_id, "context_len": len(self.context)}




class X86PvVcpuMsrs(X86PvVcpu):
    entry: ClassVar[int] = 16  # xen_domctl_vcpu_msr_t



class SharedInfo(Blob):
    exact = C.PAGE_SIZE


class HvmContext(Blob):
    min_len = 1


class X86CpuidPolicy(Blob):
    entry = 24  # xen_cpuid_leaf_t


class X86MsrPolicy(Blob):
    entry = 16  # xen_msr_entry_t


@dataclass
class X86TscInfo:
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQII")

    def pack(self) -> list[Buffer]:
        return [self._S.pack(self.mode, self.khz, self.nsec, self.incarnation, 0)]

    @classmethod
    def unpack(cls, body: Buffer) -> X86TscInfo:
        need_len(body, 24)
        mode, khz, nsec, inc, res = cls._S.unpack_from(body)
        if res:
            raise FieldError("reserved", "not zero", 20)
        return cls(mode, khz, nsec, inc)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "khz": self.khz, "nsec": self.nsec,
                "incarnation": self.incarnation}


@dataclass
class HvmParams:
    """HVM_PARAMS: count, reserved, {index, value} x count. Empty body accepted (errata).

    ``params`` is a (count x 2) uint64 array, a view of the body when decoded: a record
    of 128 MiB is 8 Mi pairs, which as Python tuples would cost seconds and ~20x its
    size."""

    params: npt.NDArray[np.uint64] | Sequence[tuple[int, int]] = ()

    def __post_init__(self) -> None:
        self.params = np.asarray(self.params, dtype="<u8").reshape(-1, 2)

    def pack(self) -> list[Buffer]:
        arr = np.asarray(self.params, dtype="<u8").reshape(-1, 2)
        return [II.pack(len(arr), 0), arr.tobytes()]

    @classmethod
    def unpack(cls, body: Buffer) -> HvmParams:
        if len(body) == 0:
            return cls()
        if len(body) < 8:
            raise FieldError("length", f"{len(body)}: shorter than count/reserved", LENGTH_REL)
        count, res = II.unpack_from(body)
        if res:
            raise FieldError("reserved", "not zero", 4)
        if len(body) != 8 + 16 * count:
            raise FieldError("count", f"{count} entries need {8 + 16 * count} bytes, "
                             f"body has {len(body)}", 0)
        return cls(np.frombuffer(body, dtype="<u8", offset=8).reshape(-1, 2))

    def describe(self) -> dict[str, Any]:
        return {"count": len(self.params)}


@dataclass
class PfnList:
    """CHECKPOINT_DIRTY_PFN_LIST (COLO back channel): pfn[] u64."""

    pfns: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))

    def pack(self) -> list[Buffer]:
        return [np.asarray(self.pfns, dtype="<u8").tobytes()]

    @classmethod
    def unpack(cls, body: Buffer) -> PfnList:
        if len(body) % 8:
            raise FieldError("length", f"{len(body)} is not a multiple of 8", LENGTH_REL)
        return cls(np.frombuffer(body, dtype="<u8").astype(np.uint64))

    def describe(self) -> dict[str, Any]:
        return {"count": len(self.pfns)}
