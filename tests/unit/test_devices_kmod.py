"""The modprobe runs of devices/kmod.py (what Modules uses unless a test gives its own):
a fake modprobe on PATH that succeeds, fails, or is not there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xen_remus.devices.kmod import _modprobe, _modprobe_dry


@pytest.fixture
def path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH of one folder, where a test may put its modprobe."""
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def fake_modprobe(d: Path, script: str) -> Path:
    log = d / "argv"
    exe = d / "modprobe"
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\n{script}\n")
    exe.chmod(0o755)
    return log


def test_a_module_that_loads(path: Path) -> None:
    log = fake_modprobe(path, "exit 0")
    assert _modprobe("sch_plug") is None
    assert _modprobe_dry("ifb") is None
    assert log.read_text().splitlines() == ["sch_plug", "-n ifb"]


def test_a_module_that_does_not_load_says_modprobe_s_last_line(path: Path) -> None:
    fake_modprobe(path, "echo 'modprobe: warming up' >&2\n"
                  "echo 'modprobe: FATAL: Module sch_plug not found' >&2\nexit 1")
    assert _modprobe("sch_plug") == "modprobe: FATAL: Module sch_plug not found"
    assert _modprobe_dry("sch_plug") == "modprobe: FATAL: Module sch_plug not found"


def test_a_silent_failure_says_the_exit_status(path: Path) -> None:
    fake_modprobe(path, "exit 3")
    assert _modprobe("ifb") == "modprobe exited 3"
    assert _modprobe_dry("ifb") == "modprobe -n exited 3"


def test_no_modprobe(path: Path) -> None:
    assert not os.listdir(path)
    assert _modprobe("ifb") == "no modprobe to load it"
    assert _modprobe_dry("ifb") == "no modprobe (apt-get install kmod)"
