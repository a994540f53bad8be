"""The direct transport from the command line: `migrate-receive --listen` as a process
(a fake `xl` as its sink, as in test_cli_receive) refuses a peer with the wrong key before
it starts xl, then serves the right one, alone; `migrate` runs over --tcp to it; protect
--tcp with the wrong key stops before it touches the guest; the options' rules."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cli_receive import FAKE_XL, ROOT, ends_of, make_stream
from tests.unit.test_save_migrate import FakeSaver
from xen_remus import xlproto as X
from xen_remus.channel.ends import Config
from xen_remus.channel.link import SenderLink
from xen_remus.channel.mac import MacError
from xen_remus.channel.sender import SenderChannel
from xen_remus.cli import protect_run
from xen_remus.cli.protect import check_args
from xen_remus.cli.save import migrate
from xen_remus.direct.conn import Connection, Listener, connect
from xen_remus.direct.handshake import HandshakeRefused
from xen_remus.errors import UsageError
from xen_remus.migrate_hook import build_parser, main
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.transport import DirectReceiver
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import DomainHeader, EpochEnd

KEY = b"the pre-shared key of both hosts"
OTHER = b"another key, on the wrong host.."


def key_file(tmp: Path, key: bytes, name: str = "key") -> Path:
    path = tmp / name
    path.write_bytes(key + b"\n")
    path.chmod(0o600)
    return path


class ListenerProc:
    """`xen-remus migrate-receive --listen 127.0.0.1:0 ...` with the fake xl."""

    def __init__(self, tmp: Path, *args: str) -> None:
        fake = tmp / "xl"
        fake.write_text(f"#!{sys.executable}\n" + FAKE_XL)
        fake.chmod(0o755)
        self.tmp = tmp
        env = dict(os.environ, FAKE_XL_DIR=str(tmp), PYTHONPATH=str(ROOT))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "xen_remus", "migrate-receive", "--xl", str(fake),
             "--listen", "127.0.0.1:0", "--key-file", str(key_file(tmp, KEY)), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env)
        assert self.p.stderr is not None
        self.err = b""
        self.port = int(self.wait_for(rb"listening on 127\.0\.0\.1:(\d+)").group(1))

    def wait_for(self, pattern: bytes, timeout: float = 30) -> re.Match[bytes]:
        assert self.p.stderr is not None
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.err)):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.err!r}"
            chunk = os.read(self.p.stderr.fileno(), 4096)
            assert chunk, f"listener ended: {self.err.decode()}"
            self.err += chunk
        return m

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        _, rest = self.p.communicate(timeout=timeout)
        return self.p.returncode, (self.err + rest).decode()

    @property
    def xl_started(self) -> bool:
        return (self.tmp / "pid").exists()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Any]:
    procs: list[ListenerProc] = []

    def start(*args: str) -> ListenerProc:
        procs.append(ListenerProc(tmp_path, *args))
        return procs[-1]

    yield start
    for lp in procs:
        if lp.p.poll() is None:
            lp.p.kill()
            lp.p.wait()


def test_wrong_key_refused_then_the_right_primary_fails_over(listener: Any) -> None:
    lp = listener("-r", "-e")
    t0 = time.monotonic()
    with pytest.raises(HandshakeRefused, match="different --key-file keys"):
        connect("127.0.0.1", lp.port, OTHER, 5)
    lp.wait_for(rb"refused 127\.0\.0\.1:\d+: the peer refused our proof")
    assert time.monotonic() - t0 < 5
    assert not lp.xl_started  # nothing of the receive began: no xl, no byte to it
    data = make_stream(5, end=False)
    ends = ends_of(data)
    conn = connect("127.0.0.1", lp.port, KEY, 5)
    lp.wait_for(rb"127\.0\.0\.1:\d+ authenticated; receiving")
    got = b""
    while len(got) < len(X.BANNER):
        got += conn.sock.recv(len(X.BANNER) - len(got))
    assert got == X.BANNER  # the stream starts as over ssh: the xl banner
    with pytest.raises(ConnectionRefusedError):  # one connection at a time
        socket.create_connection(("127.0.0.1", lp.port), timeout=5)
    conn.sock.sendall(data[:ends[2] + 100])  # a stock-like sender: no accept, cut in epoch 3
    conn.close()
    rc, err = lp.finish()
    assert rc == 0, err
    assert "resuming from epoch 2" in err and "Traceback" not in err
    assert (lp.tmp / "received").read_bytes() == data[:ends[2]]


def send_checkpoints(conn: Connection, cfg: Config, epochs: int) -> list[int]:
    """Our sender's channel over ``conn``: a synthetic checkpointed stream, each epoch
    sent and its ACK awaited; the epochs acknowledged."""
    fd = conn.sock.fileno()
    got = b""
    while len(got) < len(X.BANNER):
        got += os.read(fd, len(X.BANNER) - len(got))
    assert got == X.BANNER
    link = SenderLink(SenderChannel(cfg, time.monotonic()), fd, fd)
    acked: list[int] = []
    try:
        for ev in Decoder(checkpointed=True).feed(make_stream(epochs, end=False)):
            if len(ev.wire):
                link.send([ev.wire])
            if isinstance(ev, DomainHeader):
                link.start_heartbeats()
            if isinstance(ev, EpochEnd):
                link.epoch_sent(ev.epoch, 0.1, 1, 0.1)
                link.wait_ack(ev.epoch)
                acked.append(ev.epoch)
    finally:
        link.stop_heartbeats()
    agreed = link.chan.agreed
    assert agreed is not None and agreed.mac is not None and agreed.psk
    return acked


def test_protect_over_tcp_acks_under_the_session_key(listener: Any) -> None:
    """Our channel into `migrate-receive -r --listen`: the ACKs verify under the
    handshake's session key (the key file's key itself would not), then the failover."""
    lp = listener("-r", "-e")
    conn = connect("127.0.0.1", lp.port, KEY, 5)
    acked = send_checkpoints(conn, Config(mac=True, key=conn.session_key), 4)
    assert acked == [0, 1, 2, 3]
    conn.close()
    rc, err = lp.finish()
    assert rc == 0, err
    assert "resuming from epoch 3" in err and "Traceback" not in err
    lp2 = listener("-r", "-e")
    conn = connect("127.0.0.1", lp2.port, KEY, 5)
    with pytest.raises(MacError, match="bad MAC"):
        send_checkpoints(conn, Config(mac=True, key=KEY), 2)
    conn.close()
    lp2.finish()


def test_exit_on_refusal(listener: Any) -> None:
    lp = listener("-r", "--exit-on-refusal")
    with pytest.raises(HandshakeRefused):
        connect("127.0.0.1", lp.port, OTHER, 5)
    rc, err = lp.finish()
    assert rc == 1 and not lp.xl_started
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"xen-remus migrate-receive: refused 127\.0\.0\.1:\d+: the peer "
                        r"refused our proof: it has a different key \(--key-file\)", last), err


def test_silent_peer_dropped_after_the_handshake_timeout(listener: Any) -> None:
    lp = listener("-r", "--handshake-timeout", "0.5", "--exit-on-refusal")
    with socket.create_connection(("127.0.0.1", lp.port), timeout=5) as s:
        t0 = time.monotonic()
        assert s.recv(16) == b""  # dropped, with no byte sent
        assert 0.4 < time.monotonic() - t0 < 5
    rc, err = lp.finish()
    assert rc == 1 and "no peer's hello within 0.5 s (got 0 of 42 bytes)" in err
    assert not lp.xl_started


def test_migrate_over_tcp(listener: Any) -> None:
    """`migrate --tcp`'s path: our sender's xl handshake over the direct connection into
    `migrate-receive --listen` (no -r), which relays it to xl."""
    lp = listener()
    s = FakeSaver()
    calls: list[tuple[str, ...]] = []

    def fake_xl(*args: str, timeout: float = 60.0) -> str:
        calls.append(args)
        return ""

    recv = DirectReceiver(connect("127.0.0.1", lp.port, KEY, 5))
    assert recv.rune == f"tcp 127.0.0.1:{lp.port}"
    try:
        migrate(s, recv, '{"c_info": {"name": "guest"}}', PrecopyPolicy(max_rounds=2),
                timeout=30, xl=fake_xl)
    finally:
        recv.close()
    rc, err = lp.finish()
    assert rc == 0, err
    assert calls == [("rename", "7", "guest--migratedaway"), ("destroy", "7")]
    assert (lp.tmp / "received").read_bytes()[:4] == b"Xen "  # xl's header: the stream


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv,msg", [
    (["--tcp", "7400"], "--tcp needs --key-file"),
    (["--tcp", "0", "--key-file", "/k"], "1..65535"),
    (["--tcp", "7400", "--key-file", "/k", "-s", "rsh"], "no -s"),
    (["--tcp", "7400", "--key-file", "/k", "-e"], "give it to `migrate-receive --listen`"),
    (["--tcp", "7400", "--key-file", "/k", "--stock-backup"], "not --stock-backup"),
])
def test_protect_tcp_arguments(argv: list[str], msg: str) -> None:
    with pytest.raises(UsageError, match=re.escape(msg)):
        check_args(parse("protect", "-d", "-F", *argv, "g1", "hostb"))
    check_args(parse("protect", "-d", "-F", "--tcp", "7400", "--key-file", "/k", "g1", "hb"))


@pytest.mark.parametrize("argv,msg", [
    (["--listen", "7400"], "--listen needs --key-file"),
    (["--listen", "7400", "--key-file", "K", "--handshake-timeout", "0"],
     "--handshake-timeout must be positive"),
    (["--key-file", "K"], "--key-file needs -r"),
    (["--listen", "unix:/x", "--key-file", "K"], "a TCP address"),
])
def test_listen_arguments(argv: list[str], msg: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(key_file(tmp_path, KEY)) if a == "K" else a for a in argv]
    assert main(["migrate-receive", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_migrate_tcp_needs_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--tcp", "7400", "g1", "hostb"]) == 2
    assert "--tcp needs --key-file" in capsys.readouterr().err


def test_protect_wrong_key_stops_before_the_guest_is_touched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """protect() connects and authenticates right after the domain's lock and its disk
    checks: with the wrong key it raises before the generation, the config, the guest's
    mappings or the receiver's stream."""
    touched: list[str] = []

    class Target:
        domid, name = 5, "g1"

    class Session:
        target, dom = Target(), None

        def __enter__(self) -> Session:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def open_guest(self) -> None:
            touched.append("open_guest")

    def touch(what: str) -> Any:
        return lambda *a, **k: touched.append(what)

    monkeypatch.setattr(protect_run, "SaveSession", lambda domain: Session())
    monkeypatch.setattr(protect_run, "domain_lock", lambda domid: contextlib.nullcontext())
    monkeypatch.setattr(protect_run, "domain_config_json", touch("config"))
    monkeypatch.setattr(protect_run, "GenerationStore", touch("generation"))
    refused: list[BaseException] = []
    with Listener("127.0.0.1", 0, KEY, timeout=5) as lis:
        def serve() -> None:
            try:
                lis.accept(exit_on_refusal=True)
            except HandshakeRefused as exc:
                refused.append(exc)

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        args = parse("protect", "-d", "-F", "-n", "--tcp", str(lis.port), "--key-file",
                     str(key_file(tmp_path, OTHER)), "g1", "127.0.0.1")
        with pytest.raises(HandshakeRefused, match=rf"direct transport to 127.0.0.1:"
                           rf"{lis.port}: the backup's proof does not verify"):
            protect_run.protect(args, PrecopyPolicy(2, 4), OTHER)
        th.join(10)
    assert touched == [] and refused
