"""The asyncio DiskServer over a Unix socket, with our own small client; the replication
link end to end (server -> sender -> a proxy that dies at a random byte -> backup store)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.unit.disk_helpers import Client, go_data, request
from xen_remus.disk import nbd
from xen_remus.disk.errors import DiskError, EpochError
from xen_remus.disk.link import ReplicaSender, serve_backup
from xen_remus.disk.server import DiskServer, WriteSink
from xen_remus.disk.store import EpochStore

SIZE = 1 << 20
TEST_TIMEOUT = 60.0


def make_image(d: str, name: str = "img", fill: bytes = b"\0") -> str:
    path = os.path.join(d, name)
    Path(path).write_bytes(fill * SIZE)
    return path


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), TEST_TIMEOUT)
    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def serving(image: str, sock: str, sink: WriteSink | None = None,
                  first_epoch: int = 0) -> AsyncIterator[tuple[DiskServer, Client]]:
    """A started DiskServer of ``image`` and a client attached to it; the server is closed
    on the way out (the client's DISC, if any, is the test's)."""
    srv = DiskServer(image, sock, sink=sink, first_epoch=first_epoch)
    await srv.start()
    try:
        yield srv, await Client.connect(srv.socket_path)
    finally:
        await srv.close()


class RecSink:
    """Records what the server hands over; ``full`` at ``cap`` bytes until drained."""

    def __init__(self, cap: int | None = None) -> None:
        self.log: list[tuple[str, int, int, bytes]] = []
        self.held = 0
        self.cap = cap
        self.room = asyncio.Event()

    @property
    def full(self) -> bool:
        return self.cap is not None and self.held >= self.cap

    def write(self, epoch: int, offset: int, data: bytes) -> None:
        self.log.append(("W", epoch, offset, data))
        self.held += len(data)

    def seal(self, epoch: int) -> None:
        self.log.append(("S", epoch, 0, b""))

    async def wait_room(self) -> None:
        while self.full:
            self.room.clear()
            await self.room.wait()

    def drain(self) -> None:
        self.held = 0
        self.room.set()


def test_read_write_flush_fua_against_the_image(tmp: str) -> None:
    img = make_image(tmp, fill=b"\x11")

    async def main() -> None:
        async with serving(img, os.path.join(tmp, "s")) as (srv, c):
            assert c.size == SIZE and c.flags == nbd.TRANSMISSION_FLAGS
            assert await c.read(0, 4096) == b"\x11" * 4096
            assert await c.write(4096, b"\x22" * 8192) == 0
            assert await c.write(SIZE - 512, b"\x33" * 512, fua=True) == 0
            assert await c.flush() == 0
            assert await c.read(4000, 200) == b"\x11" * 96 + b"\x22" * 104
            assert await c.read(SIZE - 512, 512) == b"\x33" * 512
            # Refused, and the connection goes on.
            assert await c.write(SIZE - 100, b"x" * 200) == nbd.ENOSPC
            h = c.send(nbd.Command.READ, SIZE, 512)
            assert await c.reply(512) == (nbd.EINVAL, h, b"")
            h = c.send(4, 0, 512)  # TRIM, not advertised
            assert await c.reply() == (nbd.EINVAL, h, b"")
            await c.disc()
        assert srv.stats.writes == 2 and srv.stats.bytes_written == 8192 + 512
        data = Path(img).read_bytes()
        assert data[4096:12288] == b"\x22" * 8192 and data[-512:] == b"\x33" * 512
        assert not os.path.exists(srv.socket_path)

    run(main)


def test_pipelined_requests_are_answered_in_order_with_their_handles(tmp: str) -> None:
    img = make_image(tmp)

    async def main() -> None:
        async with serving(img, os.path.join(tmp, "s")) as (srv, c):
            hs = [c.send(nbd.Command.WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(32)]
            assert [(await c.reply())[:2] for _ in hs] == [(0, h) for h in hs]
            hs = [c.send(nbd.Command.READ, i * 4096, 4096) for i in range(32)]
            for i, h in enumerate(hs):
                assert await c.reply(4096) == (0, h, bytes([i]) * 4096)
            await c.disc()

    run(main)


def test_writes_reach_the_sink_in_image_order_labelled_with_the_open_epoch(tmp: str) -> None:
    img = make_image(tmp)

    async def main() -> None:
        sink = RecSink()
        async with serving(img, os.path.join(tmp, "s"), sink=sink, first_epoch=3) as (srv, c):
            await c.write(0, b"a" * 512)
            await c.write(512, b"b" * 512, fua=True)
            srv.seal(3)
            srv.seal(3)  # a retried seal of the epoch just sealed: no-op
            await c.write(0, b"c" * 512)
            await c.flush()
            srv.seal(4)
            with pytest.raises(EpochError, match="epoch 5 is open"):
                srv.seal(7)
            await c.disc()
        assert sink.log == [("W", 3, 0, b"a" * 512), ("W", 3, 512, b"b" * 512),
                            ("S", 3, 0, b""), ("W", 4, 0, b"c" * 512), ("S", 4, 0, b"")]

    run(main)


def test_at_the_cap_the_server_stops_taking_requests_and_drops_nothing(tmp: str) -> None:
    img = make_image(tmp)

    async def main() -> None:
        sink = RecSink(cap=3 * 4096)
        async with serving(img, os.path.join(tmp, "s"), sink=sink) as (srv, c):
            hs = [c.send(nbd.Command.WRITE, i * 4096, 4096, bytes([i + 1]) * 4096)
                  for i in range(10)]
            got = [await c.reply() for _ in range(3)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.reply(), 0.3)  # the 4th waits for room
            assert len(sink.log) == 3 and srv.stats.stalls >= 1
            for _ in range(8):  # bounded: each drain lets at most 3 more writes in
                if len(got) == len(hs):
                    break
                sink.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    while len(got) < len(hs):
                        got.append(await asyncio.wait_for(c.reply(), 0.3))
            assert [g[:2] for g in got] == [(0, h) for h in hs]
            assert [w[2] for w in sink.log] == [i * 4096 for i in range(10)]
            await c.disc()

    run(main)


def test_bad_request_magic_closes_the_connection_naming_the_offset(
        tmp: str, caplog: pytest.LogCaptureFixture) -> None:
    img = make_image(tmp)

    async def main() -> None:
        async with serving(img, os.path.join(tmp, "s")) as (srv, c):
            await c.write(0, b"z" * 100)
            c.w.write(b"\x00\x00\x00\x01" + request(nbd.Command.READ, 0, 512)[4:])
            assert await asyncio.wait_for(c.r.read(), 5) == b""  # closed by the server
            c2 = await Client.connect(srv.socket_path)  # the server itself goes on
            assert await c2.read(0, 100) == b"z" * 100
            await c2.disc()

    with caplog.at_level(logging.ERROR, logger="xen_remus.disk.server"):
        run(main)
    at = 4 + 16 + len(go_data()) + 28 + 100  # flags, OPT_GO, the 100-byte WRITE
    assert f"bad request magic 0x00000001 (want 0x25609513) at stream offset {at}" \
        in caplog.text
    assert "Traceback" not in caplog.text


def test_missing_image_and_unusable_socket_are_disk_errors(tmp: str) -> None:
    async def main() -> None:
        with pytest.raises(DiskError, match="cannot open the image"):
            await DiskServer(os.path.join(tmp, "none"), os.path.join(tmp, "s")).start()
        img = make_image(tmp)
        with pytest.raises(DiskError, match="cannot listen"):
            await DiskServer(img, os.path.join(tmp, "no", "dir", "s")).start()

    run(main)


# -- the link, end to end ---------------------------------------------------------------------
async def _proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 target: str, limit: int) -> None:
    """Forward to ``target``; after ``limit`` bytes primary->backup, die (both ends)."""
    br, bw = await asyncio.open_unix_connection(target)

    async def forward() -> None:
        sent = 0
        while sent < limit:
            data = await reader.read(min(65536, limit - sent))
            if not data:
                break
            bw.write(data)
            await bw.drain()
            sent += len(data)

    async def back() -> None:
        while data := await br.read(65536):
            writer.write(data)
            await writer.drain()

    ack_task = asyncio.create_task(back())
    await forward()
    ack_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ack_task
    for w in (bw, writer):
        w.close()


@pytest.mark.parametrize("seed", range(8))
def test_primary_killed_mid_stream_backup_holds_the_last_committed_epoch(
        tmp: str, seed: int) -> None:
    rnd = random.Random(seed)
    primary = make_image(tmp, "a", b"\x5a")
    backup = make_image(tmp, "b", b"\x5a")
    limit = rnd.randrange(0, 300_000)  # bytes of stream that reach the backup

    async def main() -> None:
        store = EpochStore(backup, memory_ceiling=rnd.choice([0, 50_000, 1 << 30]))
        ended: list[str] = []

        async def backup_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ended.append(await serve_backup(r, w, store))

        bsrv = await asyncio.start_unix_server(backup_conn, os.path.join(tmp, "b.sock"))
        psrv = await asyncio.start_unix_server(
            lambda r, w: _proxy(r, w, os.path.join(tmp, "b.sock"), limit),
            os.path.join(tmp, "p.sock"))
        lost: list[str] = []
        r, w = await asyncio.open_unix_connection(os.path.join(tmp, "p.sock"))
        sender = ReplicaSender(r, w, cap=1 << 30, on_lost=lost.append)
        acks = asyncio.create_task(sender.run())
        srv = DiskServer(primary, os.path.join(tmp, "a.sock"), sink=sender)
        await srv.start()
        model = bytearray(b"\x5a" * SIZE)
        committed_model = bytes(model)
        committed = -1
        c = await Client.connect(srv.socket_path)
        for epoch in range(12):
            for _ in range(rnd.randrange(0, 12)):
                n = rnd.choice([512, 4096, 65536, rnd.randrange(1, 20_000)])
                off = rnd.randrange(0, SIZE - n)
                data = rnd.randbytes(n)
                assert await c.write(off, data, fua=rnd.random() < 0.1) == 0
                model[off:off + n] = data
                if rnd.random() < 0.2:
                    assert await c.flush() == 0
            srv.seal(epoch)  # no request in flight: the guest is "suspended"
            for _ in range(200):  # wait (bounded) for the ACK, as the memory side would
                if sender.acked_through >= epoch or sender.lost:
                    break
                await asyncio.sleep(0.01)
            if sender.acked_through >= epoch:
                store.commit(epoch)  # memory checkpoint and disk seal both in
                committed = epoch
                committed_model = bytes(model)
        await c.disc()
        await srv.close()
        sender.release("test over")
        await acks
        for _ in range(500):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended, "the backup never saw the stream end"
        psrv.close()
        bsrv.close()
        store.failover(committed)
        store.close()
        assert Path(primary).read_bytes() == bytes(model)
        assert Path(backup).read_bytes() == committed_model, (
            f"seed {seed}: limit {limit}, committed {committed}, {ended[0]}")

    run(main)


def test_a_failing_sink_is_dropped_and_guest_io_goes_on(tmp: str) -> None:
    img = make_image(tmp)

    class Broken(RecSink):
        def write(self, epoch: int, offset: int, data: bytes) -> None:
            if offset >= 4096:
                raise DiskError("replica gone")
            super().write(epoch, offset, data)

    async def main() -> None:
        sink = Broken()
        async with serving(img, os.path.join(tmp, "s"), sink=sink) as (srv, c):
            assert await c.write(0, b"a" * 4096) == 0
            assert await c.write(4096, b"b" * 4096) == 0  # the sink fails: still written
            assert srv.sink is None and srv.replication_error == "replica gone"
            assert await c.write(8192, b"c" * 4096) == 0
            srv.seal(0)  # nothing to seal into any more: fine
            assert await c.read(0, 12288) == b"a" * 4096 + b"b" * 4096 + b"c" * 4096
            await c.disc()
        assert [w[2] for w in sink.log] == [0]

    run(main)
