"""A witness's address: `unix:/path` (a Unix socket) or `HOST:PORT` (TCP; `[v6]:PORT`)."""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.errors import UsageError


@dataclass(frozen=True)
class Address:
    unix: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse(text: str, option: str) -> Address:
    """``text`` as an Address; UsageError naming ``option`` if it is none."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise UsageError(f"{option} {text}: no socket path after unix:")
        return Address(unix=text[5:])
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} {text}: expected HOST:PORT or unix:/path")
    return Address(host=host, port=int(port))
