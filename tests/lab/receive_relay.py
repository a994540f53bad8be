"""Runs in a lab dom0 as a migration transport: relay a stream into CMD, cutting it at a byte.

  xl remus -F -n -d -s '' DOM 'python3 receive_relay.py --epoch N --into K -- CMD...'

Forwards CMD's stdout (the xl handshake) to ours unchanged and our stdin to CMD until
K bytes past the end of epoch N (stream offsets from the codec), then stops forwarding,
says where it cut on stderr and in --mark FILE, drains its input until the sender is
gone, and only then closes CMD's input: CMD sees the stream end mid-epoch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

from xen_remus.stream import Decoder, EpochEnd


def pump(src: int, dst: int) -> None:
    while data := os.read(src, 65536):
        os.write(dst, data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epoch", type=int, required=True, help="last whole epoch before the cut")
    ap.add_argument("--into", type=int, default=0, help="bytes of the next epoch to pass")
    ap.add_argument("--mark", default=None, help="file to write the cut description to")
    ap.add_argument("--pidfile", default=None, help="file to write CMD's pid to")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{child.pid}\n")
    back = threading.Thread(target=pump, args=(child.stdout.fileno(), 1), daemon=True)
    back.start()
    dec = Decoder()
    ends: list[int] = []
    sent = 0
    cut: int | None = None
    while data := os.read(0, 1 << 20):
        if cut is None or sent < cut:  # the codec tells where epochs end
            ends += [e.offset for e in dec.feed(data) if isinstance(e, EpochEnd)]
            if cut is None and len(ends) > args.epoch:
                cut = ends[args.epoch] + args.into
        limit = len(data) if cut is None else max(0, min(len(data), cut - sent))
        if limit:
            child.stdin.write(data[:limit])
            child.stdin.flush()
        sent += limit
        if cut is not None and sent >= cut and args.mark and not os.path.exists(args.mark):
            whole = max(i for i, e in enumerate(ends) if e <= cut)
            line = f"cut at offset {cut}: last whole epoch {whole}\n"
            sys.stderr.write("relay: " + line)
            sys.stderr.flush()
            with open(args.mark, "w") as f:
                f.write(line)
    sys.stderr.write(f"relay: sender gone after {sent} bytes forwarded\n")
    child.stdin.close()
    rc = child.wait()
    back.join(timeout=5)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
