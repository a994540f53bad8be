"""Runs in a lab dom0 as protect's transport: a relay to the backup that forges one ACK.

  xen-remus protect -s '' DOM 'python3 ack_forger.py --after S [--when FILE] [--ahead N]
                                [--mark FILE] HOST PORT'

Connects to HOST:PORT (the backup's receiver behind ka_exec.py), passes our stdin (the
stream) to it and its answers (the back channel: the xl banner, the xen-remus offer line,
then frames) to our stdout, unchanged. S seconds after the backup's first ACK (the
initial copy committed), and once the file --when names exists if it names one (the
test's signal), it writes one REMUS_ACK of its own between two of the backup's
frames: for the epoch after the last one the backup ACKed (its output still held on
the primary), with the sequence number the primary expects next and a MAC tag of zeros.
Someone who can write into the channel but does not hold the key can forge no better.
It says where on stderr ("ack_forger: forged REMUS_ACK ...", with the offset as the
primary counts it: bytes after the banner) and, with --mark FILE, in FILE, then relays on.

BackTap is the frame-boundary logic (no I/O), unit-tested on the host.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

from xen_remus.channel import mac, wire
from xen_remus.channel.negotiate import OfferReader
from xen_remus.errors import XenRemusError
from xen_remus.stream import consts as C
from xen_remus.xlproto import BANNER

_SEQ = struct.Struct("<Q")


class BackTap:
    """The back channel's bytes as they pass (any chunking): ``feed`` returns what may be
    handed on now, always up to a boundary (the end of the banner, of the offer line or
    of a frame), so ``forged_ack`` can go in between. Keeps the last ACKed epoch and the
    last sequence number of the backup's frames."""

    def __init__(self) -> None:
        self.offset = 0  # after the banner: where the next piece handed on starts
        self.acks: list[int] = []  # epochs ACKed, in order
        self.seq = 0  # of the backup's last sealed frame
        self.sealed = False  # the offer asked for authenticated frames
        self._banner = 0  # bytes of the banner seen
        self._offer = OfferReader()
        self._frames = wire.FrameDecoder("back channel (relay)")
        self._held = bytearray()  # a frame not yet whole

    @property
    def in_frames(self) -> bool:
        """Past the banner and the offer: a frame may be put in here."""
        return self._offer.offer is not None

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if self._banner < len(BANNER):
            n = min(len(BANNER) - self._banner, len(data))
            if data[:n] != BANNER[self._banner:self._banner + n]:
                raise ValueError(f"back channel: not the xl banner at offset {self._banner}")
            self._banner += n
            out += data[:n]
            data = data[n:]
        if data and self._offer.offer is None:
            rest = self._offer.feed(data)
            line = data[:len(data) - len(rest)]
            out += line
            self.offset += len(line)
            data = rest
            if self._offer.offer is not None:
                self.sealed = self._offer.offer.mac is not None
                self._frames.offset = self.offset
        if data:
            self._held += data
            whole = 0
            for fr in self._frames.feed(data):
                whole += 8 + C.pad8(len(fr.body))
                self._saw(fr)
            out += self._held[:whole]
            del self._held[:whole]
            self.offset += whole
        return bytes(out)

    def _saw(self, fr: wire.Frame) -> None:
        body = fr.body
        if self.sealed and len(body) >= mac.TRAILER_SIZE:
            (self.seq,) = _SEQ.unpack_from(body, len(body) - mac.TRAILER_SIZE)
            body = body[:-mac.TRAILER_SIZE]
        if fr.rtype == wire.REC_REMUS_ACK:
            self.acks.append(wire.parse_ack(body, f"relay, offset {fr.offset}")[0])

    def forge_ack(self, ahead: int = 1) -> Forged:
        """An ACK of the epoch ``ahead`` after the last ACKed, numbered as the primary
        expects the next frame, its tag all zeros; to be handed on now, after what
        ``feed`` returned (the offsets that follow count it)."""
        if not self.in_frames or not self.acks:
            raise ValueError("no frame boundary yet: the offer or the first ACK is missing")
        epoch, seq = self.acks[-1] + ahead, self.seq + 1
        body = wire.ack_body(epoch, 0)
        if self.sealed:
            body += _SEQ.pack(seq) + bytes(mac.TAG_SIZE)
        forged = Forged(epoch, seq, self.offset, wire.frame_bytes(wire.REC_REMUS_ACK, body))
        self.offset += len(forged.frame)
        self._frames.offset += len(forged.frame)
        return forged


@dataclass(frozen=True)
class Forged:
    epoch: int
    seq: int
    offset: int  # where it starts on the channel, after the banner
    frame: bytes


def say(line: str, mark: str | None) -> None:
    print(f"ack_forger: {line}", file=sys.stderr, flush=True)
    if mark:
        with open(mark, "a") as f:
            f.write(line + "\n")


def write_all(data: bytes) -> bool:
    """To the primary; False once it is gone."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
    except BrokenPipeError:
        return False
    return True


def forward(src: int, sock: socket.socket) -> None:
    """Our stdin (the stream) to the backup; its end ends our half of the connection."""
    try:
        while data := os.read(src, 1 << 20):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        say(f"forward direction: {exc}", None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--after", type=float, required=True,
                    help="seconds after the backup's first ACK")
    ap.add_argument("--when", default=None, help="and once this file exists")
    ap.add_argument("--ahead", type=int, default=1, help="epochs past the last ACKed")
    ap.add_argument("--mark", default=None, help="file to write what was forged to")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    sock = socket.create_connection((args.host, args.port), timeout=30)
    sock.settimeout(None)
    threading.Thread(target=forward, args=(0, sock), daemon=True).start()
    tap: BackTap | None = BackTap()
    first_ack: float | None = None
    forged = False
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    poll.register(1, 0)  # stdout: POLLERR once the primary closed its end
    while True:
        ready = dict(poll.poll(200))
        if ready.get(1):
            say("the primary closed the channel", None)
            return 0
        if ready.get(sock.fileno()):
            try:
                data = sock.recv(1 << 16)
            except OSError as exc:
                say(f"the connection to the backup failed: {exc}", None)
                return 0
            if not data:
                say("the backup closed the connection", None)
                return 0
            if tap is not None:
                try:
                    data = tap.feed(data)
                except (ValueError, XenRemusError) as exc:  # relayed as it is from now on
                    say(f"{exc}: no frame boundaries, nothing will be forged", None)
                    tap = None
            if not write_all(data):
                return 0
        if tap is not None and first_ack is None and tap.acks:
            first_ack = time.monotonic()
        if (tap is not None and not forged and first_ack is not None
                and time.monotonic() - first_ack >= args.after
                and (args.when is None or os.path.exists(args.when))):
            f = tap.forge_ack(args.ahead)
            if not write_all(f.frame):
                return 0
            forged = True
            say(f"forged REMUS_ACK of epoch {f.epoch} (sequence number {f.seq}, a MAC of "
                f"zeros) at offset {f.offset} of the receiver channel (after the banner), "
                f"after the backup's ACK of epoch {tap.acks[-1]}", args.mark)


if __name__ == "__main__":
    raise SystemExit(main())
