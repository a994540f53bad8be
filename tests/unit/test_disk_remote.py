"""SocketControl (disk/remote.py) against a disk server that fails: one that closes its
replication socket, or goes silent, during the initial synchronisation or before a seal.
The working server is tests/unit/test_disk_protect.py's."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xen_remus.devices.base import DeviceError
from xen_remus.disk import remote
from xen_remus.disk.remote import SocketControl
from xen_remus.disk.replica import START, frame_bytes, seal_frame


class Server:
    """Accepts one connection, reads ``expect`` bytes of it, then closes it (``close``)
    or keeps it open until the test ends."""

    def __init__(self, path: Path, expect: int, close: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.expect, self.close = expect, close
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        got = 0
        while got < self.expect:
            data = conn.recv(4096)
            if not data:
                break
            got += len(data)
        if not self.close:
            self.done.wait(10)
        conn.close()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.sock.close()


Start = Callable[[int, bool], SocketControl]  # (expect, close) -> connected control
START_LEN = len(frame_bytes(START, 0, 0))
SEAL_LEN = len(seal_frame(0))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Start]:
    servers: list[Server] = []

    def start(expect: int, close: bool) -> SocketControl:
        path = tmp_path / "replication.sock"
        servers.append(Server(path, expect, close))
        ctl = SocketControl("xvda", str(path), lambda *_: None)
        ctl.connect()
        return ctl

    yield start
    for s in servers:
        s.stop()


def test_a_server_that_closes_during_the_synchronisation(serve: Start) -> None:
    ctl = serve(START_LEN, True)
    with pytest.raises(DeviceError, match="closed the replication socket during the "
                       "initial synchronisation"):
        ctl.sync(lambda: [], lambda: None)


def test_a_silent_server_fails_the_synchronisation(serve: Start,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "SYNC_SILENCE", 0.2)
    ctl = serve(START_LEN, False)
    with pytest.raises(DeviceError, match="no synchronisation frame from the server for "
                       "0.2 s"):
        ctl.sync(lambda: [], lambda: None)


def test_a_server_that_closes_before_the_seal(serve: Start) -> None:
    ctl = serve(START_LEN + SEAL_LEN, True)
    with pytest.raises(DeviceError, match="closed the replication socket before sealing "
                       "epoch 0"):
        ctl.seal(0)
    assert ctl.sealed == -1


def test_a_server_that_does_not_seal_in_time(serve: Start,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "FIRST_SEAL_TIMEOUT", 0.2)
    ctl = serve(START_LEN + SEAL_LEN, False)
    with pytest.raises(DeviceError, match="did not seal epoch 0 within 0.2 s"):
        ctl.seal(0)
