"""Both ends over a real TCP connection on localhost, in two processes: epochs stream with
ACKs and heartbeats; then one end is frozen (SIGSTOP: its socket stays open, no RST, no
EOF, as when a host loses power) and the other detects it by silence alone."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Iterator

import pytest

from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost, ReceiverLink, SenderLink
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.stream import consts as C
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import DomainHeader, EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream
from xen_remus.xlproto import BANNER

TIMEOUT_MS = 1000  # the default
CFG = Config()
assert CFG.extensions().heartbeat == (250, TIMEOUT_MS)
EPOCHS = 400
INTERVAL = 0.01


def std_stream() -> bytes:
    eps = [make_epoch(range(64), seed=0)]
    eps += [make_epoch([(3 * n + k) % 64 for k in range(4)], seed=n) for n in range(1, EPOCHS)]
    return b"".join(bytes(b) for b in synthetic_stream("xl", False, eps, end=False, batch=32))


def primary(sock: socket.socket, std: bytes) -> int:
    """The sender's side (child process): exit 3 when it declared the backup lost."""
    fd = sock.fileno()
    got = b""
    while len(got) < len(BANNER):
        got += os.read(fd, len(BANNER) - len(got))
    assert got == BANNER
    chan = SenderChannel(CFG, time.monotonic())
    link = SenderLink(chan, fd, fd)
    try:
        for ev in Decoder(checkpointed=True).feed(std):
            if isinstance(ev, Record) and ev.layer == "libxc" and \
                    ev.rtype == C.REC_TYPE_PAGE_DATA:
                pd = ev.parse()
                link.send_pages(pd.pfns, pd.types, pd.page_bytes())
            elif len(ev.wire):
                link.send([ev.wire])
            if isinstance(ev, DomainHeader):
                link.start_heartbeats()  # from here on, libxc record boundaries
            if isinstance(ev, EpochEnd):
                link.epoch_sent(ev.epoch, 0.1, 4, 0.1)
                link.wait_ack(ev.epoch)
                link.idle(time.monotonic() + INTERVAL)
    except BackupLost as exc:
        print(f"primary: {exc}", flush=True)
        return 3
    return 0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, int]]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    std = std_stream()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            srv.close()
            code = primary(socket.create_connection(("127.0.0.1", port)), std)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    conn, _ = srv.accept()
    srv.close()
    try:
        yield conn, pid
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        conn.close()


def backup(conn: socket.socket, stop_after: int, limit: float = 20.0
           ) -> tuple[ReceiverChannel, list[int], Decoder]:
    """Receive until ``stop_after`` epochs are committed; returns the channel, commits."""
    chan = ReceiverChannel(CFG, time.monotonic())
    link = ReceiverLink(chan, conn.fileno())
    conn.sendall(BANNER + chan.offer_line())
    dec = Decoder(checkpointed=True)
    commits: list[int] = []
    end = time.monotonic() + limit
    while len(commits) < stop_after and time.monotonic() < end:
        if select.select([conn], [], [], link.timeout())[0]:
            data = conn.recv(1 << 16)
            assert data, "the primary closed the connection"
            chan.seen(time.monotonic())
            for ev in dec.feed(data):
                if isinstance(ev, Record):
                    chan.on_record(ev)
                if isinstance(ev, EpochEnd):
                    commits.append(ev.epoch)
                    link.committed(ev.epoch)
        assert not link.tick(), "primary declared dead while it runs"
    return chan, commits, dec


def test_frozen_primary_is_detected_by_the_backup(pair: tuple[socket.socket, int]) -> None:
    conn, pid = pair
    chan, commits, dec = backup(conn, stop_after=30)
    assert commits == list(range(30)) and chan.agreed is not None
    os.kill(pid, signal.SIGSTOP)  # power off: nothing more, no FIN, no RST
    frozen = time.monotonic()
    link = ReceiverLink(chan, conn.fileno())
    while not link.tick():
        assert time.monotonic() - frozen < 5, "no failover decision"
        if select.select([conn], [], [], link.timeout())[0]:
            data = conn.recv(1 << 16)  # what was in flight before the freeze
            chan.seen(time.monotonic())
            dec.feed(data)
    took = time.monotonic() - frozen
    assert chan.detector is not None
    print(f"backup: primary declared dead {took:.3f} s after the freeze "
          f"(timeout {TIMEOUT_MS} ms, committed through epoch {commits[-1]}+)")
    assert TIMEOUT_MS / 1000 * 0.8 <= took <= TIMEOUT_MS / 1000 + 1.0


def test_frozen_backup_is_detected_by_the_primary(pair: tuple[socket.socket, int]) -> None:
    conn, pid = pair
    _, commits, _ = backup(conn, stop_after=20)
    assert commits == list(range(20))
    # The backup stops reading and answering (its process frozen): the primary's next
    # wait for an ACK (or a write once the socket buffers fill) must end in BackupLost.
    frozen = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() - frozen < 5, "the primary did not give up"
        time.sleep(0.01)
    took = time.monotonic() - frozen
    print(f"primary: backup declared lost {took:.3f} s after it froze")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert took <= TIMEOUT_MS / 1000 + 1.0
