"""The direct transport (xen_remus/direct): the mutual PSK handshake sans-IO, then a real
Listener and connect() over localhost TCP: with the right key the Remus loop streams over
the connection with its control frames under the handshake's session key; a wrong key on
either side, a silent peer, a replayed handshake are refused before any stream byte."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeDomain
from tests.unit.test_protect_loop import PAGES, Devices, Sink, primary, start_backup
from xen_remus.channel.ends import Config
from xen_remus.channel.mac import MacError
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.direct import handshake as H
from xen_remus.direct.conn import ConnectFailed, Connection, Listener, connect, listen_address
from xen_remus.direct.handshake import HandshakeRefused
from xen_remus.errors import UsageError
from xen_remus.restore_continuous import Outcome
from xen_remus.save_continuous import RemusLoop

KEY = b"k" * 32
OTHER = b"o" * 32


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path))
    return tmp_path


def shake(pkey: bytes, bkey: bytes) -> tuple[H.Primary, H.Backup, list[bytes],
                                            HandshakeRefused | None]:
    """Run both sides in memory; (primary, backup, the messages, the first refusal)."""
    p, b = H.Primary(pkey), H.Backup(bkey)
    msgs = [p.hello()]
    msgs.append(b.hello(msgs[0]))
    fin, err = p.finish(msgs[1])
    msgs.append(fin)
    verdict, berr = b.verdict(fin)
    msgs.append(verdict)
    if err is None and berr is None:
        p.verdict(verdict)
    return p, b, msgs, err or berr


def test_same_key_both_ends_hold_one_fresh_session_key() -> None:
    p, b, msgs, err = shake(KEY, KEY)
    assert err is None and p.session_key is not None and p.session_key == b.session_key
    assert [len(m) for m in msgs] == [H.PRIMARY_HELLO_SIZE, H.BACKUP_HELLO_SIZE,
                                      H.FINISH_SIZE, H.VERDICT_SIZE]
    assert KEY not in b"".join(msgs)
    p2, _, _, _ = shake(KEY, KEY)
    assert p2.session_key != p.session_key  # fresh nonces, a new key per connection


def test_wrong_key_is_caught_by_the_primary_and_told_to_the_backup() -> None:
    p, b, msgs, err = shake(OTHER, KEY)
    assert isinstance(err, HandshakeRefused)
    assert "backup's proof does not verify under our key" in str(err)
    assert msgs[2] == bytes(H.FINISH_SIZE) and msgs[3] == b"\0"  # said so, no proof sent
    assert p.session_key is None and b.session_key is None
    # and the backup's view of it, when the primary's FINISH says "refused":
    b2 = H.Backup(KEY)
    b2.hello(H.Primary(OTHER).hello())
    verdict, berr = b2.verdict(bytes(H.FINISH_SIZE))
    assert verdict == b"\0" and berr is not None and "refused our proof" in str(berr)


def test_forged_primary_proof_is_refused_by_the_backup() -> None:
    b = H.Backup(KEY)
    b.hello(H.Primary(OTHER).hello())
    verdict, err = b.verdict(b"\1" + bytes(H.PROOF_SIZE))
    assert verdict == b"\0" and err is not None and "does not verify" in str(err)
    assert b.session_key is None
    p = H.Primary(KEY)
    p.finish(H.Backup(KEY).hello(p.hello()))
    with pytest.raises(HandshakeRefused, match="the backup refused our proof"):
        p.verdict(b"\0")


def test_replayed_messages_do_not_verify_at_either_end() -> None:
    _, _, msgs, err = shake(KEY, KEY)
    assert err is None
    b = H.Backup(KEY)  # the primary's recorded hello and finish, to a fresh backup
    b.hello(msgs[0])
    verdict, err = b.verdict(msgs[2])
    assert verdict == b"\0" and err is not None and "replayed" in str(err)
    p = H.Primary(KEY)  # the backup's recorded hello, to a fresh primary
    fin, err = p.finish(msgs[1])
    assert err is not None and fin == bytes(H.FINISH_SIZE)


def test_reflection_magic_and_version_are_refused() -> None:
    b = H.Backup(KEY)
    with pytest.raises(HandshakeRefused, match="our own nonce"):
        b.hello(H.Primary(KEY, nonce=b.nonce).hello())
    p = H.Primary(KEY)
    reflected = p.hello() + bytes(H.PROOF_SIZE)  # our own nonce, as the backup's
    assert "reflection" in str(p.finish(reflected)[1])
    with pytest.raises(HandshakeRefused, match=r"magic b'GET / HT' at offset 0"):
        H.Backup(KEY).hello(b"GET / HTTP/1.1\r\n" + bytes(H.PRIMARY_HELLO_SIZE - 16))
    v2 = bytearray(H.Primary(KEY).hello())
    v2[9] = 2
    with pytest.raises(HandshakeRefused, match="speaks version 2 of the direct transport, "
                       "this end 1"):
        H.Backup(KEY).hello(bytes(v2))


def test_listen_address() -> None:
    assert listen_address("7400") == ("", 7400)
    assert listen_address(":7400") == ("", 7400)
    assert listen_address("10.0.0.2:7400") == ("10.0.0.2", 7400)
    assert listen_address("[::1]:7400") == ("::1", 7400)
    assert listen_address("[::]:0") == ("::", 0)
    for bad in ("unix:/x", "host:", "host:99999", "x", "::1:7400"):
        with pytest.raises(UsageError, match="--listen"):
            listen_address(bad)


# Over localhost TCP.

@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener("127.0.0.1", 0, KEY, timeout=0.5) as lis:
        yield lis


class Served:
    """The listener in a thread: each authenticated connection goes to ``serve``."""

    def __init__(self, lis: Listener, serve: Callable[[Connection], None],
                 exit_on_refusal: bool = False) -> None:
        self.conns: list[Connection] = []
        self.error: BaseException | None = None

        def run() -> None:
            try:
                conn = lis.accept(exit_on_refusal)
                self.conns.append(conn)
                serve(conn)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive()


def test_right_key_the_remus_stream_flows_under_the_session_key(listener: Listener) -> None:
    sink, result = Sink(), list[Outcome]()
    backup_chan: list[ReceiverChannel] = []

    def serve(conn: Connection) -> None:
        chan = ReceiverChannel(Config(key=conn.session_key, mac=True), time.monotonic())
        backup_chan.append(chan)
        start_backup(conn.sock, sink, chan, result).join(20)

    served = Served(listener, serve)
    conn = connect("127.0.0.1", listener.port, KEY, connect_timeout=5)
    dom = FakeDomain(PAGES)
    engine, out, link = primary(conn.sock, dom, Config(key=conn.session_key, mac=True), 5.0)
    devs = Devices(dom, sink)

    def on_epoch(st: object) -> None:
        if loop.epoch == 4:
            loop.stop()
        dom.mem[8:16] = loop.epoch.to_bytes(8, "little")
        dom.dirty.add(0)

    loop = RemusLoop(engine, out, link, devs, 0.005, on_epoch=on_epoch)
    loop.run()
    agreed = link.chan.agreed
    assert agreed is not None and agreed.mac is not None and agreed.psk  # key never sent
    conn.close()
    served.join()
    assert served.error is None, served.error
    assert result and result[0].kind == "failover" and result[0].epoch == 4
    assert sink.committed_epochs == [0, 1, 2, 3, 4]
    assert [c for c in devs.calls if c[0] == "commit"] == [("commit", e) for e in range(5)]
    assert listener.refused == 0


def test_control_frames_under_another_key_than_the_sessions_are_refused(
        listener: Listener) -> None:
    """The control frames' key is the connection's session key: a primary that used
    the pre-shared key itself instead has the backup's first ACK refused, by name."""
    sink, result = Sink(), list[Outcome]()
    served = Served(listener, lambda conn: start_backup(conn.sock, sink, ReceiverChannel(
        Config(key=conn.session_key, mac=True), time.monotonic()), result).join(20))
    conn = connect("127.0.0.1", listener.port, KEY, connect_timeout=5)
    dom = FakeDomain(PAGES)
    engine, out, link = primary(conn.sock, dom, Config(key=KEY, mac=True), 5.0)
    devs = Devices(dom, sink)
    loop = RemusLoop(engine, out, link, devs, 0.005)
    try:
        with pytest.raises(MacError, match="bad MAC"):
            loop.run()
    finally:
        conn.close()
    served.join()
    assert not [c for c in devs.calls if c[0] == "commit"]  # no output was released


