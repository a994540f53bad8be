"""`xen-remus witness --listen ADDR`: the witness core (core.py) served over TCP or a Unix
socket (asyncio, one thread: requests are decided one at a time, whoever sends them).

A connection may carry many sessions one after another (proto.py): QEMU's chardev that
links a lab host's virtio-serial port to the witness stays connected while dom0's
clients come and go. A frame that is not authentic ends its session (logged), not the
connection; the client starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace

from xen_remus.witness import proto as P
from xen_remus.witness.address import Address
from xen_remus.witness.core import Lease, WitnessCore
from xen_remus.witness.store import WitnessStore, WitnessStoreError

log = logging.getLogger("xen_remus.witness")
READ_SIZE = 4096


class Witness:
    """The core, its store, and the connections to it."""

    def __init__(self, key: bytes, core: WitnessCore, store: WitnessStore,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key, self.core, self.store, self.clock = key, core, store, clock
        self.connections: set[asyncio.Task[None]] = set()
        core.restore(store.load(), clock())
        for guest, lease in core.leases.items():
            log.info("restored %r: %s (its lease counts from now)", guest,
                     lease.record(clock()))

    def decide(self, req: P.Request, peer: str) -> P.Response:
        old = self.core.leases.get(req.guest)
        kept = replace(old) if old is not None else None
        resp, saved = self.core.handle(req, self.clock())
        if saved is not None:
            try:
                self.store.put(req.guest, saved)
            except WitnessStoreError as exc:
                self._undo(req.guest, kept)
                log.error("%s: %s: %s", peer, req, exc)
                return P.Response(P.DENIED, message=f"the witness cannot record it: {exc}")
        level = logging.INFO if req.op != P.RENEW or resp.status != P.GRANTED else \
            logging.DEBUG
        log.log(level, "%s: %s: %s", peer, req, resp)
        return resp

    def _undo(self, guest: str, kept: Lease | None) -> None:
        if kept is None:
            self.core.leases.pop(guest, None)
        else:
            self.core.leases[guest] = kept

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        name = writer.get_extra_info("peername")
        peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "unix client"
        session = P.ServerSession(self.key, peer)
        log.debug("%s connected", peer)
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            while data := await reader.read(READ_SIZE):
                while True:  # after an error, on with the rest of what came
                    try:
                        for req in session.receive(data):
                            session.respond(self.decide(req, peer))
                        break
                    except P.WitnessProtocolError as exc:
                        log.warning("%s", exc)
                        data = b""
                out = session.take_output()
                if out:
                    writer.write(out)
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("%s: %s", peer, exc)
        finally:
            if task is not None:
                self.connections.discard(task)
            log.debug("%s disconnected", peer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def listen(self, addr: Address) -> asyncio.Server:
        if addr.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(addr.unix).st_mode):
                    os.unlink(addr.unix)  # a previous witness's
            server = await asyncio.start_unix_server(self.serve_connection, addr.unix)
            os.chmod(addr.unix, 0o600)
        else:
            server = await asyncio.start_server(self.serve_connection, addr.host, addr.port)
        log.info("listening on %s (%d guests on record, grace %g s)",
                 ", ".join(_sockname(s) for s in server.sockets), len(self.core.leases),
                 self.core.grace_s)
        return server


def _sockname(sock: object) -> str:
    name = getattr(sock, "getsockname", lambda: "?")()
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix:{name}"


async def serve(witness: Witness, addrs: list[Address],
                ready: Callable[[list[asyncio.Server]], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve ``addrs`` until ``stop`` is set (for ever without one)."""
    servers = [await witness.listen(a) for a in addrs]
    if ready is not None:
        ready(servers)
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        for s in servers:
            s.close()
        for s in servers:
            await s.wait_closed()
        conns = list(witness.connections)
        for t in conns:
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
