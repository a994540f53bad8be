"""The fd-level links over real pipes: a backup that stops draining (powered off, no RST)
is detected by silence within the timeout; ACK waits; heartbeats while idle."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost, ReceiverLink, SenderLink
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.stream.records import Record

TIMEOUT_MS = 400


@dataclass
class Pipes:
    link: SenderLink
    rcv: ReceiverChannel
    fwd_r: int  # the backup reads the stream here
    back_w: int  # the backup writes here


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def records(data: bytes) -> list[Record]:
    out, at = [], 0
    while at < len(data):
        rtype, length = struct.unpack_from("<II", data, at)
        out.append(Record(layer="libxc", rtype=rtype, length=length,
                          body=data[at + 8:at + 8 + length], offset=at))
        at += 8 + (length + 7) // 8 * 8
    return out


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    fwd_r, fwd_w = os.pipe()
    back_r, back_w = os.pipe()
    cfg = Config(heartbeat_timeout_ms=TIMEOUT_MS, heartbeat_interval_ms=TIMEOUT_MS // 4)
    now = time.monotonic()
    rcv, snd = ReceiverChannel(cfg, now), SenderChannel(cfg, now)
    link = SenderLink(snd, fwd_w, back_r)
    os.write(back_w, rcv.offer_line())
    link.idle(time.monotonic() + 0.01)  # reads the offer, writes the accept
    for rec in records(drain(fwd_r)):
        rcv.seen(time.monotonic())
        assert rcv.on_record(rec) == []
    assert snd.agreed is not None and snd.agreed == rcv.agreed
    yield Pipes(link, rcv, fwd_r, back_w)
    for fd in (fwd_r, fwd_w, back_r, back_w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_backup_that_stops_draining_is_lost_after_the_timeout(pipes: Pipes) -> None:
    """The stream fills the pipe (64 KiB) and the backup neither reads nor speaks: the
    write does not hang; it ends in BackupLost about TIMEOUT_MS after the last word."""
    t0 = time.monotonic()
    silent = r"no word from it for (0\.[4-9]|1\.\d)\d s \(heartbeat timeout\)"
    with pytest.raises(BackupLost, match=silent):
        pipes.link.write([bytes(4 << 20)])
    det = pipes.link.chan.detector
    assert det is not None and time.monotonic() - det.last >= TIMEOUT_MS / 1000
    assert time.monotonic() - t0 < 2.0
    assert 0 < pipes.link.offset < 4 << 20


def slow_backup(pipes: Pipes, nbytes: int, every: float) -> int:
    """Fork a backup that drains the stream every ``every`` s and heartbeats, until it has
    ``nbytes`` (bounded: 5 s). Returns its pid."""
    rl = ReceiverLink(pipes.rcv, pipes.back_w)
    pid = os.fork()
    if pid == 0:
        try:
            got, deadline = 0, time.monotonic() + 5
            while got < nbytes and time.monotonic() < deadline:
                time.sleep(every)
                rl.tick()
                got += len(drain(pipes.fwd_r))
        finally:
            os._exit(0)
    return pid


def test_heartbeats_from_the_backup_keep_a_slow_write_going(pipes: Pipes) -> None:
    """While the stream is blocked, words from the backup keep it alive; once it drains,
    the write completes."""
    payload = bytes(1 << 20)
    start = pipes.link.offset
    pid = slow_backup(pipes, len(payload), 0.02)
    try:
        pipes.link.write([payload])
    finally:
        os.waitpid(pid, 0)
    assert pipes.link.offset == start + len(payload)


def test_a_blocked_write_does_not_spin_when_a_heartbeat_is_due(
        pipes: Pipes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-record no heartbeat can be sent; a due one must not turn the wait for the pipe
    into a busy loop that takes the CPU from the process draining it."""
    calls = 0
    real = select.select

    def counting(*a: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*a)

    monkeypatch.setattr(select, "select", counting)
    payload = bytes(384 << 10)
    pid = slow_backup(pipes, len(payload), 0.25)  # drains less often than it heartbeats
    try:
        t0 = time.monotonic()
        pipes.link.write([payload])  # ~1.5 s; a heartbeat falls due between drains
        took = time.monotonic() - t0
    finally:
        os.waitpid(pid, 0)
    assert took > 0.3  # the write did block, long enough for heartbeats to fall due
    assert calls < 200, f"{calls} selects in {took:.2f} s: the wait spins"


