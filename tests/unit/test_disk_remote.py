"""SocketControl (disk/remote.py) against the test playing the disk server on both of its
connections (the stream and the seals): the seal waits for the server's answer only, the
stream through SEAL(N) is carried when ``defer`` says, idle() hands on what came between
checkpoints, at most QUEUE_MAX is read ahead; and a server that closes a connection, goes
silent or answers wrongly. The working server is tests/unit/test_disk_protect.py's."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xen_remus.devices.base import DeviceError
from xen_remus.disk import remote
from xen_remus.disk.remote import SocketControl
from xen_remus.disk.replica import CONTROL, START, frame_bytes, seal_frame, write_frame


class Peer:
    """The server's end of a SocketControl's two connections, driven by the test:
    ``conn`` the stream, ``seals`` the control connection."""

    def __init__(self, path: Path, deferred: bool = False) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(2)
        self.got: list[bytes] = []  # what on_frames was handed, call by call
        self.carries: list[Callable[[], None]] = []  # deferred: for the test to call
        self.ctl = SocketControl("xvda", str(path), lambda _v, b, _e: self.got.append(b),
                                 defer=self.carries.append if deferred else None)
        self.ctl.connect()
        self.conn, _ = self.listener.accept()
        self.seals, _ = self.listener.accept()
        for s in (self.conn, self.seals):
            s.settimeout(5)
        assert self.conn.recv(64) == frame_bytes(START, 0, 0)
        assert self.seals.recv(64) == frame_bytes(CONTROL, 0, 0)

    def sealed(self, *epochs: int) -> None:
        """Answer the seals of ``epochs`` on the control connection."""
        self.seals.sendall(b"".join(seal_frame(e) for e in epochs))

    def close(self) -> None:
        self.ctl.disconnect()
        self.conn.close()
        self.seals.close()
        self.listener.close()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(tmp_path / "replication.sock")
    yield p
    p.close()


def w(epoch: int, offset: int, n: int) -> bytes:
    return b"".join(write_frame(epoch, offset, bytes([offset % 251 + 1]) * n))


# -- the seal and its carry ---------------------------------------------------------------------
def test_the_seal_is_asked_and_answered_on_the_control_connection(peer: Peer) -> None:
    peer.conn.sendall(w(0, 0, 512) + seal_frame(0) + w(1, 4096, 512))
    peer.sealed(0)
    peer.ctl.seal(0)  # by default carried at once: through SEAL(0), not past it
    assert peer.got == [w(0, 0, 512) + seal_frame(0)]
    assert peer.seals.recv(64) == seal_frame(0)
    assert (peer.ctl.sealed, peer.ctl.carried) == (0, 0)


def test_the_pause_waits_for_the_answer_not_for_the_stream(tmp_path: Path) -> None:
    """Deferred (protect): the seal returns at the server's answer though the stream's
    SEAL(0) still waits behind writes; the carry, called later, hands on the stream
    through it as it comes; idle() leaves the stream to it until then."""
    peer = Peer(tmp_path / "replication.sock", deferred=True)
    try:
        first, backlog = w(0, 0, 4096), w(0, 8192, 65536)
        peer.conn.sendall(first)
        peer.sealed(0)
        t0 = time.monotonic()
        peer.ctl.seal(0)
        assert time.monotonic() - t0 < 1 and peer.got == [] and len(peer.carries) == 1
        time.sleep(0.05)
        peer.ctl.idle()  # the carry of epoch 0 is due first
        assert peer.got == []
        peer.conn.sendall(backlog[:1000])
        carry = peer.carries.pop()
        late = w(1, 0, 512)

        def rest() -> None:
            time.sleep(0.2)
            peer.conn.sendall(backlog[1000:] + seal_frame(0) + late)

        th = threading.Thread(target=rest)
        th.start()
        carry()
        th.join()
        assert b"".join(peer.got) == first + backlog + seal_frame(0)
        assert len(peer.got) >= 2, "the frames before the seal went on as they came"
        assert peer.ctl.carried == 0
        time.sleep(0.05)
        peer.ctl.idle()
        assert peer.got[-1] == late
    finally:
        peer.close()


def test_a_carry_whose_stream_stops_before_the_seal(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "CARRY_SILENCE", 0.2)
    peer = Peer(tmp_path / "replication.sock", deferred=True)
    try:
        peer.conn.sendall(w(0, 0, 512))
        peer.sealed(0)
        peer.ctl.seal(0)
        with pytest.raises(DeviceError, match=r"the stream stopped before SEAL\(0\): "
                           "nothing for 0.2 s"):
            peer.carries.pop()()
        assert peer.got == [w(0, 0, 512)]
    finally:
        peer.close()


def test_an_older_server_without_control_gets_the_seal_in_the_stream(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server started by an older xen-remus closes the control connection at once: the
    seal is then asked in the stream and carried there and then, in the pause."""
    peer = Peer(tmp_path / "replication.sock", deferred=True)
    try:
        peer.seals.close()
        peer.conn.sendall(w(0, 0, 512) + seal_frame(0))
        with caplog.at_level(logging.WARNING, logger="xen_remus.disk.remote"):
            peer.ctl.seal(0)
        assert "takes no control connection" in caplog.text
        assert peer.got == [w(0, 0, 512) + seal_frame(0)] and peer.carries == []
        assert peer.conn.recv(64) == seal_frame(0)  # the ask, in the stream
        assert (peer.ctl.sealed, peer.ctl.carried) == (0, 0)
    finally:
        peer.close()