def _stream_never_started(sink_bytes: int, served: Served) -> None:
    assert sink_bytes == 0 and not served.conns


@pytest.mark.parametrize("primary_key,listener_key", [(OTHER, KEY), (KEY, OTHER)])
def test_wrong_key_either_side_refused_before_any_stream_byte(
        primary_key: bytes, listener_key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    with Listener("127.0.0.1", 0, listener_key, timeout=2) as lis:
        served = Served(lis, lambda conn: start_backup(conn.sock, sink, None, []).join(20),
                        exit_on_refusal=True)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, "xen_remus.direct"), \
                pytest.raises(HandshakeRefused, match=rf"direct transport to 127.0.0.1:"
                              rf"{lis.port}: the backup's proof does not verify under our "
                              "key: the two hosts have different --key-file keys"):
            connect("127.0.0.1", lis.port, primary_key, connect_timeout=5)
        served.join()
    assert time.monotonic() - t0 < 2
    assert isinstance(served.error, HandshakeRefused)
    assert "the peer refused our proof: it has a different key" in str(served.error)
    assert any(r.getMessage().startswith("refused 127.0.0.1:") for r in caplog.records)
    _stream_never_started(len(sink.data), served)


def test_forged_proof_refused_and_the_listener_keeps_listening(
        listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    """A peer without the key that claims a proof: logged by address and dropped; the
    right primary is served next."""
    served = Served(listener, lambda conn: None)
    raw = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    with caplog.at_level(logging.WARNING, "xen_remus.direct"):
        raw.sendall(H.Primary(OTHER).hello())
        hello = b""
        while len(hello) < H.BACKUP_HELLO_SIZE:
            hello += raw.recv(H.BACKUP_HELLO_SIZE - len(hello))
        raw.sendall(b"\1" + bytes(H.PROOF_SIZE))
        assert raw.recv(16) == b"\0"
        assert raw.recv(16) == b""  # dropped
        conn = connect("127.0.0.1", listener.port, KEY, connect_timeout=5)
    served.join()
    assert served.error is None and len(served.conns) == 1
    assert served.conns[0].session_key == conn.session_key
    raw_port = raw.getsockname()[1]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"refused 127.0.0.1:{raw_port}: the peer's proof does not "
                            "verify") for m in msgs), msgs
    assert listener.refused == 1
    raw.close()
    conn.close()


