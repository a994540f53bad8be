"""DeviceSet: commit order (disks before nets), reverse teardown, exception safety."""

from __future__ import annotations

import pytest

from tests.fakes import RecordingDevice
from xen_remus.devices.base import DeviceError, DeviceSet
from xen_remus.errors import XenRemusError


def test_epoch_order_disks_before_nets() -> None:
    log: list[str] = []
    devs = [RecordingDevice(log, "net0", 10), RecordingDevice(log, "disk0", 0),
            RecordingDevice(log, "net1", 10)]
    with DeviceSet(devs) as ds:
        ds.postsuspend(3)
        ds.preresume()
        ds.commit(3)
    assert log == ["setup disk0", "setup net0", "setup net1",
                   "postsuspend(3) disk0", "postsuspend(3) net0", "postsuspend(3) net1",
                   "preresume disk0", "preresume net0", "preresume net1",
                   "commit(3) disk0", "commit(3) net0", "commit(3) net1",
                   "teardown net1", "teardown net0", "teardown disk0"]


def test_failed_setup_tears_down_what_was_set_up() -> None:
    log: list[str] = []
    devs = [RecordingDevice(log, "disk0", 0), RecordingDevice(log, "net0", 10, fail="setup"),
            RecordingDevice(log, "net1", 10)]
    with pytest.raises(DeviceError, match="net0: setup broke"):
        with DeviceSet(devs):
            pytest.fail("body must not run")
    # net0 may have half set itself up: it is torn down too; net1 never started.
    assert log == ["setup disk0", "setup net0", "teardown net0", "teardown disk0"]


def test_teardown_goes_on_past_failures() -> None:
    log: list[str] = []
    ds = DeviceSet([RecordingDevice(log, "a", 0, fail="teardown"),
                    RecordingDevice(log, "b", 10, fail="teardown"),
                    RecordingDevice(log, "c", 20)])
    ds.setup()
    with pytest.raises(DeviceError, match=r"teardown failed on 2 device\(s\): b: .*; a: "):
        ds.teardown()
    assert log[-3:] == ["teardown c", "teardown b", "teardown a"]
    ds.teardown()  # nothing left to tear down
    assert log[-1] == "teardown a"


def test_error_in_body_still_tears_down_and_keeps_the_error() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="epoch loop died"):
        with DeviceSet([RecordingDevice(log, "n", 10, fail="teardown")]):
            raise RuntimeError("epoch loop died")
    assert log == ["setup n", "teardown n"]


def test_release_all_reaches_every_device() -> None:
    log: list[str] = []
    ds = DeviceSet([RecordingDevice(log, "a", 0, fail="release_all"),
                    RecordingDevice(log, "b", 10)])
    with pytest.raises(XenRemusError, match="a: release_all broke"):
        ds.release_all()
    assert log == ["release_all a", "release_all b"]


def test_commit_stops_at_the_first_failure() -> None:
    # A disk that cannot commit must not let the network release the epoch's output.
    log: list[str] = []
    ds = DeviceSet([RecordingDevice(log, "net", 10),
                    RecordingDevice(log, "disk", 0, fail="commit")])
    with pytest.raises(DeviceError):
        ds.commit(1)
    assert log == ["commit(1) disk"]
