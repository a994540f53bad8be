"""The epoch loop's end of a replicated disk served by another process (disk/daemon.py).

``SocketControl`` is the DiskControl of ReplicatedDisk for such a disk: at ``seal(N)``
(the guest suspended) it asks the server to seal epoch N and reads every frame up to and
including SEAL(N); those bytes go, unchanged, into checkpoint N as REMUS_DISK records
(``on_frames``), so the backup receives the epoch's disk writes with its memory and
commits both together. ``commit(N)`` tells the server the backup holds N (ACK(N)).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from xen_remus.devices.base import DeviceError
from xen_remus.disk.replica import (
    HEADER_SIZE,
    SEAL,
    Frame,
    FrameDecoder,
    ack_frame,
    seal_frame,
)

SEAL_TIMEOUT = 5.0  # s for the server to seal an epoch (the guest is suspended meanwhile)
# Epoch 0 carries the whole image (initial synchronisation); allow for a large one.
FIRST_SEAL_TIMEOUT = 600.0
READ_CHUNK = 1 << 20
# (vdev, the frames through SEAL(N), where each frame ends in them)
OnFrames = Callable[[str, bytes, list[int]], None]


class SocketControl:
    """Control of one disk's server over its replication socket."""

    def __init__(self, vdev: str, path: str, on_frames: OnFrames) -> None:
        self.vdev, self.path, self.on_frames = vdev, path, on_frames
        self._sock: socket.socket | None = None
        self._dec = FrameDecoder()
        self._frames: list[Frame] = []  # decoded, not yet past a SEAL we waited for
        self._raw = bytearray()  # bytes received and not yet handed on
        self._base = 0  # stream offset of _raw[0]
        self.sealed = -1

    @property
    def name(self) -> str:
        return f"disk {self.vdev} ({self.path})"

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise DeviceError(f"{self.name}: cannot reach its replication socket: "
                              f"{exc.strerror}") from None
        self._sock = s

    def _need(self) -> socket.socket:
        if self._sock is None:
            raise DeviceError(f"{self.name}: not connected")
        return self._sock

    def seal(self, epoch: int) -> None:
        sock = self._need()
        sock.sendall(seal_frame(epoch))
        timeout = FIRST_SEAL_TIMEOUT if self.sealed < 0 else SEAL_TIMEOUT
        deadline = time.monotonic() + timeout
        while (done := self._through_seal(epoch)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(f"{self.name}: the server did not seal epoch {epoch} "
                                  f"within {timeout:g} s")
            sock.settimeout(left)
            try:
                data = sock.recv(READ_CHUNK)
            except TimeoutError:
                continue
            if not data:
                raise DeviceError(f"{self.name}: the server closed the replication "
                                  f"socket before sealing epoch {epoch}")
            self._raw += data
            self._frames += self._dec.feed(data)
        base = self._base
        ends = [f.at + HEADER_SIZE + len(f.data) - base for f in done]
        frames, self._raw = bytes(self._raw[:ends[-1]]), self._raw[ends[-1]:]
        self._base += ends[-1]
        self.sealed = epoch
        self.on_frames(self.vdev, frames, ends)

    def _through_seal(self, epoch: int) -> list[Frame] | None:
        """The frames up to and including SEAL(epoch), once it arrived."""
        for i, f in enumerate(self._frames):
            if f.kind == SEAL and f.epoch == epoch:
                done = self._frames[:i + 1]
                del self._frames[:i + 1]
                return done
        return None

    def commit(self, epoch: int) -> None:
        self._need().sendall(ack_frame(epoch))

    def release(self) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
