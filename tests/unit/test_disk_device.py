"""The replicated disk as a Device: against a recording control, and against a real server and
backup store through LoopControl (the server in its own loop thread, as in dom0)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fakes import RecordingDevice, RecordingStub
from tests.unit.disk_helpers import Client, Replicated
from xen_remus.channel.link import BackupLost
from xen_remus.devices.base import DeviceError, DeviceSet
from xen_remus.disk.device import ReplicaLost, ReplicatedDisk
from xen_remus.disk.errors import EpochError

SIZE = 256 * 1024


def test_the_epoch_loop_seals_and_commits_the_disk_before_the_network() -> None:
    log: list[str] = []
    net = RecordingDevice(log, "net", 10)
    with DeviceSet([net, ReplicatedDisk(RecordingStub(log, "disk"))]) as ds:
        ds.postsuspend(0)
        ds.preresume()
        ds.idle()
        ds.commit(0)
        ds.postsuspend(1)
        ds.release_all()
    assert log == ["connect disk", "setup net", "seal(0) disk", "postsuspend(0) net",
                   "preresume net", "idle disk", "commit(0) disk", "commit(0) net", "seal(1) disk",
                   "postsuspend(1) net", "release disk", "release_all net", "teardown net",
                   "disconnect disk"]


def test_a_failed_replica_is_a_lost_backup_naming_the_disk_and_the_step() -> None:
    disk = ReplicatedDisk(RecordingStub([], "disk", fail="seal", exc=TimeoutError()))
    with pytest.raises(ReplicaLost, match=r"replication of disk failed \(seal epoch 4\):"
                       r" TimeoutError"):
        disk.postsuspend(4)
    disk = ReplicatedDisk(RecordingStub([], "disk", fail="commit",
                                        exc=RuntimeError("commit(2) broke")))
    with pytest.raises(BackupLost, match=r"disk failed \(commit epoch 2\): commit\(2\) broke"):
        disk.commit(2)
    disk = ReplicatedDisk(RecordingStub([], "disk", fail="idle",
                                        exc=OSError("the server closed it")))
    with pytest.raises(ReplicaLost, match=r"disk failed \(between checkpoints\): the server "
                       "closed it"):
        disk.idle()
    ours = EpochError("seal(3) but epoch 5 is open")
    disk = ReplicatedDisk(RecordingStub([], "disk", fail="seal", exc=ours))
    with pytest.raises(ReplicaLost) as ei:  # ours too: the replica cannot follow
        disk.postsuspend(3)
    assert ei.value.__cause__ is ours and "seal(3) but epoch 5 is open" in str(ei.value)
    disk = ReplicatedDisk(RecordingStub([], "disk", fail="connect", exc=OSError("gone")))
    with pytest.raises(DeviceError, match=r"disk: connect: gone"):  # nothing protected yet
        disk.setup()


def test_loop_control_replicates_seals_and_releases_a_real_server(tmp: str) -> None:
    with Replicated(tmp, SIZE) as rep:
        st = rep.st
        ctl = rep.control(timeout=5)
        disk = ReplicatedDisk(ctl)

        async def write(off: int, data: bytes) -> None:
            c = await Client.connect(st.server.socket_path)
            assert await c.write(off, data) == 0
            await c.disc()

        disk.setup()
        disk.setup()  # idempotent while connected
        st.run(lambda: write(0, b"A" * 4096))
        disk.postsuspend(0)
        assert rep.store.wait_sealed(0, timeout=5)
        disk.commit(0)
        assert rep.store.commit(0) == 1
        st.run(lambda: write(4096, b"B" * 4096))
        disk.postsuspend(1)
        assert rep.store.wait_sealed(1, timeout=5)
        st.run(lambda: write(8192, b"C" * 4096))  # epoch 2: never sealed
        deadline = time.monotonic() + 5
        while ctl.sender is not None and ctl.sender.acked_through < 1:
            assert time.monotonic() < deadline, "ACK(1) never came back"
            time.sleep(0.01)
        disk.release_all()
        st.run(lambda: write(12288, b"D" * 4096))  # unreplicated from here on
        assert st.server.sink is None
        with pytest.raises(ReplicaLost, match="seal\\(0\\) but epoch 2 is open") as ei:
            disk.postsuspend(0)
        assert isinstance(ei.value.__cause__, EpochError)
        disk.teardown()
        disk.teardown()  # twice is fine

        async def from_the_loop() -> None:
            ctl.seal(3)
        with pytest.raises(DeviceError, match="from the server's own loop"):
            st.run(from_the_loop)
    assert rep.store.failover(1) == 1  # epoch 1 commits with the failover; epoch 2 is dropped
    rep.store.close()
    img = Path(rep.backup).read_bytes()
    assert img[:8192] == b"A" * 4096 + b"B" * 4096 and img[8192:] == bytes(SIZE - 8192)
    assert Path(rep.primary).read_bytes()[:16384] == b"A" * 4096 + b"B" * 4096 + b"C" * 4096 \
        + b"D" * 4096