def test_a_server_that_closes_the_control_connection_once_it_answered(peer: Peer) -> None:
    peer.conn.sendall(seal_frame(0))
    peer.sealed(0)
    peer.ctl.seal(0)

    def close_at_the_ask() -> None:
        asks = b""
        while len(asks) < 2 * len(seal_frame(0)):
            asks += peer.seals.recv(64)
        peer.seals.close()
        assert asks == seal_frame(0) + seal_frame(1)

    th = threading.Thread(target=close_at_the_ask)
    th.start()
    with pytest.raises(DeviceError, match="closed its control connection before sealing "
                       "epoch 1"):
        peer.ctl.seal(1)
    th.join()
    assert peer.ctl.sealed == 0


def test_a_server_that_does_not_seal_in_time(peer: Peer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "FIRST_SEAL_TIMEOUT", 0.2)
    with pytest.raises(DeviceError, match="did not seal epoch 0 within 0.2 s"):
        peer.ctl.seal(0)
    peer.sealed(0)
    peer.conn.sendall(seal_frame(0))
    monkeypatch.setattr(remote, "SEAL_TIMEOUT", 0.2)
    peer.ctl.seal(0)  # asked again: answered (the late answer of the first ask too)
    with pytest.raises(DeviceError, match="did not seal epoch 1 within 0.2 s"):
        peer.ctl.seal(1)


def test_an_answer_for_a_later_epoch_is_refused(peer: Peer) -> None:
    peer.sealed(3)
    with pytest.raises(DeviceError, match=r"SEAL\(3\) on its control connection while "
                       "the seal of epoch 0 is awaited"):
        peer.ctl.seal(0)


# -- the initial synchronisation ----------------------------------------------------------------
def test_a_server_that_closes_during_the_synchronisation(peer: Peer) -> None:
    peer.conn.close()
    with pytest.raises(DeviceError, match="closed the replication socket during the "
                       "initial synchronisation"):
        peer.ctl.sync(lambda: [], lambda: None)


def test_a_silent_server_fails_the_synchronisation(peer: Peer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "SYNC_SILENCE", 0.2)
    with pytest.raises(DeviceError, match="no synchronisation frame from the server for "
                       "0.2 s"):
        peer.ctl.sync(lambda: [], lambda: None)


