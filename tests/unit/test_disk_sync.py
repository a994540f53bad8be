"""The initial synchronisation's pieces without sockets: the dirty bitmap on file, the
backup's refusals (naming frame, offset, epoch), and its answers over the channel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xen_remus.channel import wire
from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.sender import DiskBack, SenderChannel
from xen_remus.disk.errors import ReplicaStreamError
from xen_remus.disk.persist import BLOCK, DirtyBitmap
from xen_remus.disk.replica import BEGIN, CHUNK, NEED, SEAL, SUMS, BackupStream, frame_bytes
from xen_remus.disk.store import EpochStore
from xen_remus.disk.sync import Begin, SyncProgress

SIZE = 1 << 20


def test_the_bitmap_is_trusted_only_after_an_ack_and_a_clean_close(tmp_path: Path) -> None:
    img = str(tmp_path / "img")
    bm = DirtyBitmap(img, SIZE)
    assert not bm.trusted and "no dirty bitmap" in bm.why
    bm.mark(0, 10, 1)
    bm.close()
    assert "without a base" in DirtyBitmap(img, SIZE).why
    bm = DirtyBitmap(img, SIZE)
    bm.restart()  # a protection: epochs from 0; blocks marked before stay until ACK(0)
    bm.mark(0, BLOCK, 2 * BLOCK)
    bm.mark(1, 5 * BLOCK - 1, 2)  # straddles two blocks
    bm.mark(2, BLOCK, 1)
    bm.acked(4, 1)
    assert bm.trusted and bm.base == (4, 1)
    assert bm.runs() == [(BLOCK, BLOCK)]  # epoch 2 wrote it again; the rest is ACKed
    unclean = DirtyBitmap(img, SIZE)  # while bm is open: its file says "open"
    assert not unclean.trusted and "not closed cleanly" in unclean.why
    bm.close()
    again = DirtyBitmap(img, SIZE)
    assert again.trusted and again.base == (4, 1) and again.runs() == [(BLOCK, BLOCK)]
    assert "not of this image" in DirtyBitmap(img, 2 * SIZE).why


def test_the_backup_refuses_a_broken_synchronisation(tmp_path: Path) -> None:
    img = tmp_path / "r"
    img.write_bytes(bytes(SIZE))
    begin = frame_bytes(BEGIN, 0, SIZE, Begin(SIZE, 4096, 3).pack())
    with EpochStore(str(img)) as s:
        with pytest.raises(ReplicaStreamError, match=r"SEAL frame refused: the initial "
                           r"synchronisation is not complete \(at stream offset \d+, epoch 0"):
            BackupStream(s).feed(begin + frame_bytes(SEAL, 0, 0))
    with EpochStore(str(img)) as s:
        with pytest.raises(ReplicaStreamError, match=r"CHUNK frame refused: no synchroni"
                           r"sation in progress .*\(at stream offset 0, epoch 0\)"):
            BackupStream(s).feed(frame_bytes(CHUNK, 0, 0, b"x"))
    with EpochStore(str(img)) as s:
        bad = Begin(2 * SIZE, 4096, 3).pack()
        with pytest.raises(ReplicaStreamError, match="image has 2097152 bytes, the replica"):
            BackupStream(s).feed(frame_bytes(BEGIN, 0, 2 * SIZE, bad))
    with EpochStore(str(img)) as s:
        bs = BackupStream(s)
        bs.feed(begin)
        with pytest.raises(ReplicaStreamError, match=r"SUMS frame refused: SUMS of 5 bytes"
                           r" at 0 .*\(at stream offset 80, epoch 0\)"):
            bs.feed(frame_bytes(SUMS, 0, 0, b"12345"))


def test_answers_reach_the_primary_sealed_and_count_as_progress() -> None:
    cfg = Config(disk=True, mac=True)
    rx = ReceiverChannel(cfg, 0.0)
    tx = SenderChannel(cfg, 0.0)
    tx.feed_back(rx.offer_line(), 0.0)
    accept = b"".join(bytes(b) for b in tx.pending(0.0))
    from xen_remus.stream.records import LIBXC, Record
    n = int.from_bytes(accept[4:8], "little")
    rec = Record(layer=LIBXC, rtype=wire.REC_REMUS_ACCEPT, length=n, body=accept[8:8 + n])
    assert rx.on_record(rec) == []
    need = frame_bytes(NEED, 0, 0, b"\x05")
    back = rx.disk_back("xvda", [need] * 200)  # more than one back frame holds
    events = tx.feed_back(back, time.monotonic())
    assert all(isinstance(e, DiskBack) and e.vdev == "xvda" for e in events)
    assert len(events) > 1 and b"".join(e.frames for e in events if isinstance(e, DiskBack)
                                        ) == need * 200
    tampered = bytearray(rx.disk_back("xvda", [need]))
    tampered[-40] ^= 1
    with pytest.raises(Exception, match="REMUS_DISK_BACK"):
        tx.feed_back(bytes(tampered), time.monotonic())
    prog = SyncProgress()
    from xen_remus.disk.replica import FrameDecoder
    prog.forward(FrameDecoder().feed(frame_bytes(BEGIN, 0, SIZE, Begin(SIZE, 4096, 3).pack())))
    prog.back(frame_bytes(5, 0, 0) + need)  # BASE 0 (hashes), then NEED for 8 chunks
    assert prog.mode == "hashes" and (prog.done, prog.total) == (8 * 4096, SIZE)
