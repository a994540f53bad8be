"""`migrate-receive -r --failover-on-promote` and `xen-remus promote`: the backup resumes
its copy only once the cluster promoted it (the token of this wait, not a stale one);
without a promotion in time the copy stays held as after a failed fence."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import pytest

from tests.unit.test_trust_fence import _fail_over
from xen_remus.cli.receive import failover_gate
from xen_remus.cli.status import with_promotion
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.migrate_hook import build_parser
from xen_remus.receive.promote import PromoteGate, promote, read_wait, release_path, wait_path


def test_the_gate_opens_on_this_waits_token_only(tmp_path: Path) -> None:
    release_path("g1", tmp_path).write_text("0123-left-from-an-earlier-failover\n")
    seen: list[dict[str, object]] = []

    def cluster() -> None:
        doc = None
        while doc is None:
            doc = read_wait("g1", tmp_path)
            time.sleep(0.01)
        seen.append(doc)
        assert promote("g1", 10, tmp_path) == 7

    t = threading.Thread(target=cluster)
    t.start()
    assert PromoteGate(10, tmp_path, poll=0.01).run("g1", 7, 3) is None
    t.join(10)
    assert seen[0]["epoch"] == 7 and seen[0]["generation"] == 3 and seen[0]["alive"]
    assert not wait_path("g1", tmp_path).exists()
    assert not release_path("g1", tmp_path).exists()


def test_no_promotion_in_time_holds_the_copy(tmp_path: Path) -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    release_path("g1", tmp_path).write_text("stale\n")
    gate = PromoteGate(5, tmp_path, clock=lambda: now[0], sleep=sleep, poll=1)
    why = gate.run("g1", 4)
    assert why == (f"did not come within 5 s (no {tmp_path}/g1.promote with this "
                   "failover's token)")
    assert gate.what == f"the cluster's promotion (`xen-remus promote`, {tmp_path}/g1.promote)"
    assert not wait_path("g1", tmp_path).exists()  # no one may think it still waits
    assert PromoteGate(5, tmp_path).run(None, 4) == "cannot be asked: the stream named no domain"


def test_promote_without_a_waiting_receiver_fails(tmp_path: Path) -> None:
    with pytest.raises(XenRemusError, match=r"no receiver of g1 waits for a promotion"):
        promote("g1", 0, tmp_path)
    # A wait file whose receiver died (pid gone) is no receiver either.
    wait_path("g1", tmp_path).write_text(json.dumps({"pid": 2**22 + 1, "token": "t",
                                                     "epoch": 1}))
    with pytest.raises(XenRemusError, match="no receiver of g1 waits"):
        promote("g1", 0, tmp_path)


def test_status_shows_a_backup_waiting_for_promotion(tmp_path: Path) -> None:
    import os

    wait_path("g1", tmp_path).write_text(json.dumps({"pid": os.getpid(), "token": "t",
                                                     "epoch": 9, "since": 1.0}))
    docs = with_promotion([{"domain": "g1", "role": "backup", "alive": True},
                           {"domain": "g1", "role": "primary", "alive": True},
                           {"domain": "g2", "role": "backup", "alive": True}], tmp_path)
    assert docs[0]["promote_wait"] == {"pid": os.getpid(), "epoch": 9, "since": 1.0}
    assert "promote_wait" not in docs[1] and docs[2]["promote_wait"] is None


def _args(*argv: str) -> argparse.Namespace:
    return build_parser("migrate-receive").parse_args(["migrate-receive", *argv])


@pytest.mark.parametrize("argv,msg", [
    (("-r", "--failover-on-promote", "--fence", "true"), "three ways"),
    (("--failover-on-promote",), "needs -r"),
    (("-r", "--failover-on-promote", "--promote-timeout", "0"), "must be positive"),
])
def test_gate_options_refused(argv: tuple[str, ...], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        failover_gate(_args(*argv))


def test_gate_option_gives_the_promote_gate() -> None:
    gate = failover_gate(_args("-r", "--failover-on-promote", "--promote-timeout", "12"))
    assert isinstance(gate, PromoteGate) and gate.timeout == 12


def _promote_soon(tmp_path: Path) -> threading.Thread:
    def run() -> None:
        promote("guest", 60, tmp_path)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_cli_a_promoted_backup_resumes(tmp_path: Path) -> None:
    t = _promote_soon(tmp_path)
    rc, err = _fail_over(tmp_path, "--failover-on-promote")
    t.join(10)
    assert rc == 0, err
    assert "until the cluster promotes this host (`xen-remus promote guest`)" in err
    assert "promoted by the cluster" in err and "guest resumed from epoch 2" in err
    assert "warning: no --fence" not in err


def test_cli_without_a_promotion_the_copy_is_held(tmp_path: Path) -> None:
    rc, err = _fail_over(tmp_path, "--failover-on-promote", "--promote-timeout", "0.5")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "xen-remus migrate-receive: failover from epoch 2 refused: the cluster's promotion "
        f"(`xen-remus promote`, {tmp_path}/guest.promote) did not come within 0.5 s (no "
        f"{tmp_path}/guest.promote with this failover's token); the primary may still be "
        "running, so this host did not resume its copy: it stays paused as guest--incoming "
        "(epoch 2 held)"), err
    assert not (tmp_path / "resumed").exists()  # xl never saw the EOF that resumes it
    assert not (tmp_path / "destroyed").exists()
    assert json.loads((tmp_path / "guest.backup.json").read_text())["state"] == "held"
