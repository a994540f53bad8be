"""The replicated disk as protect and the receiver use it, on the host: a real NBD client
(qemu-io) writes to the disk daemon; the epoch loop's SocketControl seals epochs and puts
their frames into REMUS_DISK record bodies; the backup's DiskReplicas holds them per epoch
and applies an epoch only at its commit; a failover drops every later write."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.unit.disk_helpers import ClientThread
from tests.unit.test_devices_netbuf import FakeStore
from xen_remus.channel import wire
from xen_remus.channel.errors import ChannelError
from xen_remus.devices.discover import REPLICA_KEY, domain_disks, unreplicable
from xen_remus.disk import remote
from xen_remus.disk.backup import DiskReplicas, disk_images
from xen_remus.disk.daemon import ReplicatedDiskDaemon
from xen_remus.disk.persist import BLOCK, DirtyBitmap, ReplicaRecord
from xen_remus.disk.remote import SocketControl
from xen_remus.disk.replica import (
    CONTROL,
    DEFAULT_CAP,
    HEADER_SIZE,
    SEAL,
    START,
    Frame,
    FrameDecoder,
    frame_bytes,
)
from xen_remus.disk.sync import SyncProgress

SIZE = 4 << 20


class Daemon:
    """The disk daemon in its own loop thread, as block-remus runs it in dom0."""

    def __init__(self, image: str, d: str, cap: int = DEFAULT_CAP) -> None:
        self.nbd, self.replica = os.path.join(d, "nbd"), os.path.join(d, "replica")
        self.loop = asyncio.new_event_loop()
        self.daemon = ReplicatedDiskDaemon(image, self.nbd, self.replica, cap)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def qemu_io(sock: str, cmd: str) -> None:
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.fail("qemu-io is not installed: apt-get install -y qemu-utils")
    out = subprocess.run([exe, "-f", "raw", "-c", cmd, f"nbd:unix:{sock}"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def image(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Relay:
    """What protect and the receiver do with one disk's frames: during the initial
    synchronisation each record reaches the backup as it comes and its answers come back
    (``relay``); afterwards each sealed epoch's records wait for ``deliver``."""

    def __init__(self, replicas: DiskReplicas) -> None:
        self.replicas = replicas
        self.live = True
        self.back: list[bytes] = []
        self.records: list[list[bytes]] = []  # the bodies of each sealed epoch
        self._open: list[bytes] = []  # those of the epoch not yet sealed

    def into_checkpoint(self, vdev: str, frames: bytes, ends: list[int]) -> None:
        bodies = [b"".join(bytes(p) for p in body)
                  for body in wire.disk_bodies(vdev, frames, ends)]
        if not self.live:
            self._open += bodies
            if FrameDecoder().feed(frames)[-1].kind == SEAL:  # handed on through it
                self.records.append(self._open)
                self._open = []
            return
        for body in bodies:
            vdev, view = wire.parse_disk(body, "REMUS_DISK (pre-copy)")
            self.back += self.replicas.feed(vdev, view, "pre-copy")

    def relay(self) -> list[bytes]:
        out, self.back = self.back, []
        return out

    def sync(self, ctl: SocketControl) -> SyncProgress:
        seen: list[tuple[int, int]] = []
        prog = ctl.sync(self.relay, lambda: None, lambda p: seen.append((p.done, p.total)))
        assert seen and all(d <= t for d, t in seen)
        self.live = False
        return prog

    def deliver(self, epoch: int) -> None:  # what the receiver does with checkpoint `epoch`
        for body in self.records[epoch]:
            vdev, frames = wire.parse_disk(body, f"REMUS_DISK (epoch {epoch})")
            assert self.replicas.feed(vdev, frames, f"epoch {epoch}") == []


