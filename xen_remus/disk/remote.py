"""The epoch loop's end of a replicated disk served by another process (disk/daemon.py).

``SocketControl`` is the DiskControl of ReplicatedDisk for such a disk: at ``seal(N)``
(the guest suspended) it asks the server to seal epoch N and reads every frame up to and
including SEAL(N); those bytes go, unchanged, into checkpoint N as REMUS_DISK records
(``on_frames``), so the backup receives the epoch's disk writes with its memory and
commits both together. ``commit(N)`` tells the server the backup holds N (ACK(N)).

Before that, while the guest runs (before epoch 0's pre-copy), ``sync`` relays the
initial synchronisation (sync.py) both ways as it comes: the server's frames into the
stream at once, the backup's answers (``DiskBack`` from the channel) back to the server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from xen_remus.devices.base import DeviceError
from xen_remus.disk.replica import (
    HEADER_SIZE,
    SEAL,
    START,
    Frame,
    FrameDecoder,
    ack_frame,
    frame_bytes,
    seal_frame,
)
from xen_remus.disk.sync import SyncProgress

SEAL_TIMEOUT = 5.0  # s for the server to seal an epoch (the guest is suspended meanwhile)
# The first seal waits for guest writes queued during the synchronisation's relay.
FIRST_SEAL_TIMEOUT = 30.0
SYNC_SILENCE = 60.0  # s without a frame from the server before a synchronisation fails
READ_CHUNK = 1 << 20
# (vdev, the frames through SEAL(N), where each frame ends in them)
OnFrames = Callable[[str, bytes, list[int]], None]


class SocketControl:
    """Control of one disk's server over its replication socket."""

    def __init__(self, vdev: str, path: str, on_frames: OnFrames,
                 generation: int = 0) -> None:
        self.vdev, self.path, self.on_frames = vdev, path, on_frames
        self.generation = generation
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
        try:
            s.sendall(frame_bytes(START, 0, self.generation))
        except OSError as exc:
            self.disconnect()
            raise DeviceError(f"{self.name}: starting replication: {exc.strerror}"
                              ) from None

    def sync(self, relay: Callable[[], list[bytes]], flush: Callable[[], None],
             progress: Callable[[SyncProgress], None] | None = None) -> SyncProgress:
        """Relay the initial synchronisation until SYNCED is in the stream: ``relay``
        returns the backup's answers for this disk (and keeps the channel alive),
        ``flush`` sends what ``on_frames`` put into the stream."""
        sock = self._need()
        prog = SyncProgress()
        deadline = time.monotonic() + SYNC_SILENCE
        while not prog.finished:
            for data in relay():
                prog.back(data)
                self._send(sock, data, "relaying the backup's answer")
            frames = self._recv(sock, 0.05, "during the initial synchronisation")
            if frames is None:
                if time.monotonic() > deadline:
                    raise DeviceError(f"{self.name}: no synchronisation frame from the "
                                      f"server for {SYNC_SILENCE:g} s")
                continue
            deadline = time.monotonic() + SYNC_SILENCE
            if frames:
                self._hand_on(frames)
                prog.forward(frames)
                flush()
                if progress is not None:
                    progress(prog)
        return prog

    def _recv(self, sock: socket.socket, timeout: float, during: str) -> list[Frame] | None:
        """The frames completed by what the server sends within ``timeout`` (None: it sent
        nothing); ``during`` says when, should it close the socket."""
        sock.settimeout(timeout)
        try:
            data = sock.recv(READ_CHUNK)
        except TimeoutError:
            return None
        except OSError as exc:
            raise DeviceError(f"{self.name}: reading its replication socket: "
                              f"{exc.strerror}") from None
        if not data:
            raise DeviceError(f"{self.name}: the server closed the replication socket "
                              f"{during}")
        self._raw += data
        return self._dec.feed(data)

    def _send(self, sock: socket.socket, data: bytes, what: str) -> None:
        try:
            sock.settimeout(SEAL_TIMEOUT)
            sock.sendall(data)
        except OSError as exc:
            raise DeviceError(f"{self.name}: {what}: {exc.strerror or exc}") from None

    def _hand_on(self, done: list[Frame]) -> None:
        """``done``'s bytes (the oldest received) go into the stream, in frames."""
        base = self._base
        ends = [f.at + HEADER_SIZE + len(f.data) - base for f in done]
        frames, self._raw = bytes(self._raw[:ends[-1]]), self._raw[ends[-1]:]
        self._base += ends[-1]
        self.on_frames(self.vdev, frames, ends)

    def _need(self) -> socket.socket:
        if self._sock is None:
            raise DeviceError(f"{self.name}: not connected")
        return self._sock

    def seal(self, epoch: int) -> None:
        sock = self._need()
        self._send(sock, seal_frame(epoch), f"asking for the seal of epoch {epoch}")
        timeout = FIRST_SEAL_TIMEOUT if self.sealed < 0 else SEAL_TIMEOUT
        deadline = time.monotonic() + timeout
        done = self._through_seal(epoch, 0)
        while done is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(f"{self.name}: the server did not seal epoch {epoch} "
                                  f"within {timeout:g} s")
            frames = self._recv(sock, left, f"before sealing epoch {epoch}")
            if frames:
                new = len(self._frames)
                self._frames += frames
                done = self._through_seal(epoch, new)
        self.sealed = epoch
        self._hand_on(done)

    def _through_seal(self, epoch: int, start: int) -> list[Frame] | None:
        """The frames up to and including SEAL(epoch), once it arrived; looked for from
        ``start`` (those before were looked at already: a busy epoch has tens of
        thousands of frames, arriving a few at a time while the guest is suspended)."""
        for i in range(start, len(self._frames)):
            f = self._frames[i]
            if f.kind == SEAL and f.epoch == epoch:
                done = self._frames[:i + 1]
                del self._frames[:i + 1]
                return done
        return None

    def commit(self, epoch: int) -> None:
        self._send(self._need(), ack_frame(epoch), f"ACK of epoch {epoch}")

    def release(self) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
