"""The QMP client: the protocol core fed by hand, then the client against a fake
qemu-xen over a Unix socket (tests/fakes.py FakeQmpServer)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeQmpServer
from xen_remus.xen.qmp import (
    Event,
    Greeting,
    QmpClient,
    QmpCommandError,
    QmpError,
    QmpProtocol,
    Reply,
)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": "Debian"}, "capabilities": ["oob"]}}\r\n')


def ready() -> QmpProtocol:
    p = QmpProtocol()
    assert p.feed(GREETING) == [Greeting("7.2.0", ("oob",))]
    assert p.negotiate() == b'{"execute":"qmp_capabilities","id":1}\r\n'
    assert p.feed(b'{"return": {}, "id": 1}\r\n') == []
    assert p.state == "ready"
    return p


def test_messages_split_anywhere_come_out_whole() -> None:
    p = ready()
    cid, data = p.command("xen-save-devices-state", {"filename": "/dev/fdset/0", "live": False})
    assert cid == 2 and data.endswith(b"\r\n")
    assert b'"arguments":{"filename":"/dev/fdset/0","live":false}' in data
    wire = (b'{"timestamp": {"seconds": 1}, "event": "STOP", "data": {}}\r\n'
            b'{"return": {}, "id": 2}\r\n')
    for cut in range(1, len(wire)):
        q = ready()
        q.command("stop")
        got = q.feed(wire[:cut]) + q.feed(wire[cut:])
        assert got == [Event("STOP"), Reply(2, {})], cut


def test_error_reply_carries_class_and_desc() -> None:
    p = ready()
    p.command("cont")
    [r] = p.feed(b'{"id": 2, "error": {"class": "GenericError", "desc": "no way"}}\r\n')
    assert r == Reply(2, None, ("GenericError", "no way"))


@pytest.mark.parametrize("wire, why", [
    (b'{"return": {}}\r\n', "expected the QMP greeting"),
    (b"not json\r\n", "not JSON"),
    (b"[1, 2]\r\n", "not a JSON object"),
])
def test_protocol_errors_leave_it_failed(wire: bytes, why: str) -> None:
    p = QmpProtocol()
    with pytest.raises(QmpError, match=why):
        p.feed(wire)
    assert p.state == "error"
    with pytest.raises(QmpError, match="already failed"):
        p.feed(GREETING)


def test_refused_capabilities_and_early_commands() -> None:
    p = QmpProtocol()
    with pytest.raises(QmpError, match="not ready"):
        p.command("stop")
    p.feed(GREETING)
    p.negotiate()
    with pytest.raises(QmpError, match="qmp_capabilities refused: GenericError"):
        p.feed(b'{"id": 1, "error": {"class": "GenericError", "desc": "x"}}\r\n')


def test_a_message_over_the_limit_is_refused() -> None:
    p = QmpProtocol(limit=100)
    with pytest.raises(QmpError, match="longer than 100 bytes"):
        p.feed(b"{" + b" " * 200)


def test_a_reply_neither_return_nor_error() -> None:
    p = ready()
    with pytest.raises(QmpError, match="neither a reply nor an event"):
        p.feed(b'{"id": 2, "what": 1}\r\n')


# -- the client over a socket --------------------------------------------------------------

@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmp-") as d:
        yield Path(d)


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_client_runs_commands_and_passes_an_fd(sockdir: Path, chunk: int) -> None:
    srv = FakeQmpServer(str(sockdir / "qmp"), state=b"QEVM-saved", chunk=chunk)
    try:
        with QmpClient.connect(str(sockdir / "qmp"), timeout=5) as c:
            assert c.version == "7.2.0"
            assert c.execute("stop") == {}
            fd = os.open(sockdir / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                added = c.execute("add-fd", fd=fd)
            finally:
                os.close(fd)
            c.execute("xen-save-devices-state",
                      {"filename": f"/dev/fdset/{added['fdset-id']}", "live": False})
            c.execute("remove-fd", {"fdset-id": added["fdset-id"]})
            c.execute("cont")
            assert [e.name for e in c.events] == ["STOP", "RESUME"]
        assert (sockdir / "state").read_bytes() == b"QEVM-saved"
        assert [n for n, _ in srv.commands] == [
            "qmp_capabilities", "stop", "add-fd", "xen-save-devices-state", "remove-fd",
            "cont"]
        assert srv.running and not srv.fdsets
    finally:
        srv.close()


def test_command_error_names_command_class_and_socket(sockdir: Path) -> None:
    path = str(sockdir / "qmp")
    srv = FakeQmpServer(path)
    srv.fail["xen-save-devices-state"] = ("GenericError", "An IO error has occurred")
    try:
        with QmpClient.connect(path, timeout=5) as c:
            with pytest.raises(QmpCommandError) as exc:
                c.execute("xen-save-devices-state", {"filename": "/x"})
            assert exc.value.error_class == "GenericError"
            assert str(exc.value) == ("QMP command xen-save-devices-state failed: "
                                      f"GenericError: An IO error has occurred ({path})")
            with pytest.raises(QmpCommandError, match="CommandNotFound"):
                c.execute("no-such-command")
            assert c.execute("cont") == {}  # the connection is still good
    finally:
        srv.close()


def test_no_socket_is_a_clear_error(sockdir: Path) -> None:
    with pytest.raises(QmpError, match=r"cannot connect to the QMP socket .*/qmp-libxl-9: "
                       r".*device model running"):
        QmpClient.connect(str(sockdir / "qmp-libxl-9"), timeout=1)


def silent_server(path: str, greet: bytes, stop: threading.Event,
                  read_first: bool = False) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        conn.sendall(greet)
        if read_first:
            conn.recv(4096)
        stop.wait(5)
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_silence_and_eof_are_bounded_and_named(sockdir: Path) -> None:
    stop = threading.Event()
    t = silent_server(str(sockdir / "a"), GREETING, stop)
    with pytest.raises(QmpError, match=r"the reply to qmp_capabilities did not come from "
                       r".*/a within 0.3 s"):
        QmpClient.connect(str(sockdir / "a"), timeout=0.3)
    stop.set()
    t.join()
    stop = threading.Event()
    stop.set()  # greets, reads qmp_capabilities, then closes
    t = silent_server(str(sockdir / "b"), GREETING, stop, read_first=True)
    with pytest.raises(QmpError, match="closed the connection while we waited"):
        QmpClient.connect(str(sockdir / "b"), timeout=2)
    t.join()
