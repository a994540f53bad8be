"""The OCF agent xen-remus:protected-guest (xen_remus/ocf/protected_guest.py), run as
Pacemaker runs it (a process, OCF_RESKEY_* environment) with fake xen-remus, xl and
crm_* commands on PATH (tests/unit/ocf_fake_bin.py): every action's OCF exit code, what it
did to the guest, and its meta-data against the OCF RA API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
AGENT = HERE.parent.parent / "xen_remus" / "ocf" / "protected_guest.py"
FAKE = HERE / "ocf_fake_bin.py"
RA_DTD = Path("/usr/share/resource-agents/ra-api-1.dtd")
TOOLS = ("xen-remus", "xl", "crm_attribute", "crm_node")


class Node:
    """One node's fake world and the agent run in it."""

    def __init__(self, tmp: Path) -> None:
        self.dir, self.bin, self.run_dir = tmp / "state", tmp / "bin", tmp / "run"
        for d in (self.dir, self.bin, self.run_dir):
            d.mkdir()
        for tool in TOOLS:
            shutil.copy(FAKE, self.bin / tool)
            (self.bin / tool).chmod(0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_OCF": str(self.dir),
                    "FAKE_OCF_RUN_S": "0", "XEN_REMUS_RUN_DIR": str(self.run_dir),
                    "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "pg:0",
                    "OCF_RESKEY_domain": "g1", "OCF_RESKEY_nodes": "nodeA nodeB=hostB",
                    "OCF_RESKEY_log_dir": str(tmp / "log"),
                    "OCF_RESKEY_CRM_meta_interval": "10000",
                    "OCF_RESKEY_CRM_meta_timeout": "40000"}

    def domains(self, **doms: str) -> None:
        (self.dir / "domains").write_text("".join(f"{n.replace('__', '--')} {s}\n"
                                                  for n, s in doms.items()))

    def xl(self) -> dict[str, str]:
        text = (self.dir / "domains").read_text() if (self.dir / "domains").exists() else ""
        return dict(ln.split() for ln in text.splitlines())

    def status(self, *docs: dict[str, Any]) -> None:
        (self.dir / "status.json").write_text(json.dumps(list(docs)))

    def process(self, role: str) -> int:
        """A live process that looks like protect / migrate-receive (its pid in status)."""
        p = subprocess.Popen([sys.executable, str(self.bin / "xen-remus"), role, "g1"],
                             env=dict(self.env, FAKE_OCF_RUN_S="60", FAKE_OCF_RECORD="0"))
        self.procs.append(p)
        return p.pid

    def run(self, action: str, **env: str) -> tuple[int, str]:
        r = subprocess.run([sys.executable, str(AGENT), action], capture_output=True,
                           text=True, env=dict(self.env, **env), timeout=60)
        return r.returncode, r.stderr

    def calls(self, tool: str | None = None) -> list[list[str]]:
        log = self.dir / "calls.log"
        lines = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
        return [c[1:] for c in lines if tool is None or c[0] == tool]

    def scores(self) -> list[list[str]]:
        return self.calls("crm_attribute")

    def launched(self) -> list[str]:
        f = self.dir / "protect.argv"
        for _ in range(400):  # a Python start on a busy machine
            if f.exists():
                return list(json.loads(f.read_text()))
            time.sleep(0.05)
        raise AssertionError("protect was not launched")


@pytest.fixture
def node(tmp_path: Path) -> Any:
    n = Node(tmp_path)
    yield n
    for p in n.procs:
        p.kill()
        p.wait()


def primary(pid: int, state: str = "protecting", epoch: int | None = 12) -> dict[str, Any]:
    return {"domain": "g1", "role": "primary", "pid": pid, "alive": True, "state": state,
            "epoch": epoch, "peer": "hostB"}


def backup(pid: int, committed: int | None = 4, waiting: bool = False) -> dict[str, Any]:
    return {"domain": "g1", "role": "backup", "pid": pid, "alive": True,
            "state": "receiving", "committed": committed,
            "promote_wait": {"pid": pid, "epoch": committed, "since": 1.0} if waiting else None}


# -- meta-data and arguments ------------------------------------------------------------------

