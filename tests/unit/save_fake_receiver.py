"""A stand-in for `xl migrate-receive` (run by test_save_migrate.py as the -s '' command):
speaks xl's handshake on stdin/stdout and validates the stream with our decoder.

argv[1] is the behaviour: ok, refuse (wrong banner), drop (exits after the stream),
nounpause (reports failure to unpause)."""

from __future__ import annotations

import os
import sys

from xen_remus.stream.decoder import Decoder
from xen_remus.stream.events import StreamEnd
from xen_remus.xlproto import ReceiverSide


def main() -> int:
    mode = sys.argv[1]
    out = sys.stdout.buffer
    if mode == "refuse":
        out.write(b"xl: command not found\n")
        out.flush()
        return 127
    proto = ReceiverSide()
    out.write(proto.banner())
    out.flush()
    dec = Decoder()
    done = False
    while not done:
        chunk = os.read(0, 1 << 16)
        for ev in dec.feed(chunk):
            done = done or isinstance(ev, StreamEnd)
        if not chunk:
            break
    if not done or mode == "drop":
        return 1
    out.write(proto.ready())
    out.flush()
    while not proto.feed(os.read(0, 64)):
        pass
    if mode == "nounpause":
        out.write(proto.report(1) + proto.resume_permission())
    else:
        out.write(proto.report(0))
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
