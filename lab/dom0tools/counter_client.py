"""Runs in a lab dom0: one TCP connection to a guest's counter service, kept open.

usage: python3 counter_client.py IP PORT SECONDS
Sends a line every 0.2 s and prints one JSON line per event, flushed at once (the output
lives on the share, so it survives the kill of the other host):
  {"t": UNIX_TIME, "counter": N, "bootid": B}   a reply (port 7000)
  {"t": UNIX_TIME, "durable": N, "bootid": B}   a reply of the ext4 workload (port 7001)
  {"t": UNIX_TIME, "event": "connected" | "closed" | "error", "detail": ...}
Once connected it never reconnects: the point is whether this one connection survives
a failover.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def say(**kw: object) -> None:
    print(json.dumps({"t": round(time.time(), 3), **kw}), flush=True)


def main(argv: list[str]) -> int:
    ip, port, seconds = argv[0], int(argv[1]), float(argv[2])
    end = time.monotonic() + seconds
    while True:  # output commit holds the SYN-ACK until the initial copy is committed
        try:
            s = socket.create_connection((ip, port), timeout=10)
            break
        except OSError as exc:
            if time.monotonic() > end - 10:
                say(event="error", detail=f"connect: {exc}")
                return 1
            say(event="connect-retry", detail=str(exc))
            time.sleep(1)
    say(event="connected")
    s.settimeout(0.2)
    buf = b""
    next_send = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        try:
            if now >= next_send:
                s.sendall(b"x\n")
                next_send = now + 0.2
            data = s.recv(4096)
        except TimeoutError:
            continue
        except OSError as exc:
            say(event="error", detail=str(exc))
            return 1
        if not data:
            say(event="closed")
            return 1
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            f = dict(kv.split("=", 1) for kv in line.decode(errors="replace").split()
                     if "=" in kv)
            for key in ("counter", "durable"):
                if key in f:
                    say(**{key: int(f[key])}, bootid=f.get("bootid", ""))
    say(event="done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
