"""`xen-remus handover DOMAIN` (cli/handover.py) against stand-in protect processes that
keep a status file as protect does, and the transport a handover leaves running
(ReceiverProcess.detach). The loop's side of it: tests/unit/test_protect_loop.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xen_remus.cli.handover import handover, running
from xen_remus.errors import XenRemusError
from xen_remus.migrate_hook import main
from xen_remus.save.transport import ReceiverProcess

# A protect stand-in: status file DIR/g1.json (state ARGV[2]); on SIGUSR1 it writes ENDING
# (ARGV[3], or nothing if "-") and exits, or ignores the signal when ENDING is "ignore".
STAND_IN = r"""
import json, os, signal, sys, time
d, state, ending = sys.argv[1:4]
path = os.path.join(d, "g1.json")
def write(state, detail):
    doc = {"format": 1, "domain": "g1", "role": "primary", "pid": os.getpid(),
           "peer": "hostB", "state": state, "detail": detail, "epoch": 41}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)
def asked(signum, frame):
    if ending != "-":
        write(ending, "after epoch 42" if ending == "handed-over" else "backup lost")
    sys.exit(0)
signal.signal(signal.SIGUSR1, signal.SIG_IGN if ending == "ignore" else asked)
write(state, "interval 200 ms")
print("ready", flush=True)
time.sleep(60)
"""


Start = Callable[[str, str], "subprocess.Popen[str]"]


@pytest.fixture
def protects(tmp_path: Path) -> Iterator[Start]:
    procs: list[subprocess.Popen[str]] = []

    def start(state: str, ending: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", STAND_IN, str(tmp_path), state, ending],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_handover_signals_protect_and_waits_for_its_end(
        protects: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = protects("protecting", "handed-over")
    assert main(["handover", "g1", "--wait", "20", "--dir", str(tmp_path)]) == 0
    assert p.wait(10) == 0 and not running(p.pid)
    err = capsys.readouterr().err
    assert "g1 handed over to hostB after epoch 42" in err and "xl destroy g1" in err


@pytest.mark.parametrize("state,ending,match", [
    ("starting", "handed-over", r"protect of g1 \(pid \d+\) is starting \(interval 200 ms\):"
                                r" only a protected domain"),
    ("protecting", "unprotected", r"did not complete: protect \(pid \d+\) ended "
                                  r"unprotected: backup lost"),
    ("protecting", "-", r"did not complete: .* ended protecting"),  # died, said nothing
])
def test_handover_names_what_stood_in_the_way(protects: Start, tmp_path: Path, state: str,
                                              ending: str, match: str) -> None:
    protects(state, ending)
    with pytest.raises(XenRemusError, match=match):
        handover("g1", 20, tmp_path)


def test_handover_is_bounded(protects: Start, tmp_path: Path) -> None:
    p = protects("protecting", "ignore")
    t0 = time.monotonic()
    with pytest.raises(XenRemusError, match=r"still runs 0.5 s after it was asked to hand "
                                            r"over \(protecting: interval 200 ms\)"):
        handover("g1", 0.5, tmp_path)
    assert time.monotonic() - t0 < 5 and p.poll() is None


def test_handover_without_protect(tmp_path: Path) -> None:
    with pytest.raises(XenRemusError, match="no protect of g1 runs on this host"):
        handover("g1", 1, tmp_path)
    (tmp_path / "g1.json").write_text(json.dumps(
        {"format": 1, "domain": "g1", "role": "primary", "pid": 999999999,
         "state": "protecting"}))
    with pytest.raises(XenRemusError, match="no protect of g1 runs on this host"):
        handover("g1", 1, tmp_path)  # a status file left by a protect that died


def test_a_detached_receiver_lives_on_a_closed_one_is_killed(tmp_path: Path) -> None:
    """After a handover the backup waits on (for its promotion, xl resuming the guest):
    protect must not kill its transport (ssh), which carries the backup's stderr."""
    rune = (f"exec sh -c 'cat >/dev/null; sleep 0.5; echo late > {tmp_path}/%s'")
    kept = ReceiverProcess(rune % "detached")
    kept.detach()
    cut = ReceiverProcess(rune % "closed")
    assert cut.close(timeout=0.1) is not None  # the stream ended, then killed in its sleep
    assert kept.proc.wait(10) == 0 and (tmp_path / "detached").read_text() == "late\n"
    assert not (tmp_path / "closed").exists()
