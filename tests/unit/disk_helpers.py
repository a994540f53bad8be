"""Helpers for the disk tests: client-side NBD messages, a small asyncio NBD client, a
DiskServer on its own loop thread, and a primary replicating to a backup store."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from xen_remus.disk import nbd
from xen_remus.disk.device import DEFAULT_TIMEOUT, LoopControl
from xen_remus.disk.link import ReplicaSender, serve_backup
from xen_remus.disk.server import DiskServer, WriteSink
from xen_remus.disk.store import DEFAULT_MEMORY_CEILING, EpochStore

T = TypeVar("T")

IO_TIMEOUT = 10.0  # seconds for any one client step
# An NBD operation: ("w" | "fua", offset, length, byte) or ("flush", 0, 0, 0).
Op = tuple[str, int, int, int]


def client_flags(flags: int = nbd.FLAG_C_FIXED_NEWSTYLE) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data


def go_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def request(cmd: int, offset: int = 0, length: int = 0, handle: int = 1, flags: int = 0,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset,
                       length) + data


def write_req(offset: int, data: bytes, handle: int = 1, fua: bool = False) -> bytes:
    return request(nbd.Command.WRITE, offset, len(data), handle,
                   nbd.CMD_FLAG_FUA if fua else 0, data)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, n = struct.unpack_from(">QIII", data, pos)
        assert magic == nbd.OPT_REPLY_MAGIC, f"bad option reply magic at {pos}"
        out.append((opt, rep, data[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


def parse_reply(data: bytes) -> tuple[int, int]:
    """(error, handle) of a simple reply header."""
    magic, err, handle = struct.unpack(">IIQ", data[:16])
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    return err, handle


class Client:
    """An NBD client over a Unix socket: fixed newstyle, OPT_GO, simple replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.size = 0
        self.flags = 0
        self._handle = 0

    @classmethod
    async def connect(cls, path: str, name: str = "") -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                                IO_TIMEOUT)
        c = cls(reader, writer)
        greeting = await c._exact(18)
        magic, opt_magic, _hflags = struct.unpack(">QQH", greeting)
        assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        writer.write(client_flags() + option(nbd.OPT_GO, go_data(name)))
        while True:
            head = await c._exact(20)
            _m, _opt, rep, n = struct.unpack(">QIII", head)
            payload = await c._exact(n)
            if rep == nbd.REP_INFO and struct.unpack_from(">H", payload)[0] == nbd.INFO_EXPORT:
                _t, c.size, c.flags = struct.unpack(">HQH", payload)
            elif rep == nbd.REP_ACK:
                return c
            else:
                raise AssertionError(f"OPT_GO refused: reply 0x{rep:x} {payload!r}")

    async def _exact(self, n: int) -> bytes:
        return await asyncio.wait_for(self.r.readexactly(n), IO_TIMEOUT)

    def send(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"",
             flags: int = 0) -> int:
        self._handle += 1
        self.w.write(request(cmd, offset, length, self._handle, flags, data))
        return self._handle

    async def reply(self, length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data): ``length`` bytes of data follow a successful READ."""
        err, handle = parse_reply(await self._exact(16))
        data = await self._exact(length) if length and not err else b""
        return err, handle, data

    async def read(self, offset: int, length: int) -> bytes:
        h = self.send(nbd.Command.READ, offset, length)
        err, handle, data = await self.reply(length)
        assert (err, handle) == (0, h), f"READ {length}@{offset}: error {err}"
        return data

    async def write(self, offset: int, data: bytes, fua: bool = False) -> int:
        h = self.send(nbd.Command.WRITE, offset, len(data), data,
                      nbd.CMD_FLAG_FUA if fua else 0)
        err, handle, _ = await self.reply()
        assert handle == h
        return err

    async def flush(self) -> int:
        h = self.send(nbd.Command.FLUSH)
        err, handle, _ = await self.reply()
        assert handle == h
        return err

    async def disc(self) -> None:
        self.send(nbd.Command.DISC)
        await self.w.drain()
        self.w.close()
        await self.w.wait_closed()


class ServerThread:
    """A DiskServer in its own asyncio loop on a thread (for blocking clients and tools)."""

    def __init__(self, image: str, sock: str, sink: WriteSink | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = DiskServer(image, sock, sink=sink)
        self.thread = threading.Thread(target=self.loop.run_forever, name="disk-server",
                                       daemon=True)

    def run(self, fn: Callable[[], Awaitable[T]], timeout: float = IO_TIMEOUT) -> T:
        async def go() -> T:
            return await fn()
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.run(self.server.start)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.server.close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(IO_TIMEOUT)
            self.loop.close()


class Replicated:
    """A primary image served by a ServerThread, replicated to a backup image's EpochStore.

    Both images (``primary``, ``backup`` in ``d``) start as ``size`` zero bytes. The backup
    listens on a Unix socket in the server's loop; ``control()`` is the LoopControl that
    connects the server to it. Closing the store (after a failover, say) is the caller's.
    """

    def __init__(self, d: str, size: int,
                 memory_ceiling: int = DEFAULT_MEMORY_CEILING) -> None:
        self.primary, self.backup = os.path.join(d, "a"), os.path.join(d, "b")
        for path in (self.primary, self.backup):
            with open(path, "wb") as f:
                f.truncate(size)
        self.store = EpochStore(self.backup, memory_ceiling=memory_ceiling)
        self.st = ServerThread(self.primary, os.path.join(d, "a.sock"))
        self._backup_sock = os.path.join(d, "b.sock")
        self._backup_server: asyncio.AbstractServer | None = None

    def control(self, timeout: float = DEFAULT_TIMEOUT) -> LoopControl:
        return LoopControl(self.st.server, self.st.loop, self._open_link, timeout=timeout)

    async def _open_link(self, first: int) -> ReplicaSender:
        r, w = await asyncio.open_unix_connection(self._backup_sock)
        return ReplicaSender(r, w, first_epoch=first)

    async def _backup_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await serve_backup(r, w, self.store)

    async def _listen(self) -> None:
        self._backup_server = await asyncio.start_unix_server(self._backup_conn,
                                                              self._backup_sock)

    async def _stop_listening(self) -> None:
        if self._backup_server is not None:
            self._backup_server.close()

    def __enter__(self) -> Replicated:
        self.st.__enter__()
        try:
            self.st.run(self._listen)
        except BaseException:
            self.st.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.st.run(self._stop_listening)
        finally:
            self.st.__exit__()


class ClientThread:
    """An NBD client of the daemon, in its own loop (the guest's blkfront, as it were)."""

    def __init__(self, sock: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.run(lambda: Client.connect(sock))

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def go() -> T:
            return await fn()
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(IO_TIMEOUT)

    def do(self, op: Op) -> None:
        kind, off, n, byte = op
        if kind == "flush":
            err = self.run(self.client.flush)
        else:
            err = self.run(lambda: self.client.write(off, bytes([byte]) * n, fua=kind == "fua"))
        assert err == 0, f"NBD {kind} at {off} ({n} bytes): error {err}"

    def close(self) -> None:
        try:
            self.run(self.client.disc)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(IO_TIMEOUT)
            self.loop.close()
