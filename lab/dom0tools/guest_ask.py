"""Runs in a lab dom0: one request to a guest's line service, its answer on stdout.

usage: python3 guest_ask.py IP PORT REQUEST ANSWER_PREFIX SECONDS
Connects (retrying: after a failover the guest's ARP and TCP may lag), sends REQUEST and
prints the first line that starts with ANSWER_PREFIX (exit 0); exit 1 with what it saw if
none came within SECONDS. (busybox nc waits for the server's close, which the guest's
services only do when the client closes.)
"""

from __future__ import annotations

import socket
import sys
import time


def main(argv: list[str]) -> int:
    ip, port, request, prefix, seconds = argv[0], int(argv[1]), argv[2], argv[3], float(argv[4])
    end = time.monotonic() + seconds
    seen = b""
    while time.monotonic() < end:
        try:
            with socket.create_connection((ip, port), timeout=10) as s:
                s.sendall(request.encode() + b"\n")
                s.settimeout(max(1.0, end - time.monotonic()))
                buf = b""
                while True:
                    data = s.recv(4096)
                    if not data:
                        break
                    buf += data
                    for line in buf.decode(errors="replace").splitlines():
                        if line.startswith(prefix):
                            print(line, flush=True)
                            return 0
                seen += buf
        except OSError as exc:
            seen += f"[{exc}]".encode()
            time.sleep(1)
    print(f"no answer starting {prefix!r} to {request!r} from {ip}:{port} within "
          f"{seconds:g} s; got {seen[-500:]!r}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
