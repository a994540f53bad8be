"""The supervisor pauses an armed guest when protect's end of the pipe closes, however
protect ended (SIGKILL included), and does nothing once disarmed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xen_remus.supervisor import Supervisor, watch

ROOT = Path(__file__).resolve().parents[2]


def fake_xl(tmp: Path) -> Path:
    """An `xl` that records its arguments."""
    xl = tmp / "xl"
    xl.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'xl.log'}\n")
    xl.chmod(0o755)
    return xl


def calls(tmp: Path, wait: float = 10.0) -> list[str]:
    log = tmp / "xl.log"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not log.exists():
        time.sleep(0.05)
    return log.read_text().splitlines() if log.exists() else []


def status_file(tmp: Path) -> Path:
    path = tmp / "g1.json"
    path.write_text(json.dumps({"domain": "g1", "state": "protecting", "pid": 1}))
    return path


def test_armed_then_pipe_closed_pauses_and_marks_the_status(tmp_path: Path) -> None:
    tmp = tmp_path
    xl, st = fake_xl(tmp), status_file(tmp)
    sup = Supervisor.start(st, str(xl))
    sup.arm(7)
    sup.close(timeout=20)
    assert sup.proc.returncode == 0
    assert calls(tmp) == ["pause 7"]
    doc = json.loads(st.read_text())
    assert doc["state"] == "halted" and "paused domain 7" in doc["detail"]


def test_disarmed_or_never_armed_does_nothing(tmp_path: Path) -> None:
    tmp = tmp_path
    xl = fake_xl(tmp)
    for arm in (True, False):
        sup = Supervisor.start(status_file(tmp), str(xl))
        if arm:
            sup.arm(7)
            sup.disarm()
        sup.close(timeout=20)
        assert sup.proc.returncode == 0
    assert calls(tmp, wait=0.5) == []


def test_sigkill_of_protect_pauses_the_guest(tmp_path: Path) -> None:
    tmp = tmp_path
    """A stand-in for protect starts its supervisor, arms it and is SIGKILLed."""
    xl = fake_xl(tmp)
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from xen_remus.supervisor import Supervisor
        sup = Supervisor.start(Path({str(tmp / 'none.json')!r}), {str(xl)!r})
        sup.arm(12)
        print(sup.proc.pid, flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    sup_pid = int(proc.stdout.readline())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert calls(tmp) == ["pause 12"]
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # it exits by itself (reparented, reaped by init)
        try:
            os.kill(sup_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)


def test_a_failing_pause_is_said() -> None:
    import io

    lines = io.BytesIO(b"arm 3\n")
    assert watch(lines, ["false"], None) is None
    lines = io.BytesIO(b"arm 3\ndisarm\narm 4\n")
    assert watch(lines, ["true"], None) == 4


def test_after_the_pause_the_held_output_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once paused, the dead protect's network buffers are removed (their output dropped,
    never released); a failure there is said, not raised."""
    import io

    from xen_remus.devices import netbuf

    done: list[str] = []

    def recover(what: str) -> list[str]:
        done.append(what)
        return ["vif3.0"]

    monkeypatch.setattr(netbuf, "recover", lambda: recover("recover"))
    assert watch(io.BytesIO(b"arm 3\n"), ["true"], None) == 3
    assert done == ["recover"]

    def broken() -> list[str]:
        raise OSError("no netlink")

    monkeypatch.setattr(netbuf, "recover", broken)
    assert watch(io.BytesIO(b"arm 3\n"), ["true"], None) == 3
    monkeypatch.setattr(netbuf, "recover", lambda: recover("again"))
    assert watch(io.BytesIO(b"arm 3\n"), ["false"], None) is None
    assert done == ["recover"]  # not paused: the buffers stay (they hold its output)


@pytest.fixture(autouse=True)
def _run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path / "run"))