# -- between checkpoints: idle() --------------------------------------------------------------
def test_idle_hands_on_the_whole_frames_there_and_the_carry_the_rest(peer: Peer) -> None:
    peer.conn.sendall(w(0, 0, 512) + seal_frame(0))
    peer.sealed(0)
    peer.ctl.seal(0)
    assert peer.got == [w(0, 0, 512) + seal_frame(0)]
    one, two, three = w(1, 4096, 4096), w(1, 0, 100), w(1, 8192, 65536)
    peer.conn.sendall(one + two + three[:1000])
    time.sleep(0.05)  # all of it read
    peer.ctl.idle()
    assert peer.got[1:] == [one + two], "the whole frames, and only those"
    t0 = time.monotonic()
    peer.ctl.idle()  # nothing new: no wait, nothing handed on
    assert time.monotonic() - t0 < 0.5 and len(peer.got) == 2
    peer.conn.sendall(three[1000:] + seal_frame(1))
    peer.sealed(1)
    peer.ctl.seal(1)  # the rest of the frame begun, then the seal
    assert b"".join(peer.got[2:]) == three + seal_frame(1) and peer.ctl.carried == 1
    assert peer.seals.recv(4096) == seal_frame(0) + seal_frame(1)  # the two asks


def test_idle_before_the_first_seal_leaves_the_stream_to_the_synchronisation(
        peer: Peer) -> None:
    peer.conn.sendall(w(0, 0, 512))
    time.sleep(0.05)
    peer.ctl.idle()
    assert peer.got == [] and peer.ctl.received == 0


def test_the_server_is_read_while_the_loop_is_busy_elsewhere(peer: Peer) -> None:
    """The server's writes do not wait for the loop's next idle(): a thread reads them
    (the socket's own buffer holds far less than this)."""
    peer.conn.sendall(seal_frame(0))
    peer.sealed(0)
    peer.ctl.seal(0)
    frames = b"".join(w(1, i * 65536, 65536) for i in range(64))  # 4 MiB
    peer.conn.settimeout(2)
    peer.conn.sendall(frames)  # no idle() meanwhile: it would time out, unread
    deadline = time.monotonic() + 5
    while b"".join(peer.got[1:]) != frames:  # the last bytes sent may still be in flight
        assert time.monotonic() < deadline, f"{sum(map(len, peer.got[1:]))} bytes only"
        time.sleep(0.01)
        peer.ctl.idle()


def test_at_most_queue_max_is_read_ahead_of_the_loop(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """Past QUEUE_MAX the reader waits for the loop: the rest stays with the server
    (whose cap then holds the guest's I/O); nothing is lost."""
    frame = w(1, 0, 4096)
    monkeypatch.setattr(remote, "QUEUE_MAX", 2 * len(frame))
    monkeypatch.setattr(remote, "READ_CHUNK", len(frame))
    peer = Peer(tmp_path / "replication.sock")
    try:
        peer.conn.sendall(seal_frame(0) + frame * 5)
        peer.sealed(0)
        peer.ctl.seal(0)
        assert peer.got == [seal_frame(0)]
        for _ in range(4):
            time.sleep(0.2)  # time enough to read everything, were there no limit
            peer.ctl.idle()
        assert b"".join(peer.got[1:]) == frame * 5
        # Each idle() found at most what the seal left and QUEUE_MAX more.
        assert max(len(g) for g in peer.got[1:]) <= 3 * len(frame), peer.got
    finally:
        peer.close()


def test_a_server_that_closes_between_checkpoints(peer: Peer) -> None:
    peer.conn.sendall(seal_frame(0))
    peer.sealed(0)
    peer.ctl.seal(0)
    peer.conn.close()
    time.sleep(0.05)
    with pytest.raises(DeviceError, match="closed the replication socket between "
                       "checkpoints"):
        peer.ctl.idle()