def test_silent_peer_times_out_and_the_next_is_served(listener: Listener,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    served = Served(listener, lambda conn: None)
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    silent.sendall(H.Primary(KEY).hello()[:5])  # a peer that stalls mid-hello
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "xen_remus.direct"):
        conn = connect("127.0.0.1", listener.port, KEY, connect_timeout=5)
    waited = time.monotonic() - t0
    served.join()
    assert 0.4 < waited < 3  # the silent one was dropped after the listener's 0.5 s
    assert any("no peer's hello within 0.5 s (got 5 of 42 bytes): handshake timeout"
               in r.getMessage() for r in caplog.records)
    assert len(served.conns) == 1 and served.conns[0].session_key == conn.session_key
    assert silent.recv(16) == b""
    silent.close()
    conn.close()


def test_silent_listener_times_out_at_the_primary() -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts, never answers
        t0 = time.monotonic()
        with pytest.raises(HandshakeRefused, match=r"no hello of the backup within 0.3 s "
                           r"\(got 0 of 74 bytes\): handshake timeout"):
            connect("127.0.0.1", mute.getsockname()[1], KEY, 5, timeout=0.3)
        assert time.monotonic() - t0 < 2


def test_replayed_handshake_over_tcp_is_refused(listener: Listener) -> None:
    """A recorded primary's bytes (a genuine hello and finish) sent again on a new
    connection: the backup's nonce is new, so the finish does not verify."""
    served = Served(listener, lambda conn: None, exit_on_refusal=True)
    recorded: list[bytes] = []
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
        p = H.Primary(KEY)
        recorded.append(p.hello())
        s.sendall(recorded[0])
        hello = b""
        while len(hello) < H.BACKUP_HELLO_SIZE:
            hello += s.recv(H.BACKUP_HELLO_SIZE - len(hello))
        fin, err = p.finish(hello)
        assert err is None
        recorded.append(fin)
        s.sendall(fin)
        assert s.recv(1) == b"\1"
    served.join()
    assert len(served.conns) == 1
    served = Served(listener, lambda conn: None, exit_on_refusal=True)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
        s.sendall(b"".join(recorded))
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    served.join()
    assert got[-1:] == b"\0" and len(got) == H.BACKUP_HELLO_SIZE + 1
    assert not served.conns and isinstance(served.error, HandshakeRefused)
    assert "a replayed handshake" in str(served.error)


def test_unreachable_listener_is_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed, match=rf"direct transport to 127.0.0.1:{port}: "
                       "cannot connect: Connection refused"):
        connect("127.0.0.1", port, KEY, 5)


def test_keepalive_and_nodelay_on_both_ends(listener: Listener) -> None:
    served = Served(listener, lambda conn: None)
    conn = connect("127.0.0.1", listener.port, KEY, 5)
    served.join()
    for s in (conn.sock, served.conns[0].sock):
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert s.gettimeout() is None  # blocking: the fd goes to the stream's code
    conn.close()
