"""The libxl layer's record bodies (libxl_sr_stream_format.h) beyond the empty ones:
emulator state and the COLO checkpoint state.

Each checks its own bytes as bodies.py says; Empty and Blob bodies are there.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from xen_remus.stream import consts as C
from xen_remus.stream.bodies import II, LENGTH_REL, need_len
from xen_remus.stream.errors import FieldError
from xen_remus.stream.events import Buffer

_U32 = struct.Struct("<I")


@dataclass
class Emulator:
    """EMULATOR_CONTEXT (and base of EMULATOR_XENSTORE_DATA): emulator_id, index, blob."""

    emulator_id: int = C.EMULATOR_QEMU_UPSTREAM
    index: int = 0
    data: Buffer = b""

    def pack(self) -> list[Buffer]:
        return [II.pack(self.emulator_id, self.index), self.data]

    @classmethod
    def unpack(cls, body: Buffer) -> Self:
        if len(body) < 8:
            raise FieldError("length", f"{len(body)}: shorter than emulator_id/index", LENGTH_REL)
        eid, index = II.unpack_from(body)
        if eid not in C.EMULATOR_IDS:
            raise FieldError("emulator_id", f"unknown emulator {eid}", 0)
        rec = cls(eid, index, memoryview(body)[8:])
        rec.check()
        return rec

    def check(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"emulator_id": self.emulator_id, "index": self.index,
                "data_len": len(self.data)}


class EmulatorXenstoreData(Emulator):
    """Packed NUL-terminated key/value pairs relative to the device-model xenstore dir."""

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], emulator_id: int =
                   C.EMULATOR_QEMU_UPSTREAM, index: int = 0) -> EmulatorXenstoreData:
        data = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs)
        return cls(emulator_id, index, data)

    def check(self) -> None:
        data = bytes(self.data)
        if not data:
            return
        if data[-1] != 0:
            raise FieldError("data", "not NUL-terminated", len(data) + 7)
        if data.count(0) % 2:
            raise FieldError("data", "odd number of strings (key without value)", 8)

    def pairs(self) -> list[tuple[str, str]]:
        parts = bytes(self.data).split(b"\0")[:-1]
        return [(parts[i].decode(errors="replace"), parts[i + 1].decode(errors="replace"))
                for i in range(0, len(parts) - 1, 2)]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["keys"] = len(self.pairs())
        return d


@dataclass
class CheckpointState:
    control_id: int = 0

    def pack(self) -> list[Buffer]:
        return [_U32.pack(self.control_id)]

    @classmethod
    def unpack(cls, body: Buffer) -> CheckpointState:
        need_len(body, 4)
        (cid,) = _U32.unpack_from(body)
        if cid not in C.CHECKPOINT_STATES:
            raise FieldError("control_id", f"unknown value {cid}", 0)
        return cls(cid)

    def describe(self) -> dict[str, Any]:
        return {"control_id": C.CHECKPOINT_STATES[self.control_id]}
