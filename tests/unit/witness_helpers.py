"""A real witness server in a thread, for the witness tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from xen_remus.witness.address import Address
from xen_remus.witness.core import WitnessCore
from xen_remus.witness.server import Witness, serve
from xen_remus.witness.store import WitnessStore

KEY = b"k" * 32


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WitnessThread:
    """``Witness`` serving ``addrs`` (and socketpairs via ``pair()``) until ``stop()``."""

    def __init__(self, state: Path, addrs: list[Address], grace_s: float = 0.5,
                 key: bytes = KEY, clock: Callable[[], float] | None = None) -> None:
        kw = {"clock": clock} if clock is not None else {}
        self.witness = Witness(key, WitnessCore(grace_s), WitnessStore(state), **kw)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.bound: list[str] = []
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def main() -> None:
                self._stop = asyncio.Event()

                def up(servers: list[asyncio.Server]) -> None:
                    for s in servers:
                        for sock in s.sockets:
                            name = sock.getsockname()
                            self.bound.append(f"127.0.0.1:{name[1]}" if isinstance(
                                name, tuple) else f"unix:{name}")
                    ready.set()

                await serve(self.witness, addrs, up, self._stop)

            self.loop.run_until_complete(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the witness did not start"

    def pair(self) -> socket.socket:
        """One end of a socketpair whose other end the witness serves."""
        ours, theirs = socket.socketpair()

        async def attach() -> None:
            r, w = await asyncio.open_unix_connection(sock=theirs)
            asyncio.ensure_future(self.witness.serve_connection(r, w))

        asyncio.run_coroutine_threadsafe(attach(), self.loop).result(10)
        return ours

    def stop(self) -> None:
        stop = self._stop
        if stop is not None:
            self.loop.call_soon_threadsafe(stop.set)
        self.thread.join(10)