def test_wait_ack_and_idle_heartbeats(pipes: Pipes) -> None:
    link = pipes.link
    link.write([b"x" * 8])
    link.chan.epoch_sent(0, time.monotonic(), 1.0, 1, 1.0)
    rl = ReceiverLink(pipes.rcv, pipes.back_w)
    rl.committed(0, commit_ms=0.3)
    pid = os.fork()
    if pid == 0:  # the backup stays alive (heartbeats) for a bounded while
        try:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                time.sleep(0.01)
                rl.tick()
        finally:
            os._exit(0)
    try:
        _wait_ack_and_idle(pipes)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def _wait_ack_and_idle(pipes: Pipes) -> None:
    link = pipes.link
    ack = link.wait_ack(0)
    assert ack is not None and ack.epoch == 0 and ack.commit_ms == 0.3
    assert ack.stats.ack_ms is not None and ack.stats.ack_ms >= 0
    drain(pipes.fwd_r)
    t0 = time.monotonic()
    link.idle(t0 + 0.5)  # the stats record of epoch 0, then heartbeats every 100 ms
    assert 0.5 <= time.monotonic() - t0 < 1.5
    kinds = [r.rtype for r in records(drain(pipes.fwd_r))]
    assert kinds[0] == wire.REC_REMUS_EPOCH_STATS
    assert 3 <= kinds.count(wire.REC_REMUS_HEARTBEAT) <= 6


def test_backup_closing_or_stopping(pipes: Pipes) -> None:
    os.write(pipes.back_w, wire.close("out of memory"))
    with pytest.raises(BackupLost, match="it stopped: out of memory") as said:
        pipes.link.idle(time.monotonic() + 0.5)
    assert said.value.closed  # it said it stops: it will not resume its copy
    os.close(pipes.back_w)
    with pytest.raises(BackupLost, match="it closed its channel") as gone:
        pipes.link.idle(time.monotonic() + 0.5)
    assert not gone.value.closed  # an EOF says nothing of what it does next
    t0 = time.monotonic()
    with pytest.raises(BackupLost, match="it closed its channel"):  # again, at once
        pipes.link.wait_ack(0)
    assert time.monotonic() - t0 < 0.1


def test_receiver_link_detects_a_silent_primary(pipes: Pipes) -> None:
    rl = ReceiverLink(pipes.rcv, pipes.back_w)
    t0 = time.monotonic()
    dead = False
    while not dead and time.monotonic() - t0 < 2:
        time.sleep(min(0.01, rl.timeout() or 0.01))
        dead = rl.tick()
    det = pipes.rcv.detector
    assert dead and det is not None
    assert TIMEOUT_MS / 1000 <= time.monotonic() - det.last < TIMEOUT_MS / 1000 + 0.5
    assert len(drain(pipes.link.recv_fd)) >= 8  # it heartbeated meanwhile (every 100 ms)


def test_heartbeat_thread_covers_a_busy_engine(pipes: Pipes) -> None:
    """The engine is busy for 3 timeouts (a slow suspend): the thread keeps heartbeats
    flowing; once the backup falls silent, the engine's next call raises BackupLost."""
    link, rl = pipes.link, ReceiverLink(pipes.rcv, pipes.back_w)
    link.start_heartbeats()
    try:
        arrivals = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000:
            time.sleep(0.01)
            data = drain(pipes.fwd_r)
            if data:
                pipes.rcv.seen(time.monotonic())
                arrivals += [time.monotonic()] * sum(
                    r.rtype == wire.REC_REMUS_HEARTBEAT for r in records(data))
            assert not rl.tick(), "the backup lost the primary while the engine was busy"
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert len(arrivals) >= 8 and max(gaps) < TIMEOUT_MS / 1000
        link.send([b"\0" * 8])  # the engine is back: fine
        t1 = time.monotonic()
        while time.monotonic() - t1 < 2 * TIMEOUT_MS / 1000:  # the backup goes silent
            time.sleep(0.01)
            drain(pipes.fwd_r)
        with pytest.raises(BackupLost, match="heartbeat timeout"):
            link.send([b"\0" * 8])
    finally:
        link.stop_heartbeats()