def test_epochs_reach_the_backup_whole_and_only_at_commit(tmp: str) -> None:
    primary = image(os.path.join(tmp, "a.img"), os.urandom(SIZE))
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    d = Daemon(primary, tmp)
    replicas = DiskReplicas({"xvda": backup}.get)
    r = Relay(replicas)
    ctl = SocketControl("xvda", d.replica, r.into_checkpoint, generation=7)
    try:
        ctl.connect()
        qemu_io(d.nbd, "write -P 0x11 0 64k")
        prog = r.sync(ctl)  # every chunk differs: all of them sent, in pre-copy
        assert (prog.mode, prog.sent, prog.done, prog.total) == ("hashes", SIZE, SIZE, SIZE)
        assert read(backup) == read(primary)
        qemu_io(d.nbd, "write -P 0x44 3M 4k")
        ctl.seal(0)  # the write since the synchronisation
        r.deliver(0)
        assert read(backup)[3 << 20:(3 << 20) + 4096] != b"\x44" * 4096, "before its commit"
        replicas.commit(0)
        ctl.commit(0)
        at0 = read(primary)
        assert read(backup) == at0
        qemu_io(d.nbd, "write -P 0x22 1M 128k")
        ctl.seal(1)
        qemu_io(d.nbd, "write -P 0x33 2M 4k")
        ctl.seal(2)
        r.deliver(1)
        r.deliver(2)
        replicas.commit(1)
        at1 = bytearray(at0)
        at1[1 << 20:(1 << 20) + (128 << 10)] = b"\x22" * (128 << 10)
        assert read(backup) == bytes(at1)
        replicas.failover(1)  # epoch 2 sealed, never committed: dropped
        assert read(backup) == bytes(at1)
        assert read(primary)[2 << 20:(2 << 20) + 4096] == b"\x33" * 4096
    finally:
        ctl.disconnect()
        replicas.close()
        d.close()