def test_meta_data_is_the_ocf_ra_api(node: Node) -> None:
    r = subprocess.run([sys.executable, str(AGENT), "meta-data"], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"]}, timeout=30)
    assert r.returncode == 0
    root = ET.fromstring(r.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "protected-guest"
    actions = {a.get("name") for a in root.iter("action")}
    assert actions == {"start", "stop", "promote", "demote", "notify", "monitor",
                       "meta-data", "validate-all"}
    roles = {a.get("role") for a in root.iter("action") if a.get("name") == "monitor"}
    assert roles == {"Promoted", "Unpromoted"}  # two intervals: one monitor per role
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert params["domain"].get("required") == "1" and params["domain"].get("unique") == "1"
    # Valid against the OCF RA API's DTD (Debian's resource-agents; `make host-deps`).
    assert shutil.which("xmllint") and RA_DTD.exists(), "run `make host-deps`"
    doc = node.dir / "meta.xml"
    doc.write_text(r.stdout)
    v = subprocess.run(["xmllint", "--noout", "--dtdvalid", str(RA_DTD), str(doc)],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize("argv,code", [([], 2), (["migrate"], 3)])
def test_unknown_actions(argv: list[str], code: int) -> None:
    r = subprocess.run([sys.executable, str(AGENT), *argv], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"]}, timeout=30)
    assert r.returncode == code and "usage: protected-guest" in r.stderr


@pytest.mark.parametrize("env,code", [
    ({"OCF_RESKEY_domain": ""}, 6),
    ({"OCF_RESKEY_promote_timeout": "soon"}, 6),
    ({"OCF_RESKEY_config": "/nonexistent.cfg"}, 6),
    ({"OCF_RESKEY_xen_remus": "/nonexistent/xen-remus"}, 5),
    ({"OCF_RESKEY_CRM_meta_clone_max": "2"}, 6),  # a clone, but not a promotable one
    ({"OCF_RESKEY_CRM_meta_clone_max": "2", "OCF_RESKEY_CRM_meta_promoted_max": "1"}, 0),
])
def test_validate_all(node: Node, env: dict[str, str], code: int) -> None:
    assert node.run("validate-all", **env)[0] == code


def test_a_probe_on_a_node_without_xen_remus_is_not_running(node: Node) -> None:
    missing = {"OCF_RESKEY_xen_remus": "/nonexistent/xen-remus"}
    assert node.run("monitor", OCF_RESKEY_CRM_meta_interval="0", **missing)[0] == 7
    assert node.run("monitor", **missing)[0] == 5


# -- monitor ----------------------------------------------------------------------------------

def test_monitor_a_stopped_instance(node: Node) -> None:
    node.domains()
    assert node.run("monitor", OCF_RESKEY_CRM_meta_interval="0")[0] == 7
    assert node.scores() == []  # a probe of a stopped instance leaves the score alone


def test_monitor_the_primary_protecting(node: Node) -> None:
    node.domains(g1="-b----")
    node.status(primary(node.process("protect")))
    rc, err = node.run("monitor")
    assert rc == 8, err
    assert "g1: protected: protect pid" in err
    assert node.scores() == [["--promotion", "-v", "1000"]]
    assert not (node.dir / "protect.argv").exists()  # protect runs: none launched


def test_monitor_the_primary_syncing(node: Node) -> None:
    node.domains(g1="r-----")
    node.status(primary(node.process("protect"), "starting", None))
    rc, err = node.run("monitor")
    assert rc == 8 and "g1: syncing" in err


def test_a_primary_without_protect_gets_one_at_most_once_a_minute(node: Node) -> None:
    node.domains(g1="r-----")
    rc, err = node.run("monitor")
    assert rc == 8 and "g1: unprotected" in err
    argv = node.launched()
    assert argv[:2] == ["protect", "-i"] and argv[-4:-1] == ["-s", "", "g1"]
    assert argv[-1] == ("exec ssh -o BatchMode=yes hostB 'xen-remus migrate-receive -r "
                        "--failover-on-promote --promote-timeout 300'")
    (node.dir / "protect.argv").unlink()
    assert node.run("monitor")[0] == 8
    time.sleep(0.5)
    assert not (node.dir / "protect.argv").exists()
    # A probe never launches one (Pacemaker has not decided the role yet).
    (node.run_dir / "ocf" / "g1.protect").unlink()
    assert node.run("monitor", OCF_RESKEY_CRM_meta_interval="0")[0] == 8
    time.sleep(0.5)
    assert not (node.dir / "protect.argv").exists()


def test_monitor_a_guest_halted_here_is_a_failed_promoted(node: Node) -> None:
    node.domains(g1="--p---")
    rc, err = node.run("monitor")
    assert rc == 9 and "g1: halted" in err
    assert node.scores() == [["--promotion", "-D"]]


def test_monitor_the_backup_receiving(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive")))
    rc, err = node.run("monitor")
    assert rc == 0 and "g1: receiving" in err
    assert node.scores() == [["--promotion", "-v", "500"]]


def test_monitor_a_backup_before_its_first_whole_copy_is_not_promotable(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive"), committed=None))
    assert node.run("monitor")[0] == 0
    assert node.scores() == [["--promotion", "-D"]]


def test_monitor_the_backup_waiting_for_promotion(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive"), waiting=True))
    rc, err = node.run("monitor")
    assert rc == 0 and "g1: lost: primary declared dead" in err
    assert node.scores() == [["--promotion", "-v", "500"]]


def test_monitor_a_held_copy_without_receiver_fails(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status({**backup(999999), "alive": False, "state": "held"})
    rc, err = node.run("monitor")
    assert rc == 1 and "g1: held" in err


def test_monitor_fails_when_xl_does(node: Node) -> None:
    (node.bin / "xl").write_text("#!/bin/sh\necho 'cannot connect to xenstore' >&2\nexit 1\n")
    rc, err = node.run("monitor")
    assert rc == 1 and "xl list: cannot connect to xenstore" in err


# -- start, stop ------------------------------------------------------------------------------

def test_start_monitor_stop_an_unpromoted_instance(node: Node) -> None:
    node.domains()
    assert node.run("start")[0] == 0
    assert node.run("monitor")[0] == 0
    assert node.run("stop")[0] == 0
    assert node.run("monitor")[0] == 7


def test_start_clears_a_held_copy(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    rc, err = node.run("start")
    assert rc == 0 and "xl destroy g1--incoming (a held copy" in err
    assert node.xl() == {}


def test_start_refuses_where_the_guest_runs(node: Node) -> None:
    node.domains(g1="r-----")
    rc, err = node.run("start")
    assert rc == 1 and "runs on this node" in err


def test_stop_kills_the_receiver_and_its_copy(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    pid = node.process("migrate-receive")
    node.status(backup(pid))
    assert node.run("stop")[0] == 0
    assert node.procs[0].wait(10) == -15  # SIGTERM
    assert node.xl() == {} and node.scores()[-1] == ["--promotion", "-D"]


def test_stop_without_xen_succeeds(node: Node) -> None:
    assert node.run("stop", PATH="/nonexistent")[0] == 0


# -- promote, demote, notify ------------------------------------------------------------------

def test_promote_releases_the_waiting_receiver_then_protects(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive"), waiting=True))
    (node.dir / "waiting").touch()
    rc, err = node.run("promote")
    assert rc == 0, err
    assert ["promote", "g1", "--wait", "15"] in node.calls("xen-remus")
    assert node.xl() == {"g1": "r-----"}
    assert node.scores()[-1] == ["--promotion", "-v", "1000"]
    assert node.launched()[-1].startswith("exec ssh -o BatchMode=yes hostB ")


def test_promote_fails_when_the_receiver_does_not_take_it(node: Node) -> None:
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive")))
    rc, err = node.run("promote")
    assert rc == 1 and "no receiver of g1 waits" in err
    assert ["--promotion", "-v", "1000"] not in node.scores()


def test_promote_with_nothing_to_promote_fails(node: Node) -> None:
    node.domains()
    rc, err = node.run("promote")
    assert rc == 1 and "nothing to promote" in err


def test_promote_cold_boots_with_config(node: Node, tmp_path: Path) -> None:
    cfg = tmp_path / "g1.cfg"
    cfg.write_text("name = 'g1'\n")
    node.domains()
    rc, err = node.run("promote", OCF_RESKEY_config=str(cfg))
    assert rc == 0, err
    assert ["create", str(cfg)] in node.calls("xl") and node.xl() == {"g1": "r-----"}


def test_promoting_the_primary_again_starts_no_second_protect(node: Node) -> None:
    node.domains(g1="r-----")
    node.status(primary(node.process("protect")))
    rc, err = node.run("promote")
    assert rc == 0 and "runs here already" in err
    time.sleep(0.3)
    assert not (node.dir / "protect.argv").exists()


def test_promote_resumes_a_guest_halted_here(node: Node) -> None:
    node.domains(g1="--p---")
    assert node.run("promote")[0] == 0
    assert node.xl() == {"g1": "r-----"}


def test_demote_a_protected_primary_hands_it_over_then_destroys_it(node: Node) -> None:
    node.domains(g1="r-----")
    node.status(primary(node.process("protect")))
    rc, err = node.run("demote")
    assert rc == 0, err
    # Half the action's budget (40 s less a 10 s margin) for the handover.
    assert ["handover", "g1", "--wait", "15"] in node.calls("xen-remus")
    assert node.procs[0].wait(10) == -10  # protect got the handover's SIGUSR1, not a kill
    assert "handed over to hostB after epoch 12" in err
    xl = [c[0] for c in node.calls("xl") if c[0] != "list"]
    assert xl == ["destroy"] and node.xl() == {}  # suspended at its last epoch: no pause
    assert node.scores()[-1] == ["--promotion", "-D"]


def test_demote_takes_the_crash_path_when_the_handover_fails(node: Node) -> None:
    node.domains(g1="r-----")
    node.status(primary(node.process("protect")))
    (node.dir / "handover-fails").touch()
    rc, err = node.run("demote")
    assert rc == 0, err
    assert "xen-remus handover g1 (the crash path instead): " in err and "backup lost" in err
    assert node.procs[0].wait(10) == -9  # the crash path: unacknowledged output stays held
    xl = [c[0] for c in node.calls("xl") if c[0] != "list"]
    assert xl == ["pause", "destroy"] and node.xl() == {}


def test_demote_an_unprotected_primary_shuts_it_down(node: Node) -> None:
    node.domains(g1="r-----")
    node.status(primary(node.process("protect"), "starting", None))
    rc, err = node.run("demote")
    assert rc == 0 and "not protected: shutting it down" in err
    assert not any(c[0] == "handover" for c in node.calls("xen-remus"))  # nothing to hand
    assert node.procs[0].wait(10) == -15
    assert ["shutdown", "-w", "g1"] in node.calls("xl") and node.xl() == {}


def test_demote_where_the_guest_is_not_is_done(node: Node) -> None:
    node.domains()
    assert node.run("demote")[0] == 0


@pytest.mark.parametrize("kind,op,launch", [("post", "start", True),
                                            ("post", "promote", True),
                                            ("pre", "start", False),
                                            ("post", "stop", False)])
def test_notify_protects_to_a_peer_that_started(node: Node, kind: str, op: str,
                                                launch: bool) -> None:
    node.domains(g1="r-----")
    assert node.run("notify", OCF_RESKEY_CRM_meta_notify_type=kind,
                    OCF_RESKEY_CRM_meta_notify_operation=op)[0] == 0
    if launch:
        assert node.launched()[-2] == "g1"
    else:
        time.sleep(1)
        assert not (node.dir / "protect.argv").exists()


def test_a_notification_right_after_a_promote_starts_no_second_protect(node: Node) -> None:
    """The promote launched protect, which has not written its status yet."""
    node.domains(g1__incoming="--p---")
    node.status(backup(node.process("migrate-receive"), waiting=True))
    (node.dir / "waiting").touch()
    assert node.run("promote", FAKE_OCF_RUN_S="30")[0] == 0
    node.launched()
    pid = json.loads((node.run_dir / "ocf" / "g1.protect").read_text())["pid"]
    try:
        for _ in range(2):
            assert node.run("notify", FAKE_OCF_RUN_S="30",
                            OCF_RESKEY_CRM_meta_notify_type="post",
                            OCF_RESKEY_CRM_meta_notify_operation="promote")[0] == 0
        time.sleep(1)
        assert len([c for c in node.calls("xen-remus") if c[0] == "protect"]) == 1
    finally:
        os.kill(pid, 9)
    time.sleep(0.3)  # not our child: init reaps it
    (node.dir / "protect.argv").unlink()
    assert node.run("notify", OCF_RESKEY_CRM_meta_notify_type="post",
                    OCF_RESKEY_CRM_meta_notify_operation="promote")[0] == 0
    assert node.launched()[-2] == "g1"  # that protect is gone: a new one


def test_the_peer_from_crm_node(node: Node) -> None:
    node.domains(g1="r-----")
    assert node.run("monitor", OCF_RESKEY_nodes="")[0] == 8
    assert node.launched()[-1].startswith("exec ssh -o BatchMode=yes nodeB ")
