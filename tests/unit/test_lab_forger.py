"""The lab's ACK forger (lab/dom0tools/ack_forger.py), its frame-boundary logic on this
host: whatever the chunking of the back channel, it hands on only whole pieces (the
banner, the offer line, whole frames) and names offsets as the primary counts them; the
ACK it forges between two frames is refused by a real SenderChannel, by name, at that
offset, and commits nothing."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.dom0tools.ack_forger import BackTap, Forged
from tests.unit.test_remus_channel import Pair, std_stream
from xen_remus.channel import mac, wire
from xen_remus.channel.ends import Config
from xen_remus.channel.mac import MacError
from xen_remus.channel.sender import Acked
from xen_remus.xlproto import BANNER

MAC = Config(mac=True, generation=3)
ROOT = Path(__file__).resolve().parents[2]
FORGER = ROOT / "lab" / "dom0tools" / "ack_forger.py"


def back_channel() -> tuple[bytes, int, list[int]]:
    """A real back channel (banner, offer, sealed ACKs and heartbeats); the length of
    the offer line; the offsets (after the banner) where its frames end."""
    p = Pair(MAC, MAC)
    p.send_stream(std_stream(5))
    assert p.rcv is not None
    line = len(p.rcv.offer_line())
    ends = [fr.offset + 8 + ((len(fr.body) + 7) & ~7)
            for fr in wire.FrameDecoder("back", line).feed(bytes(p.back)[line:])]
    return BANNER + bytes(p.back), line, ends


BACK, LINE, ENDS = back_channel()


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    at = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[i:j] for i, j in zip(at, at[1:], strict=False)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(BACK)), max_size=40))
def test_only_whole_pieces_are_handed_on(cuts: list[int]) -> None:
    tap = BackTap()
    out = b""
    for chunk in pieces(BACK, cuts):
        out += tap.feed(chunk)
        if tap.in_frames:  # past the offer: the output ends where a frame ends
            assert len(out) - len(BANNER) in [LINE, *ENDS]
            assert tap.offset == len(out) - len(BANNER)
    assert out == BACK
    assert tap.acks == [0, 1, 2, 3] and tap.sealed
    assert tap.seq == len(ENDS)  # every frame of the backup numbered, 1, 2, ...


def test_nothing_is_forged_before_a_boundary_and_an_ack() -> None:
    tap = BackTap()
    tap.feed(BACK[:len(BANNER) + LINE - 1])
    with pytest.raises(ValueError, match="no frame boundary yet"):
        tap.forge_ack()
    tap.feed(BACK[len(BANNER) + LINE - 1:len(BANNER) + LINE])
    assert tap.in_frames
    with pytest.raises(ValueError, match="the first ACK is missing"):
        tap.forge_ack()
    with pytest.raises(ValueError, match="not the xl banner at offset 0"):
        BackTap().feed(b"xl migration sender")


class Tapped(Pair):
    """A protection whose back channel passes through the forger, in ``size``-byte
    chunks; it forges once the ACK of epoch 1 has passed."""

    def __init__(self, size: int) -> None:
        super().__init__(MAC, MAC)
        self.size = size
        self.tap = BackTap()
        assert self.tap.feed(BANNER) == BANNER  # Pair.start hands on what follows it
        self.forged: list[Forged] = []

    def to_sender(self, data: bytes) -> None:
        for i in range(0, len(data), self.size):
            super().to_sender(self.tap.feed(data[i:i + self.size]))
            if not self.forged and self.tap.acks and self.tap.acks[-1] >= 1:
                f = self.tap.forge_ack()
                self.forged.append(f)
                super().to_sender(f.frame)


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_the_forged_ack_is_refused_by_name_at_its_offset(size: int) -> None:
    p = Tapped(size)
    with pytest.raises(MacError) as refused:
        p.send_stream(std_stream(6))
    (f,) = p.forged
    assert f.epoch == 2 and f.seq == p.tap.seq + 1  # the next number: only the tag lies
    assert len(f.frame) == 8 + 16 + mac.TRAILER_SIZE
    assert re.fullmatch(
        rf"receiver channel \(after the banner\), REMUS_ACK at offset {f.offset} "
        r"\(epoch 2\): bad MAC: refused .*", str(refused.value))
    assert p.snd is not None and p.snd.acked == 1  # epoch 2 was never committed
    assert [e.epoch for e in p.events if isinstance(e, Acked)] == [0, 1]
    assert p.snd.take_early() == []


def test_the_relay_passes_both_ways_and_forges_once(tmp_path: Path) -> None:
    """The relay as the lab runs it (python3 ack_forger.py, stdin/stdout the primary's
    pipes) against a backup on a local socket: the stream reaches the backup, the back
    channel reaches the primary with one forged frame at the offset it names."""
    srv = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def backup() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(BACK)
            while data := conn.recv(65536):
                got.extend(data)

    th = threading.Thread(target=backup, daemon=True)
    th.start()
    mark = tmp_path / "mark"
    p = subprocess.Popen([sys.executable, str(FORGER), "--after", "0", "--mark", str(mark),
                          "127.0.0.1", str(srv.getsockname()[1])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out, err = p.communicate(b"the stream", timeout=60)
    th.join(10)
    srv.close()
    assert p.returncode == 0, err
    assert bytes(got) == b"the stream"
    m = re.search(rb"forged REMUS_ACK of epoch (\d+) \(sequence number (\d+), a MAC of "
                  rb"zeros\) at offset (\d+) of the receiver channel", err)
    assert m, err
    assert mark.read_bytes().decode() in err.decode()
    epoch, seq, off = (int(g) for g in m.groups())
    at = len(BANNER) + off
    frame = wire.FrameDecoder("out").feed(out[at:at + 8 + 16 + mac.TRAILER_SIZE])
    assert [f.rtype for f in frame] == [wire.REC_REMUS_ACK]
    body = frame[0].body
    assert wire.parse_ack(body[:16], "forged") == (epoch, 0)
    assert body[16:24] == struct.pack("<Q", seq) and body[24:] == bytes(16)
    assert out[:at] + out[at + len(frame[0].body) + 8:] == BACK  # the rest, unchanged
    assert epoch - 1 in (0, 1, 2, 3) and off in [LINE, *ENDS]
