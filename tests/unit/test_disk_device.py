"""The replicated disk as a Device: against a fake control, and against a real server and
backup store through LoopControl (the server in its own loop thread, as in dom0)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.unit.disk_helpers import Client, Replicated
from xen_remus.devices.base import Device, DeviceError, DeviceSet
from xen_remus.disk.device import ReplicatedDisk
from xen_remus.disk.errors import EpochError

SIZE = 256 * 1024


class FakeControl:
    def __init__(self, log: list[str], fail: str = "", exc: Exception | None = None) -> None:
        self.log, self.fail, self.exc = log, fail, exc

    @property
    def name(self) -> str:
        return "disk fake"

    def _do(self, op: str) -> None:
        self.log.append(op)
        if op.split("(")[0] == self.fail:
            raise self.exc or RuntimeError(f"{op} broke")

    def connect(self) -> None:
        self._do("connect")

    def seal(self, epoch: int) -> None:
        self._do(f"seal({epoch})")

    def commit(self, epoch: int) -> None:
        self._do(f"commit({epoch})")

    def release(self) -> None:
        self._do("release")

    def disconnect(self) -> None:
        self._do("disconnect")


class FakeNet(Device):
    order = 10

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @property
    def name(self) -> str:
        return "net fake"

    def setup(self) -> None:
        self.log.append("net setup")

    def postsuspend(self, epoch: int) -> None:
        self.log.append(f"net postsuspend({epoch})")

    def commit(self, epoch: int) -> None:
        self.log.append(f"net commit({epoch})")

    def release_all(self) -> None:
        self.log.append("net release")

    def teardown(self) -> None:
        self.log.append("net teardown")


def test_the_epoch_loop_seals_and_commits_the_disk_before_the_network() -> None:
    log: list[str] = []
    with DeviceSet([FakeNet(log), ReplicatedDisk(FakeControl(log))]) as ds:
        ds.postsuspend(0)
        ds.preresume()
        ds.commit(0)
        ds.postsuspend(1)
        ds.release_all()
    assert log == ["connect", "net setup", "seal(0)", "net postsuspend(0)", "commit(0)",
                   "net commit(0)", "seal(1)", "net postsuspend(1)", "release",
                   "net release", "net teardown", "disconnect"]


def test_failures_name_the_disk_and_the_step() -> None:
    disk = ReplicatedDisk(FakeControl([], fail="seal", exc=TimeoutError()))
    with pytest.raises(DeviceError, match=r"disk fake: seal epoch 4: TimeoutError"):
        disk.postsuspend(4)
    disk = ReplicatedDisk(FakeControl([], fail="commit"))
    with pytest.raises(DeviceError, match=r"disk fake: commit epoch 2: commit\(2\) broke"):
        disk.commit(2)
    ours = EpochError("seal(3) but epoch 5 is open")
    disk = ReplicatedDisk(FakeControl([], fail="seal", exc=ours))
    with pytest.raises(EpochError) as ei:  # our own errors pass through as they are
        disk.postsuspend(3)
    assert ei.value is ours


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
        with pytest.raises(EpochError, match="seal\\(0\\) but epoch 2 is open"):
            disk.postsuspend(0)
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
