"""Runs in a lab dom0 as a migration transport: relay a stream into CMD, cutting it at a byte.

  xl remus -F -n -d -s '' DOM 'python3 receive_relay.py --epoch N --into K -- CMD...'

Forwards CMD's stdout (the xl handshake) to ours unchanged and our stdin to CMD until
K bytes past the end of epoch N (stream offsets from the codec), then stops — like a
link gone dead: it reads no more, so the sender blocks — and says where it cut on stderr
and in --mark FILE. Once --release FILE exists (the test has removed the primary) it
closes CMD's input: CMD sees the stream end mid-epoch, and the sender a broken pipe.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import EpochEnd


def pump(src: int, dst: int) -> None:
    while data := os.read(src, 65536):
        os.write(dst, data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epoch", type=int, required=True, help="last whole epoch before the cut")
    ap.add_argument("--into", type=int, default=0, help="bytes of the next epoch to pass")
    ap.add_argument("--mark", default=None, help="file to write the cut description to")
    ap.add_argument("--pidfile", default=None, help="file to write CMD's pid to")
    ap.add_argument("--release", default=None, help="after the cut, wait for this file")
    ap.add_argument("--hold-max", type=float, default=600.0, help="bound on that wait, s")
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
    while cut is None or sent < cut:
        data = os.read(0, min(1 << 20, cut - sent) if cut is not None else 1 << 20)
        if not data:
            break
        ends += [e.offset for e in dec.feed(data) if isinstance(e, EpochEnd)]
        if cut is None and len(ends) > args.epoch:
            cut = ends[args.epoch] + args.into
        limit = len(data) if cut is None else max(0, min(len(data), cut - sent))
        child.stdin.write(data[:limit])
        child.stdin.flush()
        sent += limit
    if cut is not None and sent >= cut:
        whole = max(i for i, e in enumerate(ends) if e <= cut)
        line = f"cut at offset {cut}: last whole epoch {whole}\n"
        sys.stderr.write("relay: " + line)
        sys.stderr.flush()
        if args.mark:
            with open(args.mark, "w") as f:
                f.write(line)
        deadline = time.monotonic() + args.hold_max
        while args.release and not os.path.exists(args.release):
            if time.monotonic() > deadline:
                sys.stderr.write("relay: no release file, closing anyway\n")
                break
            time.sleep(0.2)
    else:
        sys.stderr.write(f"relay: sender gone after {sent} bytes forwarded\n")
    child.stdin.close()
    rc = child.wait()
    back.join(timeout=5)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
