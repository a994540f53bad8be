"""What every record body shares: the Body protocol, the length check that names the
record header's length field, and the bodies with no layout of their own (Empty, Blob).

Each body class (here, libxc_bodies.py, libxl_bodies.py) checks what the spec states about
its own bytes (lengths, reserved fields, value ranges) and raises FieldError(field, message,
offset-in-body). Ordering rules live in the decoder; which class decodes which record type,
in records.BODY_TYPES.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

from xen_remus.stream.errors import FieldError
from xen_remus.stream.events import Buffer

II = struct.Struct("<II")  # two u32 fields, the head of several bodies


class Body(Protocol):
    def pack(self) -> list[Buffer]: ...

    def describe(self) -> dict[str, Any]: ...


LENGTH_REL = -4  # the record header's length field, relative to the body


def need_len(body: Buffer, exact: int) -> None:
    if len(body) != exact:
        raise FieldError("length", f"{len(body)}, expected {exact}", LENGTH_REL)


@dataclass
class Empty:
    """END, CHECKPOINT, VERIFY, STATIC_DATA_END, LIBXC_CONTEXT, CHECKPOINT_END."""

    def pack(self) -> list[Buffer]:
        return []

    @classmethod
    def unpack(cls, body: Buffer) -> Self:
        need_len(body, 0)
        return cls()

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass
class Blob:
    """An opaque body: SHARED_INFO, HVM_CONTEXT, policies, unknown optional records."""

    data: Buffer = b""
    exact: ClassVar[int | None] = None
    entry: ClassVar[int] = 1
    min_len: ClassVar[int] = 0

    def pack(self) -> list[Buffer]:
        return [self.data] if len(self.data) else []

    @classmethod
    def unpack(cls, body: Buffer) -> Self:
        if cls.exact is not None:
            need_len(body, cls.exact)
        if len(body) < cls.min_len:
            raise FieldError("length", f"{len(body)}, expected at least {cls.min_len}", LENGTH_REL)
        if len(body) % cls.entry:
            raise FieldError("length", f"{len(body)} is not a multiple of {cls.entry}", LENGTH_REL)
        return cls(memoryview(body))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"data_len": len(self.data)}
        if self.entry > 1:
            d["entries"] = len(self.data) // self.entry
        return d
