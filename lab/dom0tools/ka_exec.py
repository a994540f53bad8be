"""Runs in a lab dom0: accept one TCP connection, turn on keepalive, exec a command on it.

Stock `xl migrate-receive -r` only fails over when its socket errors out, and a killed
primary never closes the connection; keepalive on the receiver's own socket makes the read
fail within seconds (LAB-NOTES 20). The socket becomes the command's stdin and stdout.
usage: python3 ka_exec.py PORT CMD [ARG...]
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    port, cmd = int(argv[0]), argv[1:]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print(f"ka_exec: listening on {port}", file=sys.stderr, flush=True)
    conn, peer = srv.accept()
    srv.close()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    print(f"ka_exec: connection from {peer[0]}:{peer[1]}, exec {' '.join(cmd)}",
          file=sys.stderr, flush=True)
    os.dup2(conn.fileno(), 0)
    os.dup2(conn.fileno(), 1)
    conn.close()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