def test_backup_heartbeat_thread_covers_a_blocked_receiver(pipes: Pipes) -> None:
    """The backup's main loop is stuck (writing into a sink that does not read) for 3
    timeouts: its thread keeps the primary from declaring it lost."""
    rl = ReceiverLink(pipes.rcv, pipes.back_w)
    rl.start_heartbeats()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000:
            pipes.link.idle(time.monotonic() + 0.05)  # the primary, waiting for the interval
            drain(pipes.fwd_r)
    finally:
        rl.stop_heartbeats()
    with pytest.raises(BackupLost, match="heartbeat timeout"):  # and without it: lost
        pipes.link.idle(time.monotonic() + 3 * TIMEOUT_MS / 1000)


def test_busy_ends_do_not_blame_their_peer(pipes: Pipes) -> None:
    """Each end stops reading for 3 timeouts while the other keeps talking: the words
    wait unread, so neither may declare the other dead when it looks again."""
    rl = ReceiverLink(pipes.rcv, pipes.back_w, in_fd=pipes.fwd_r)
    link = pipes.link
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000:  # the backup is busy (no reads)
        time.sleep(0.02)
        link.send([wire.heartbeat(0)])  # the primary talks (and reads the backup's ACKs)
        rl.tick()  # the backup's heartbeat thread would do this
    assert not rl.tick()  # words from the primary wait in fwd_r: alive
    pipes.rcv.seen(time.monotonic())
    drain(pipes.fwd_r)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000:  # now the primary is busy
        time.sleep(0.02)
        rl.tick()
    link.send([wire.heartbeat(0)])  # its heartbeats waited in back_r: no BackupLost


def test_a_backup_breaking_the_protocol_is_lost_not_a_thread_traceback(
        pipes: Pipes, capsys: pytest.CaptureFixture[str]) -> None:
    """An ACK of an epoch never sent, read by the heartbeat thread: the engine's next call
    raises BackupLost naming it; no traceback from the thread."""
    link = pipes.link
    link.start_heartbeats()
    try:
        os.write(pipes.back_w, wire.ack(7, 0))
        deadline = time.monotonic() + 5
        with pytest.raises(BackupLost, match="ACK of epoch 7, but the epochs awaiting"):
            while time.monotonic() < deadline:
                time.sleep(0.02)
                drain(pipes.fwd_r)
                link.send([b"\0" * 8])
    finally:
        link.stop_heartbeats()
    assert "Traceback" not in capsys.readouterr().err


def test_next_ack_takes_acks_in_order_with_several_awaiting(pipes: Pipes) -> None:
    """Pipelined epochs: three sent, the ACKs come in order; next_ack waits at most until
    its deadline; silence with epochs awaiting is a lost backup naming them."""
    link = pipes.link
    for e in range(3):
        link.epoch_sent(e, 1.0, 1, 1.0)
    os.write(pipes.back_w, pipes.rcv.committed(0, time.monotonic()))
    ack = link.next_ack(time.monotonic() + 1)
    assert ack is not None and ack.epoch == 0
    t0 = time.monotonic()
    assert link.next_ack(t0 + 0.1) is None  # epoch 1's ACK is not in yet
    assert 0.09 < time.monotonic() - t0 < 0.3
    os.write(pipes.back_w, pipes.rcv.committed(1, time.monotonic())
             + pipes.rcv.committed(2, time.monotonic()))
    got = [link.next_ack(None), link.next_ack(None)]
    assert [a.epoch for a in got if a is not None] == [1, 2]
    link.epoch_sent(3, 1.0, 1, 1.0)
    link.epoch_sent(4, 1.0, 1, 1.0)
    with pytest.raises(BackupLost, match=r"last ACK 2; epochs 3\.\.4 await their ACK\): no "
                       r"word from it"):
        link.next_ack(None)
