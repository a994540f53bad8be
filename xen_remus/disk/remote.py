"""The epoch loop's end of a replicated disk served by another process (disk/daemon.py).

``SocketControl`` is the DiskControl of ReplicatedDisk for such a disk. Its frames reach
the backup as REMUS_DISK records (``on_frames`` puts them into the stream: at once while
the guest runs, into the checkpoint being buffered while it is suspended), unchanged and
in the server's order. Per epoch N:

- ``idle()``, again and again while the epoch loop waits between two checkpoints, hands
  on whatever the server sent since the last time: the open epoch's writes, streamed to
  the backup ahead of the checkpoint that seals them (the backup holds them apart, under
  their epoch, as it holds the rest);
- ``seal(N)``, the guest suspended, asks the server to seal epoch N on a second
  connection (CONTROL) and waits for its answer there: the server seals at once, while
  the stream's SEAL(N) may still wait behind a backlog of writes (the server's, ours).
  The pause waits for nothing else;
- ``carry(N)`` then reads the stream through SEAL(N) and hands it on. ``defer`` decides
  when: protect (cli/protect_disks.py) has the checkpoint call it where the seal left off,
  as it transmits, the guest running again; by default at once (into the checkpoint). So
  SEAL(N) is in checkpoint N, and the backup commits and ACKs N only with both.

A thread reads the stream as the server writes (``Inflow``): the socket's buffer holds
little, and read only when the loop gets to it, the backlog would build up on the
server's side. At most QUEUE_MAX bytes wait here; then the reader waits too, the server's
backlog grows, and at its cap (`disk serve --max-unacked`) the guest's I/O waits: nothing
is dropped.

``commit(N)`` tells the server the backup holds N (ACK(N)). Before epoch 0's seal,
``sync`` relays the initial synchronisation (sync.py) both ways as it comes: the server's
frames into the stream at once, the backup's answers (``DiskBack`` from the channel) back
to the server.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

from xen_remus.devices.base import DeviceError
from xen_remus.disk.errors import ReplicaStreamError
from xen_remus.disk.replica import (
    CONTROL,
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

log = logging.getLogger(__name__)

SEAL_TIMEOUT = 5.0  # s for the server to seal an epoch (the guest is suspended meanwhile)
# The first seal waits for guest writes queued during the synchronisation's relay.
FIRST_SEAL_TIMEOUT = 30.0
# s without a byte of the stream while its frames through an epoch's SEAL are awaited
CARRY_SILENCE = 5.0
SYNC_SILENCE = 60.0  # s without a frame from the server before a synchronisation fails
READ_CHUNK = 1 << 20
QUEUE_MAX = 32 << 20  # bytes read ahead of the epoch loop at most
# (vdev, whole frames, where each frame ends in them)
OnFrames = Callable[[str, bytes, list[int]], None]
# Given carry(N), calls it (at once, or where the checkpoint is when it is transmitted).
Defer = Callable[[Callable[[], None]], None]


class Inflow:
    """The server's bytes, read on a thread as they come, for ``take``; at most QUEUE_MAX
    bytes held (then the thread waits for a ``take``). ``end``, once reading stopped:
    "" for the server's EOF, else the error."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._chunks: list[bytes] = []
        self.held = 0  # bytes in _chunks
        self.end: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"xen-remus reader {name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.held < QUEUE_MAX or self._stopping)
                if self._stopping:
                    return
            end = ""
            try:
                data = self._sock.recv(READ_CHUNK)
            except TimeoutError:
                continue  # the socket's timeout is the sends'; a quiet server is no error
            except OSError as exc:
                data, end = b"", exc.strerror or str(exc)
            with self._cond:
                if data:
                    self._chunks.append(data)
                    self.held += len(data)
                else:
                    self.end = end
                self._cond.notify_all()
                if not data:
                    return

    def take(self, timeout: float) -> bytes | None:
        """All that was read and not yet taken, waiting up to ``timeout`` s for something;
        None if nothing came (``end`` then says whether more can)."""
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self.end is not None, timeout)
            chunks, self._chunks, self.held = self._chunks, [], 0
            self._cond.notify_all()
        return None if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def stop(self) -> None:
        """End the thread (after the socket was shut down: no recv left waiting)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(SEAL_TIMEOUT)


class SocketControl:
    """Control of one disk's server over its replication socket."""

    def __init__(self, vdev: str, path: str, on_frames: OnFrames,
                 generation: int = 0, defer: Defer | None = None) -> None:
        self.vdev, self.path, self.on_frames = vdev, path, on_frames
        self.generation = generation
        self.defer: Defer = defer if defer is not None else _now
        self._sock: socket.socket | None = None  # the stream
        self._ctl: socket.socket | None = None  # the seals
        self._inflow: Inflow | None = None
        self._dec = FrameDecoder()
        self._ctl_dec = FrameDecoder()
        self._ctl_frames: list[Frame] = []  # the server's answers, not yet looked at
        self._answered = False  # a seal was answered on the control connection
        self._frames: list[Frame] = []  # decoded, not yet handed on
        self._raw = bytearray()  # bytes taken and not yet handed on
        self._base = 0  # stream offset of _raw[0]
        self.received = 0  # bytes taken from the reader
        self.sealed = -1
        self.carried = -1  # the last epoch whose frames through its SEAL were handed on

    @property
    def name(self) -> str:
        return f"disk {self.vdev} ({self.path})"

    def connect(self) -> None:
        if self._sock is not None:
            return
        self._sock = self._open(frame_bytes(START, 0, self.generation), "starting replication")
        self._inflow = Inflow(self._sock, self.name)
        self._ctl = self._open(frame_bytes(CONTROL, 0, self.generation),
                               "opening its control connection")

    def _open(self, first: bytes, what: str) -> socket.socket:
        """A connection to the replication socket, ``first`` sent on it."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            self.disconnect()
            raise DeviceError(f"{self.name}: cannot reach its replication socket: "
                              f"{exc.strerror}") from None
        s.settimeout(SEAL_TIMEOUT)  # for the sends; the stream's reader just tries again
        try:
            s.sendall(first)
        except OSError as exc:
            s.close()
            self.disconnect()
            raise DeviceError(f"{self.name}: {what}: {exc.strerror}") from None
        return s

    def sync(self, relay: Callable[[], list[bytes]], flush: Callable[[], None],
             progress: Callable[[SyncProgress], None] | None = None) -> SyncProgress:
        """Relay the initial synchronisation until SYNCED is in the stream: ``relay``
        returns the backup's answers for this disk (and keeps the channel alive),
        ``flush`` sends what ``on_frames`` put into the stream."""
        sock = self._need(self._sock)
        prog = SyncProgress()
        deadline = time.monotonic() + SYNC_SILENCE
        while not prog.finished:
            for data in relay():
                prog.back(data)
                self._send(sock, data, "relaying the backup's answer")
            frames = self._recv(0.05, "during the initial synchronisation")
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

    def _recv(self, timeout: float, during: str) -> list[Frame] | None:
        """The frames completed by what the server sent, waiting up to ``timeout`` s
        (0: what is there) for something (None: nothing came); ``during`` says when,
        should it have closed the socket."""
        inflow = self._inflow
        if inflow is None:
            raise DeviceError(f"{self.name}: not connected")
        data = inflow.take(timeout)
        if data is None:
            if inflow.end:
                raise DeviceError(f"{self.name}: reading its replication socket: "
                                  f"{inflow.end}")
            if inflow.end is not None:
                raise DeviceError(f"{self.name}: the server closed the replication "
                                  f"socket {during}")
            return None
        self.received += len(data)
        self._raw += data
        return self._dec.feed(data)

    def _send(self, sock: socket.socket, data: bytes, what: str) -> None:
        try:
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

    def _need(self, sock: socket.socket | None) -> socket.socket:
        if sock is None:
            raise DeviceError(f"{self.name}: not connected")
        return sock

    def idle(self) -> None:
        """Between checkpoints: the whole frames read since the last time go into the
        stream now (no wait)."""
        if self.sealed < 0 or self.carried < self.sealed:
            return  # the synchronisation's relay, or a carry, has the stream
        frames = self._recv(0.0, "between checkpoints")
        if frames:
            self._frames += frames
        if self._frames:
            done, self._frames = self._frames, []
            self._hand_on(done)

    def seal(self, epoch: int) -> None:
        """Epoch ``epoch`` ends (the guest is suspended): once the server says it sealed
        it, ``defer`` gets carry(epoch). A server that never answered and closed the
        control connection is older than it: then SEAL(epoch) is asked in the stream and
        carried at once, in the pause, as that server expects."""
        if self._ctl is not None:
            try:
                self._seal_by_control(self._ctl, epoch)
            except _NoControl:
                log.warning("%s: its server takes no control connection (started by an "
                            "older xen-remus?): each pause waits for the epoch's writes",
                            self.name)
                self.disconnect_control()
            else:
                self.sealed = epoch
                self.defer(lambda: self.carry(epoch))
                return
        self._send(self._need(self._sock), seal_frame(epoch),
                   f"asking for the seal of epoch {epoch}")
        self.carry(epoch)
        self.sealed = epoch

    def _seal_by_control(self, ctl: socket.socket, epoch: int) -> None:
        try:
            ctl.sendall(seal_frame(epoch))
        except OSError as exc:
            if not self._answered:
                raise _NoControl from None
            raise DeviceError(f"{self.name}: asking for the seal of epoch {epoch}: "
                              f"{exc.strerror or exc}") from None
        timeout = FIRST_SEAL_TIMEOUT if self.sealed < 0 else SEAL_TIMEOUT
        deadline = time.monotonic() + timeout
        while not self._sealed(epoch):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                ctl.settimeout(left)
                data = ctl.recv(4096)
            except TimeoutError:
                raise DeviceError(f"{self.name}: the server did not seal epoch {epoch} "
                                  f"within {timeout:g} s") from None
            except OSError as exc:
                if not self._answered:
                    raise _NoControl from None
                raise DeviceError(f"{self.name}: reading its control connection: "
                                  f"{exc.strerror}") from None
            if not data:
                if not self._answered:
                    raise _NoControl
                raise DeviceError(f"{self.name}: the server closed its control connection "
                                  f"before sealing epoch {epoch}")
            try:
                self._ctl_frames += self._ctl_dec.feed(data)
            except ReplicaStreamError as exc:
                raise DeviceError(f"{self.name}: its control connection: {exc}") from None
        self._answered = True

    def _sealed(self, epoch: int) -> bool:
        """Whether the server's answers so far say ``epoch`` is sealed."""
        answers, self._ctl_frames = self._ctl_frames, []
        done = False
        for f in answers:
            if f.kind != SEAL or f.epoch > epoch:
                raise DeviceError(f"{self.name}: {f.name}({f.epoch}) on its control "
                                  f"connection while the seal of epoch {epoch} is awaited")
            done = done or f.epoch == epoch  # an earlier one: a retried seal's answer
        return done

    def carry(self, epoch: int) -> None:
        """Hand on the stream through SEAL(``epoch``) as it comes, each whole frame at
        once (at most CARRY_SILENCE s without a byte from the server)."""
        while True:
            done = self._through_seal(epoch)
            if done is not None:
                self._hand_on(done)
                self.carried = epoch
                return
            if self._frames:
                done, self._frames = self._frames, []
                self._hand_on(done)
            frames = self._recv(CARRY_SILENCE, f"before SEAL({epoch})")
            if frames is None:
                raise DeviceError(f"{self.name}: the stream stopped before SEAL({epoch}): "
                                  f"nothing for {CARRY_SILENCE:g} s")
            self._frames += frames

    def _through_seal(self, epoch: int) -> list[Frame] | None:
        """The frames up to and including SEAL(epoch), taken off ``_frames`` once it is
        there, else None."""
        for i, f in enumerate(self._frames):
            if f.kind == SEAL and f.epoch == epoch:
                done = self._frames[:i + 1]
                del self._frames[:i + 1]
                return done
        return None

    def commit(self, epoch: int) -> None:
        self._send(self._need(self._sock), ack_frame(epoch), f"ACK of epoch {epoch}")

    def release(self) -> None:
        self.disconnect()

    def disconnect_control(self) -> None:
        """Close the control connection: seals go in the stream from now on."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def disconnect(self) -> None:
        self.disconnect_control()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # the reader's recv returns
            if self._inflow is not None:
                self._inflow.stop()
                self._inflow = None
            self._sock.close()
            self._sock = None


class _NoControl(Exception):
    """The server closed the control connection without ever answering on it."""


def _now(send: Callable[[], None]) -> None:
    send()
