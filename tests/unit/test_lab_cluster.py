"""The lab cluster's CIB (lab/cluster.py) under Pacemaker's own scheduler on this machine
(crm_simulate, crm_resource, crm_mon on a CIB file: Debian's pacemaker-cli-utils, `make
host-deps`): configure()'s commands build it, and each lab scenario of
tests/lab/test_cluster.py gets the plan it counts on: both guests promoted on A; a move by
hand is a demote on A, then a promote on B; host B lost: B fenced, its guest promoted on A
where the agent scored a whole copy. The agents themselves are not run (crm_simulate
fakes every action's success); the agent's promotion scores are set as it sets them."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab.cluster import NODES, cib_commands, clone_id, configuration_xml, roles_of
from lab.guest import GuestSpec

G1, G2 = GuestSpec(name="cg1"), GuestSpec(name="cg2")
TOOLS = ("cibadmin", "crm_attribute", "crm_simulate", "crm_resource", "crm_mon")


def cli(cib: Path, *argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, CIB_file=str(cib)))
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"
    return r.stdout


def simulate(cib: Path, *argv: str) -> str:
    """One transition of the scheduler on ``cib``, run (every action succeeds) and saved
    back into it; its summary and actions."""
    out = cib.with_suffix(".next.xml")
    text = cli(cib, "crm_simulate", "-x", str(cib), *argv, "-S", "-O", str(out))
    out.replace(cib)
    return text


def built(tmp: Path, **kw: object) -> Path:
    """An empty CIB with configure()'s commands applied, both nodes up, one transition
    run."""
    assert all(shutil.which(t) for t in TOOLS), "run `make host-deps` (pacemaker-cli-utils)"
    cib = tmp / "cib.xml"
    cib.write_text(subprocess.run(["cibadmin", "--empty"], capture_output=True, text=True,
                                  check=True).stdout)
    conf = tmp / "configuration.xml"
    conf.write_text(configuration_xml(G1, G2, cold=True, **kw))  # type: ignore[arg-type]
    for cmd in cib_commands(str(conf)):
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, CIB_file=str(cib)))
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
    verify = subprocess.run(["crm_verify", "-x", str(cib)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    simulate(cib, "-u", NODES["A"], "-u", NODES["B"], "-q", "true")
    return cib


def roles(cib: Path, spec: GuestSpec) -> dict[str, str]:
    return roles_of(cli(cib, "crm_mon", "-1", "--output-as=xml"), spec)


def scores(cib: Path, **by_node: dict[str, int]) -> None:
    """The agent's promotion scores (crm_attribute --promotion: master-RESOURCE)."""
    for node, per in by_node.items():
        for guest, value in per.items():
            cli(cib, "crm_attribute", "-N", node, "-n", f"master-pg-{guest}", "-l",
                "reboot", "-v", str(value))


def test_both_guests_promoted_on_a_fence_devices_never_on_their_target(
        tmp_path: Path) -> None:
    cib = built(tmp_path, prefer={"cg1": "A", "cg2": "A"}, fence_delay={"A": "60s"})
    assert roles(cib, G1) == roles(cib, G2) == {"dom0A": "Promoted", "dom0B": "Unpromoted"}
    mon = ET.fromstring(cli(cib, "crm_mon", "-1", "--output-as=xml"))
    where = {r.get("id"): [n.get("name") for n in r.findall("node")]
             for r in mon.iter("resource") if str(r.get("id")).startswith("fence-")}
    assert where == {"fence-A": ["dom0B"], "fence-B": ["dom0A"]}
    conf = ET.fromstring(configuration_xml(G1, fence_delay={"A": "60s"}))
    delays = {p.get("id"): [n.get("value") for n in p.iter("nvpair")
                            if n.get("name") == "pcmk_delay_base"]
              for p in conf.iter("primitive") if p.get("class") == "stonith"}
    assert delays == {"fence-A": ["60s"], "fence-B": []}


def test_a_move_by_hand_demotes_on_a_then_promotes_on_b(tmp_path: Path) -> None:
    cib = built(tmp_path, prefer={"cg1": "A", "cg2": "A"})
    scores(cib, dom0A={"cg1": 1000, "cg2": 1000}, dom0B={"cg1": 500, "cg2": 500})
    # What tests/lab/test_cluster.py runs in dom0A.
    cli(cib, "crm_resource", "--resource", clone_id(G2), "--move", "--node", "dom0B",
        "--promoted")
    plan = simulate(cib)
    acts = [ln.split("*", 1)[1].split() for ln in plan.splitlines()
            if "Resource action:" in ln and "pg-cg" in ln]
    demote = acts.index(["Resource", "action:", "pg-cg2", "demote", "on", "dom0A"])
    promote = acts.index(["Resource", "action:", "pg-cg2", "promote", "on", "dom0B"])
    assert demote < promote
    assert not any(a[2] == "pg-cg1" and a[3] in ("demote", "promote", "stop") for a in acts)
    assert roles(cib, G2) == {"dom0A": "Unpromoted", "dom0B": "Promoted"}
    assert roles(cib, G1)["dom0A"] == "Promoted"
    cli(cib, "crm_resource", "--resource", clone_id(G2), "--move", "--node", "dom0A",
        "--promoted")
    simulate(cib)
    assert roles(cib, G2) == {"dom0A": "Promoted", "dom0B": "Unpromoted"}


def test_host_b_lost_is_fenced_and_its_guest_promoted_on_a(tmp_path: Path) -> None:
    cib = built(tmp_path, prefer={"cg1": "A", "cg2": "B"}, fence_delay={"A": "60s"})
    assert roles(cib, G1)["dom0A"] == "Promoted" and roles(cib, G2)["dom0B"] == "Promoted"
    scores(cib, dom0A={"cg1": 1000, "cg2": 500}, dom0B={"cg1": 500, "cg2": 1000})
    plan = simulate(cib, "-f", "dom0B")
    assert "Fence (off) dom0B" in plan
    assert roles(cib, G1) == roles(cib, G2) == {"dom0A": "Promoted"}


@pytest.mark.parametrize("spec", [G1])
def test_the_clone_without_cold_boot_has_no_config(spec: GuestSpec) -> None:
    conf = ET.fromstring(configuration_xml(spec))
    names = {n.get("name") for n in conf.iter("nvpair")}
    assert "config" not in names and "log_dir" in names
    cold = ET.fromstring(configuration_xml(spec, cold=True))
    assert {n.get("value") for n in cold.iter("nvpair") if n.get("name") == "config"} == \
        {"/mnt/lab/guests/cg1.cfg"}
