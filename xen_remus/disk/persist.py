"""What a replicated disk keeps across restarts, under the state directory (paths.py).

The primary's dirty bitmap (DirtyBitmap): the blocks written since the last epoch the
backup ACKed, relative to that base (generation, epoch). When the next protection finds
the backup's replica still at the base, only those blocks are sent again; otherwise (or
with no trusted bitmap) the synchronisation compares chunk hashes (sync.py).

The backup's replica record (ReplicaRecord): the protection (generation) that last wrote
the replica, and whether anything else wrote it since (``local``: a failover ran the guest
on it; the disk daemon serving it then keeps its own dirty bitmap, for a later failback).

A bitmap is trusted only if the daemon that kept it closed it cleanly: while it runs the
file says "open", so a crash (when a write may have reached the image but not the bitmap)
leaves it untrusted. Within a run the bitmap lives in memory; it is written at close.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Final

from xen_remus.disk.errors import DiskError
from xen_remus.fdio import replace_durably
from xen_remus.paths import state_dir

log = logging.getLogger(__name__)

BLOCK: Final = 64 * 1024  # bytes per bit
NO_BASE: Final = (1 << 64) - 1  # "no base" in a u64 field
_MAGIC: Final = b"XRDKBMP1"
_HEAD = struct.Struct("<8sIIQQQ")  # magic, block, clean, image size, base generation, epoch
_OPEN, _CLEAN = 0, 1


def _name(image: str, suffix: str) -> Path:
    real = os.path.realpath(image)
    tag = hashlib.sha256(real.encode()).hexdigest()[:16]
    return state_dir() / "disk" / f"{os.path.basename(real)}.{tag}.{suffix}"


class DirtyBitmap:
    """Blocks of ``image`` written since ``base`` (the last (generation, epoch) ACKed).

    ``trusted`` is False when the bitmap on file could not be used (missing, from another
    image size, not closed cleanly); ``why`` says which. ``mark`` takes each guest write
    with its epoch; ``acked`` clears the blocks of the epochs the backup now holds (unless
    a later epoch wrote them again); ``restart`` starts a new protection (epochs count from
    0 again: every block marked so far stays until that protection's first ACK).
    """

    def __init__(self, image: str, size: int, block: int = BLOCK) -> None:
        self.path = _name(image, "dirty")
        self.size, self.block = size, block
        self.nblocks = -(-size // block)
        self.bits = bytearray(-(-self.nblocks // 8))
        self.base: tuple[int, int] | None = None
        self.trusted, self.why = self._load()
        # Blocks each unACKed epoch wrote; what was marked before this protection stays in
        # ``bits`` only, until its first ACK.
        self._epochs: dict[int, set[int]] = {}
        try:
            self._write(_OPEN)
        except OSError as exc:
            raise DiskError(f"dirty bitmap {self.path}: {exc.strerror}") from exc

    def _load(self) -> tuple[bool, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False, "no dirty bitmap on file"
        except OSError as exc:
            return False, f"dirty bitmap unreadable: {exc.strerror}"
        if len(data) != _HEAD.size + len(self.bits):
            return False, f"dirty bitmap of {len(data)} bytes, not of this image"
        magic, block, clean, size, gen, epoch = _HEAD.unpack_from(data)
        if magic != _MAGIC or block != self.block or size != self.size:
            return False, "dirty bitmap of another image size or format"
        if clean != _CLEAN:
            return False, "dirty bitmap not closed cleanly (the server stopped abruptly)"
        if gen == NO_BASE:
            return False, "dirty bitmap without a base (no protection was ACKed)"
        self.bits[:] = data[_HEAD.size:]
        self.base = (gen, epoch)
        return True, f"dirty bitmap relative to generation {gen}, epoch {epoch}"

    def _write(self, state: int) -> None:
        gen, epoch = self.base if self.base is not None else (NO_BASE, NO_BASE)
        replace_durably(self.path, _HEAD.pack(_MAGIC, self.block, state, self.size, gen, epoch)
                 + bytes(self.bits))

    @property
    def dirty_bytes(self) -> int:
        return sum(n for _, n in self.runs())

    def blocks(self) -> list[int]:
        return [i * 8 + b for i, byte in enumerate(self.bits) if byte
                for b in range(8) if byte & (1 << b) and i * 8 + b < self.nblocks]

    def runs(self) -> list[tuple[int, int]]:
        """The dirty byte ranges (offset, length), ascending, adjacent blocks joined."""
        out: list[tuple[int, int]] = []
        for i in self.blocks():
            start, end = i * self.block, min((i + 1) * self.block, self.size)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out

    def mark(self, epoch: int, offset: int, length: int) -> None:
        first, last = offset // self.block, (offset + max(length, 1) - 1) // self.block
        held = self._epochs.setdefault(epoch, set())
        for i in range(first, min(last, self.nblocks - 1) + 1):
            self.bits[i >> 3] |= 1 << (i & 7)
            held.add(i)

    def restart(self) -> None:
        self._epochs.clear()  # their blocks stay marked in ``bits``

    def acked(self, generation: int, epoch: int) -> None:
        """The backup holds protection ``generation`` through ``epoch``."""
        for e in [e for e in self._epochs if e <= epoch]:
            del self._epochs[e]
        self.bits[:] = bytes(len(self.bits))
        for blocks in self._epochs.values():
            for i in blocks:
                self.bits[i >> 3] |= 1 << (i & 7)
        self.base = (generation, epoch)
        self.trusted, self.why = True, f"relative to generation {generation}, epoch {epoch}"

    def close(self) -> None:
        """Written with its base, marked clean: trusted by the next server of the image."""
        try:
            self._write(_CLEAN)
        except OSError as exc:
            log.error("dirty bitmap %s not saved: %s", self.path, exc.strerror)


class ReplicaRecord:
    """The backup's record of one replica image: ``generation`` that wrote it last, and
    ``state``: "replica" (written only by that protection's stream) or "local"."""

    def __init__(self, image: str) -> None:
        self.path = _name(image, "replica")

    def read(self) -> dict[str, object] | None:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def at_base(self, generation: int, size: int) -> bool:
        """Whether the replica is as protection ``generation`` left it."""
        doc = self.read()
        return (doc is not None and doc.get("state") == "replica"
                and doc.get("generation") == generation and doc.get("size") == size)

    def write(self, generation: int | None, state: str, size: int,
              epoch: int | None = None) -> None:
        try:
            replace_durably(self.path, json.dumps({"generation": generation, "state": state,
                                            "size": size, "epoch": epoch}).encode())
        except OSError as exc:
            raise DiskError(f"replica record {self.path}: {exc.strerror}") from exc
