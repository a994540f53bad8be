"""The bytes the continuous restore holds until it forwards them, and their memory cost.

A buffer is counted by what it keeps alive, not by its length: a memoryview of a small
record pins the whole chunk it was read in, and one Python object per small record
costs more than the record (an epoch of 8-byte records held as views took ~28 bytes of
memory per byte). So small buffers are copied into shared segments; a large one is kept
as it is when it owns most of its backing (a record reassembled in its own buffer,
decompressed pages), counted at the backing's size, and copied otherwise.
"""

from __future__ import annotations

from xen_remus.stream.events import Buffer

COPY_BELOW = 256 << 10  # smaller buffers are copied into a segment
SEGMENT = 4 << 20  # a segment grows up to this, then the next one starts


def backing_size(buf: Buffer) -> tuple[object, int]:
    """The object whose memory ``buf`` keeps alive, and that memory's size."""
    view = memoryview(buf)
    obj = view.obj if view.obj is not None else buf
    return obj, memoryview(obj).nbytes


class Held:
    """Buffers in stream order; ``cost`` is the memory they keep alive, ``nbytes``
    their length."""

    def __init__(self) -> None:
        self.cost = 0
        self.nbytes = 0
        self._bufs: list[Buffer] = []
        self._seg: bytearray | None = None
        self._seg_cost = 0  # what the open segment has allocated (counted in cost)
        self._backings: dict[int, object] = {}  # id -> object, counted once each

    def __len__(self) -> int:
        return self.nbytes

    def holds(self, obj: object) -> bool:
        """Whether ``obj``'s memory is already counted here (a kept buffer's backing)."""
        return id(obj) in self._backings

    def add(self, buf: Buffer) -> None:
        n = memoryview(buf).nbytes
        if not n:
            return
        self.nbytes += n
        if n >= COPY_BELOW:
            obj, size = backing_size(buf)
            if size <= 2 * n or id(obj) in self._backings:
                self._close()
                self._bufs.append(buf)
                if id(obj) not in self._backings:
                    self._backings[id(obj)] = obj
                    self.cost += size
                return
            if n >= SEGMENT:
                self._close()
                self._bufs.append(bytes(buf))
                self.cost += n
                return
        seg = self._seg
        if seg is None or len(seg) + n > SEGMENT:
            self._close()
            seg = self._seg = bytearray()
        seg += buf
        alloc = seg.__alloc__()
        self.cost += alloc - self._seg_cost
        self._seg_cost = alloc

    def _close(self) -> None:
        if self._seg is not None:
            self._bufs.append(self._seg)
            self._seg, self._seg_cost = None, 0

    def take(self) -> list[Buffer]:
        """Everything held, in order; the holder is empty afterwards."""
        self._close()
        out = self._bufs
        self._bufs, self._backings = [], {}
        self.cost = self.nbytes = 0
        return out
