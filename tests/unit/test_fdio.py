"""fdio on real pipes: every byte out through short writes and non-blocking fds, deadlines
that end a wait, reads that say what they waited for."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from xen_remus import fdio
from xen_remus.fdio import IOV_MAX, IoTimeout, Iovecs, read_some, readable, wait_fd, write_all
from xen_remus.stream.events import Buffer


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def drain_slowly(fd: int, want: int, got: bytearray) -> threading.Thread:
    def run() -> None:
        while len(got) < want:
            chunk = os.read(fd, 1000)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("blocking", [True, False])
def test_write_all_gets_every_byte_through_short_writes(pipe: tuple[int, int],
                                                        blocking: bool) -> None:
    r, w = pipe
    os.set_blocking(w, blocking)
    bufs: list[Buffer] = [bytes([i % 256]) * (1 + i % 700) for i in range(3 * IOV_MAX)]
    bufs += [b"", np.arange(1000, dtype=np.uint64).data]  # empty, and not bytes
    want = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
    got = bytearray()
    t = drain_slowly(r, len(want), got)
    write_all(w, bufs, 30.0, "the test reader")
    t.join(30)
    assert bytes(got) == want


def test_write_all_times_out_naming_what_it_waited_for(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.set_blocking(w, False)
    out = Iovecs([bytes(1 << 20)])
    t0 = time.monotonic()
    with pytest.raises(IoTimeout, match="timed out waiting for the sink to take data"):
        write_all(w, out, 0.2, "the sink to take data")
    assert 0.15 < time.monotonic() - t0 < 5
    assert 0 < out.written < 1 << 20  # the pipe took what it holds, and it says how much


def test_write_all_lets_a_broken_pipe_through(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    with pytest.raises(BrokenPipeError):
        write_all(w, [b"x"], 1.0, "nobody")


def test_iovecs_offers_up_to_max_bytes_and_resumes_mid_buffer(pipe: tuple[int, int]) -> None:
    r, w = pipe
    out = Iovecs([b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 100])
    assert out.writev(w, 150) == 200  # up to the buffer that reaches 150
    assert out.writev(w, 1) == 100 and out.written == 300
    assert out.writev(w) == 100 and not out
    assert os.read(r, 1000) == b"a" * 100 + b"b" * 100 + b"c" * 100 + b"d" * 100


def test_read_some_reads_waits_and_times_out(pipe: tuple[int, int]) -> None:
    r, w = pipe
    assert not readable(r)
    with pytest.raises(IoTimeout, match="timed out waiting for the sender's GO"):
        read_some(r, 0.05, "the sender's GO")
    threading.Timer(0.1, os.write, (w, b"hello")).start()
    assert read_some(r, 10.0, "the sender") == b"hello"
    os.write(w, b"x" * 100)
    assert readable(r) and read_some(r, None, "the sender", size=10) == b"x" * 10
    os.close(w)
    read_some(r, 1.0, "the sender")
    assert readable(r) and read_some(r, 1.0, "the sender") == b""  # EOF


def test_a_passed_deadline_ends_the_wait_at_once(pipe: tuple[int, int]) -> None:
    r, _w = pipe
    t0 = time.monotonic()
    with pytest.raises(IoTimeout):
        wait_fd(r, select.POLLIN, time.monotonic() - 1, "nothing")
    assert time.monotonic() - t0 < 0.5
    assert fdio.deadline_after(None) is None
