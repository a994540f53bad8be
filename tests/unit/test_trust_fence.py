"""`migrate-receive -r --fence CMD`: the fence runs first at a failover, the copy is
resumed only if it exits 0, and otherwise stays paused (xl stopped before it saw the end
of the stream) with an error naming the command, its status and the epoch held."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.unit.test_cli_receive import finish, make_stream, read_exact, start
from tests.unit.test_receive import FakeSink, stream
from xen_remus import xlproto as X
from xen_remus.receive.driver import Relay
from xen_remus.receive.fence import Fence


def test_fence_success_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "env"
    cmd = f'echo "$XEN_REMUS_DOMAIN $XEN_REMUS_EPOCH" > {out}'
    assert Fence(cmd).run("guest1", 42) is None
    assert out.read_text() == "guest1 42\n"


@pytest.mark.parametrize("cmd,why", [
    ("exit 3", "exited with status 3"),
    ("kill -9 $$", "was killed by signal 9"),
])
def test_fence_failures_are_described(cmd: str, why: str) -> None:
    assert Fence(cmd).run("g", 1) == why


def test_a_hung_fence_is_killed_at_its_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    why = Fence(f"sh -c 'echo $$ > {pidfile}; exec sleep 60' & wait", 0.5).run("g", 1)
    assert why == "did not finish within 0.5 s (killed)"
    assert time.monotonic() - t0 < 10
    assert not running(int(pidfile.read_text()))  # its whole tree, not the shell alone


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a killed orphan may stay a zombie where init does not reap)."""
    time.sleep(0.1)
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\tZ" not in next(ln for ln in f if ln.startswith("State:"))
    except FileNotFoundError:
        return False


class HoldingSink(FakeSink):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def failover(self, epoch: int) -> None:
        self.calls.append(f"resume {epoch}")
        super().failover(epoch)


@pytest.mark.parametrize("fenced", [True, False])
def test_the_fence_comes_before_anything_of_the_failover(fenced: bool) -> None:
    calls: list[str] = []
    sink = HoldingSink(calls)
    rx = Relay(sink, checkpointed=True)
    rx.on_failover = lambda epoch: calls.append(f"disks {epoch}")

    def fence(epoch: int) -> None:
        calls.append(f"fence {epoch}")
        if not fenced:
            raise RuntimeError("fence failed")

    rx.fence = fence
    assert rx.feed(stream(3, end=False)) is None
    if fenced:
        out = rx.eof()
        assert out.kind == "failover" and out.epoch == 2
        assert calls == ["fence 2", "disks 2", "resume 2"]
    else:
        with pytest.raises(RuntimeError):
            rx.eof()
        assert calls == ["fence 2"] and sink.failed_over is None and sink.aborted is None


def _fail_over(tmp_path: Path, *opts: str) -> tuple[int, str]:
    """Three epochs, then EOF, into `migrate-receive -r` with a fake xl."""
    p = start(tmp_path, "-r", *opts, XEN_REMUS_RUN_DIR=str(tmp_path),
              XEN_REMUS_STATE_DIR=str(tmp_path))
    assert p.stdin is not None
    read_exact(p, len(X.BANNER))
    p.stdin.write(make_stream(3, end=False))
    p.stdin.flush()
    return finish(p, timeout=60)


def test_cli_a_failed_fence_leaves_the_copy_paused(tmp_path: Path) -> None:
    rc, err = _fail_over(tmp_path, "--fence", "exit 7")
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == ("xen-remus migrate-receive: failover from epoch 2 refused: the fence "
                    "command `exit 7` exited with status 7; the primary may still be "
                    "running, so this host did not resume its copy: it stays paused as "
                    "guest--incoming (epoch 2 held)"), err
    # xl was killed while it still waited for the stream: it had every epoch but never
    # saw the EOF that makes it resume, and the copy was not destroyed.
    assert (tmp_path / "received").read_bytes() == make_stream(3, end=False)
    assert not (tmp_path / "resumed").exists()
    assert not (tmp_path / "destroyed").exists()
    assert not running(int((tmp_path / "pid").read_text()))
    assert "warning: no --fence" not in err


def test_cli_a_fenced_failover_resumes(tmp_path: Path) -> None:
    out = tmp_path / "fenced"
    rc, err = _fail_over(tmp_path, "--fence",
                         f'echo "$XEN_REMUS_DOMAIN $XEN_REMUS_EPOCH" > {out}')
    assert rc == 0, err
    assert out.read_text() == "guest 2\n"
    assert "the primary is fenced" in err and "guest resumed from epoch 2" in err
    data = make_stream(3, end=False)
    assert (tmp_path / "received").read_bytes() == data  # every epoch, then the EOF
    assert (tmp_path / "resumed").exists()


def test_cli_without_a_fence_warns_once(tmp_path: Path) -> None:
    rc, err = _fail_over(tmp_path)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if "warning: no --fence" in ln]
    assert warnings == ["xen-remus migrate-receive: warning: no --fence or --witness: if "
                        "the link to the primary breaks while it still runs, the guest "
                        "will run on both hosts (split brain)"]
