"""Upstream.read_beating on real pipes: the backup's main loop is the only one to declare
the primary dead, after the heartbeat timeout (longer before the first commit), and never
while the primary's bytes wait unread."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import SenderChannel
from xen_remus.receive import upstream as upstream_mod
from xen_remus.receive.upstream import Upstream
from xen_remus.stream.records import Record

TIMEOUT_MS = 300


def agreed_channel() -> ReceiverChannel:
    """A backup's channel after a xen-remus sender accepted its offer (heartbeats on)."""
    cfg = Config(heartbeat_timeout_ms=TIMEOUT_MS, heartbeat_interval_ms=TIMEOUT_MS // 4)
    now = time.monotonic()
    rcv, snd = ReceiverChannel(cfg, now), SenderChannel(cfg, now)
    snd.feed_back(rcv.offer_line(), now)
    accept = b"".join(bytes(b) for b in snd.pending(now))
    rtype, length = struct.unpack_from("<II", accept)
    rec = Record(layer="libxc", rtype=rtype, length=length, body=accept[8:8 + length],
                 offset=0)
    assert rcv.on_record(rec) == [] and rcv.agreed is not None
    return rcv


@pytest.fixture
def fds() -> Iterator[tuple[int, int, int, int]]:
    """(stream read end, stream write end, back channel read end, back write end)."""
    s_r, s_w = os.pipe()
    b_r, b_w = os.pipe()
    yield s_r, s_w, b_r, b_w
    for fd in (s_r, s_w, b_r, b_w):
        os.close(fd)


def heartbeats_in(fd: int) -> int:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return 0
    frames = wire.FrameDecoder("back channel").feed(data)
    assert all(f.rtype == wire.REC_REMUS_HEARTBEAT for f in frames)
    return len(frames)


def test_a_silent_primary_is_dead_after_the_heartbeat_timeout(
        fds: tuple[int, int, int, int]) -> None:
    s_r, _s_w, b_r, b_w = fds
    up = Upstream(s_r, b_w, idle_timeout=None)
    t0 = time.monotonic()  # the silence counts from the channel's start
    link = ReceiverLink(agreed_channel(), b_w)
    assert up.read_beating(link, armed=True) == b""
    took = time.monotonic() - t0
    assert TIMEOUT_MS / 1000 <= took < TIMEOUT_MS / 1000 + 1.5
    assert up.gone is not None and "no word from the primary" in up.gone
    assert heartbeats_in(b_r) >= 2  # it kept talking while it waited


def test_bytes_waiting_unread_are_taken_not_blamed(fds: tuple[int, int, int, int]) -> None:
    """The backup was busy (its sink slow) past the timeout while the primary's bytes
    waited in the pipe: they are read, and the primary is alive."""
    s_r, s_w, _b_r, b_w = fds
    up = Upstream(s_r, b_w, idle_timeout=None)
    link = ReceiverLink(agreed_channel(), b_w)
    os.write(s_w, b"epoch bytes")
    time.sleep(2 * TIMEOUT_MS / 1000)
    assert up.read_beating(link, armed=True) == b"epoch bytes"
    assert up.gone is None and not link.chan.peer_dead(time.monotonic())


def test_before_the_first_commit_the_grace_is_added(fds: tuple[int, int, int, int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    s_r, _s_w, _b_r, b_w = fds
    monkeypatch.setattr(upstream_mod, "INITIAL_GRACE_S", 0.6)
    up = Upstream(s_r, b_w, idle_timeout=None)
    t0 = time.monotonic()  # the silence counts from the channel's start
    link = ReceiverLink(agreed_channel(), b_w)
    assert up.read_beating(link, armed=False) == b""
    assert time.monotonic() - t0 >= TIMEOUT_MS / 1000 + 0.6
    assert up.gone is not None and "no word from the primary" in up.gone


def test_idle_timeout_without_heartbeats(fds: tuple[int, int, int, int]) -> None:
    """A stock sender (nothing agreed: no heartbeats) that goes quiet: --idle-timeout."""
    s_r, _s_w, b_r, b_w = fds
    up = Upstream(s_r, b_w, idle_timeout=0.3)
    link = ReceiverLink(ReceiverChannel(Config(), time.monotonic()), b_w)
    t0 = time.monotonic()
    assert up.read_beating(link, armed=True) == b""
    assert 0.3 <= time.monotonic() - t0 < 2
    assert up.gone == "no data from the sender for 0.3 s"
    assert heartbeats_in(b_r) == 0