def test_a_matching_replica_is_skipped_and_a_lost_backup_resyncs_its_dirty_blocks(
        tmp: str) -> None:
    data = os.urandom(SIZE)
    primary = image(os.path.join(tmp, "a.img"), data)
    backup = image(os.path.join(tmp, "b.img"), data[:SIZE // 2] + bytes(SIZE // 2))
    d = Daemon(primary, tmp)

    def protect(generation: int, lose_after: int) -> SyncProgress:
        """One protection: synchronise, epochs 0..lose_after committed, then a write in an
        epoch never ACKed and the backup lost (the receiver gone, nothing failed over)."""
        replicas = DiskReplicas({"xvda": backup}.get)
        r = Relay(replicas)
        ctl = SocketControl("xvda", d.replica, r.into_checkpoint, generation)
        try:
            ctl.connect()
            prog = r.sync(ctl)
            for e in range(lose_after + 1):
                qemu_io(d.nbd, f"write -P {0x50 + e} {e * 256}k 4k")
                ctl.seal(e)
                r.deliver(e)
                replicas.commit(e)
                ctl.commit(e)
            # The backup never gets this epoch.
            qemu_io(d.nbd, f"write -P {0x60 + generation} 3M 64k")
            assert read(backup) != read(primary)
        finally:
            ctl.disconnect()
            replicas.close()
        return prog

    try:
        first = protect(7, 1)
        assert (first.mode, first.sent) == ("hashes", SIZE // 2)  # the equal half skipped
        # A short outage: the written blocks since the last ACK only, by the bitmap.
        qemu_io(d.nbd, "write -P 0x77 0 4k")  # while unprotected
        again = protect(8, 0)
        assert again.mode == "dirty blocks" and again.sent == 2 * BLOCK, again.sent
        # After a failover the replica is the backup's own disk: hashes again.
        ReplicaRecord(backup).write(8, "local", SIZE, 0)
        third = protect(9, 0)
        assert third.mode == "hashes" and third.sent == 1 << 20  # the chunk at 3M
    finally:
        d.close()
    # The daemon's bitmap survives a clean restart, relative to its last ACK.
    bm = DirtyBitmap(primary, SIZE)
    assert bm.trusted and bm.base == (9, 0) and bm.runs() == [(3 << 20, 64 << 10)]
    bm.close()


def test_at_its_cap_the_daemon_holds_guest_writes_until_the_backup_acks(
        tmp: str, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's backlog bound (`disk serve --max-unacked`): once the writes the
    backup has not ACKed reach it, the next write waits, and goes on at the ACK."""
    primary = image(os.path.join(tmp, "a.img"), bytes(SIZE))
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    cap = 2 * (HEADER_SIZE + 32768)
    d = Daemon(primary, tmp, cap=cap)
    replicas = DiskReplicas({"xvda": backup}.get)
    r = Relay(replicas)
    ctl = SocketControl("xvda", d.replica, r.into_checkpoint, generation=3)
    client = ClientThread(d.nbd)
    try:
        ctl.connect()
        r.sync(ctl)
        ctl.seal(0)
        r.deliver(0)
        replicas.commit(0)
        ctl.commit(0)
        third = threading.Thread(target=client.do, args=(("w", 65536, 32768, 0x43),))
        with caplog.at_level(logging.INFO, logger="xen_remus.disk.server"):
            for i in range(2):  # up to the cap: answered at once
                client.do(("w", i * 32768, 32768, 0x41 + i))
            third.start()
            third.join(0.5)
            assert third.is_alive(), "a write past the cap was taken"
            ctl.seal(1)  # the guest suspended: the two writes are epoch 1's
            r.deliver(1)
            replicas.commit(1)
            ctl.commit(1)  # the backup's ACK: room again
            third.join(10)
        assert not third.is_alive(), "the write past the cap never went on after the ACK"
        assert "replication backlog at its cap" in caplog.text
        ctl.seal(2)
        r.deliver(2)
        replicas.commit(2)
        assert read(backup) == read(primary)
    finally:
        client.close()
        ctl.disconnect()
        replicas.close()
        d.close()


def test_the_seal_is_answered_ahead_of_a_backlog_and_splits_the_epochs_there(
        tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """protect's pause: the server answers the seal on the control connection at once,
    though the stream's SEAL(1) waits behind megabytes of writes not yet read (the
    reader holds at most QUEUE_MAX). A write after the answer is epoch 2's: carried
    later, the stream through SEAL(1) holds the writes before the answer, and only them."""
    monkeypatch.setattr(remote, "QUEUE_MAX", 256 << 10)  # the backlog stays with the server
    primary = image(os.path.join(tmp, "a.img"), bytes(SIZE))
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    d = Daemon(primary, tmp)
    replicas = DiskReplicas({"xvda": backup}.get)
    r = Relay(replicas)
    carries: list[Callable[[], None]] = []
    ctl = SocketControl("xvda", d.replica, r.into_checkpoint, 4, defer=carries.append)
    client = ClientThread(d.nbd)
    try:
        ctl.connect()
        r.sync(ctl)
        ctl.seal(0)
        carries.pop()()
        r.deliver(0)
        replicas.commit(0)
        ctl.commit(0)
        for i in range(64):  # 8 MiB: far more than the reader and the socket hold
            client.do(("w", (i % 32) * 131072, 131072, i + 1))
        at1 = read(primary)
        t0 = time.monotonic()
        ctl.seal(1)
        assert time.monotonic() - t0 < 2.0
        assert len(r.records) == 1 and ctl.carried == 0, "the pause read the stream"
        client.do(("w", 0, 4096, 0xEE))  # the guest runs again: epoch 2
        carries.pop()()
        r.deliver(1)
        replicas.commit(1)
        assert read(backup) == at1
    finally:
        client.close()
        ctl.disconnect()
        replicas.close()
        d.close()


def test_seals_asked_in_the_stream_as_an_older_protect_does(tmp: str) -> None:
    primary = image(os.path.join(tmp, "a.img"), bytes(SIZE))
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    d = Daemon(primary, tmp)
    replicas = DiskReplicas({"xvda": backup}.get)
    r = Relay(replicas)
    ctl = SocketControl("xvda", d.replica, r.into_checkpoint, generation=2)
    try:
        ctl.connect()
        ctl.disconnect_control()  # what an older protect never opened
        r.sync(ctl)
        qemu_io(d.nbd, "write -P 0x21 0 64k")
        ctl.seal(0)
        qemu_io(d.nbd, "write -P 0x22 64k 4k")
        r.deliver(0)
        replicas.commit(0)
        at0 = bytearray(SIZE)
        at0[:65536] = b"\x21" * 65536
        assert read(backup) == bytes(at0)
    finally:
        ctl.disconnect()
        replicas.close()
        d.close()


def test_a_third_connection_or_a_stranger_control_is_refused(tmp: str) -> None:
    """While a protection runs, a connection opening with anything but CONTROL and its
    generation is closed, and the protection goes on."""
    primary = image(os.path.join(tmp, "a.img"), bytes(SIZE))
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    d = Daemon(primary, tmp)
    replicas = DiskReplicas({"xvda": backup}.get)
    r = Relay(replicas)
    ctl = SocketControl("xvda", d.replica, r.into_checkpoint, generation=9)
    try:
        ctl.connect()
        r.sync(ctl)
        for first in (frame_bytes(START, 0, 9), frame_bytes(CONTROL, 0, 8)):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(d.replica)
                s.sendall(first)
                assert s.recv(64) == b"", "not refused"
        ctl.seal(0)
        r.deliver(0)
        replicas.commit(0)
        assert read(backup) == read(primary)
    finally:
        ctl.disconnect()
        replicas.close()
        d.close()


def test_no_guest_write_reaches_the_stream_before_the_synchronisation_begins(
        tmp: str) -> None:
    """A write between the epoch loop's connect and its START is the image's (the
    synchronisation reads it there), never a W ahead of BEGIN: the backup, not yet
    synchronising, would hold it as an epoch's write and refuse the CHUNKs after it."""
    primary = image(os.path.join(tmp, "a.img"), bytes(SIZE))
    d = Daemon(primary, tmp)
    client = ClientThread(d.nbd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(d.replica)
        sock.settimeout(10)
        time.sleep(0.1)  # the daemon took the connection
        client.do(("w", 0, 4096, 0x5A))  # answered: past the daemon's hand-off to a sink
        sock.sendall(frame_bytes(START, 0, 7))
        dec, frames = FrameDecoder(), list[Frame]()
        while not frames:
            data = sock.recv(1 << 16)
            assert data, "the daemon closed the replication socket"
            frames = dec.feed(data)
        assert frames[0].name == "BEGIN", [f.name for f in frames]
    finally:
        sock.close()
        client.close()
        d.close()


def test_a_bad_record_breaks_the_epoch_naming_the_disk(tmp: str) -> None:
    backup = image(os.path.join(tmp, "b.img"), bytes(SIZE))
    replicas = DiskReplicas({"xvda": backup}.get)
    with pytest.raises(ChannelError, match="epoch 3: disk xvda: .*magic"):
        replicas.feed("xvda", memoryview(b"garbage!" * 8), "epoch 3")
    with pytest.raises(ChannelError, match="disk xvdb is not in the guest's configuration"):
        replicas.feed("xvdb", memoryview(b""), "epoch 3")
    replicas.close()


def test_disks_of_a_domain_and_which_can_be_replicated() -> None:
    fe, be = "/local/domain/7/device/vbd", "/local/domain/0/backend/vbd/7"
    xs = FakeStore({f"{fe}/51712/backend": f"{be}/51712", f"{be}/51712/dev": "xvda",
                    f"{be}/51712/params": "/srv/g.img", f"{be}/51712/script":
                    "/etc/xen/scripts/block-remus", f"{be}/51712/{REPLICA_KEY}": "/run/r.sock",
                    f"{fe}/51728/backend": f"{be}/51728", f"{be}/51728/dev": "xvdb",
                    f"{be}/51728/params": "/dev/vg/data"})
    disks = domain_disks(xs, 7)
    assert [(d.vdev, d.replicable) for d in disks] == [("xvda", True), ("xvdb", False)]
    assert unreplicable(disks[:1]) is None
    why = str(unreplicable(disks))
    assert "xvdb (/dev/vg/data, script none)" in why and "-d -F" in why


def test_disk_images_from_the_guest_config() -> None:
    cfg = {"disks": [{"vdev": "xvda", "pdev_path": "/srv/g.img"}, {"vdev": "xvdb"}, 7]}
    assert disk_images(cfg) == {"xvda": "/srv/g.img"}
    assert disk_images(None) == {}


def test_disk_bodies_are_cut_at_frame_ends() -> None:
    frames = bytes(10 << 20)
    ends = [3 << 20, 6 << 20, 9 << 20, 10 << 20]
    bodies = wire.disk_bodies("xvda", frames, ends)
    sizes = [sum(len(p) for p in b) - wire.DISK_NAME_SIZE for b in bodies]
    assert sizes == [6 << 20, 4 << 20] and sum(sizes) == len(frames)
    with pytest.raises(ValueError, match="disk name"):
        wire.disk_bodies("x" * 16, b"", [])
