"""The lab's fence channel on this machine: fence_xenlab (run in a dom0, here as a
process) writes its request on the share, FenceDesk (lab/cluster.py) answers it, killing
the host for off; fence-agents conventions (stdin key=value, status exit codes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.cluster import FenceDesk, resources_xml
from lab.guest import GuestSpec

AGENT = Path(__file__).resolve().parents[2] / "lab" / "dom0tools" / "fence_xenlab"


class FakeHost:
    def __init__(self) -> None:
        self.up = True

    def alive(self) -> bool:
        return self.up

    def kill(self) -> None:
        self.up = False


def fence(share: Path, stdin: str, node: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    """fence_xenlab run as Pacemaker runs it; ``node``: the dom0 it runs in (its "from")."""
    argv = [sys.executable, str(AGENT)]
    if node is not None:  # the agent names its host by os.uname(): the stand-in's, here
        argv = ["unshare", "--uts", "--map-root-user", "sh", "-c",
                f'hostname {node} && exec "$@"', "sh", *argv]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          env={"FENCE_XENLAB_SHARE": str(share), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def desk(tmp_path: Path) -> Any:
    lab = SimpleNamespace(rundir=tmp_path, hosts={"A": FakeHost(), "B": FakeHost()})
    with FenceDesk(lab, poll=0.02) as d:  # type: ignore[arg-type]
        yield d


def test_off_kills_the_named_host_and_status_says_so(desk: FenceDesk) -> None:
    share = desk.dir
    r = fence(share, "action=status\nplug=A\n")
    assert r.returncode == 0 and r.stdout == "Status: ON\n"
    r = fence(share, "action=reboot\nport=A\nnodename=dom0A\n")  # reboot is off in the lab
    assert r.returncode == 0, r.stderr
    assert not desk.lab.hosts["A"].alive() and desk.lab.hosts["B"].alive()
    r = fence(share, "action=status\nplug=A\n")
    assert r.returncode == 2 and r.stdout == "Status: OFF\n"
    assert fence(share, "action=list\n").stdout == "A,\nB,\n"
    # Pacemaker's device monitor names no plug: the device (the desk) answering is enough.
    assert fence(share, "action=monitor\n").returncode == 0
    r = fence(share, "action=on\nplug=A\n")
    assert r.returncode == 1 and "the lab cannot do that" in r.stderr
    assert [d["action"] for d in desk.done] == ["status", "off", "status", "list", "monitor",
                                              "on"]
    assert list(share.iterdir()) == []  # every request answered and taken


def test_a_request_from_a_host_that_is_off_is_refused(desk: FenceDesk) -> None:
    """Written just before its host was killed (the loser of a fence race): a node that
    is off fences nothing."""
    desk.lab.hosts["B"].kill()
    r = fence(desk.dir, "action=off\nplug=A\n", node="dom0B")
    assert r.returncode == 1 and "dom0B is off" in r.stderr
    assert desk.lab.hosts["A"].alive()
    assert fence(desk.dir, "action=off\nplug=B\n", node="dom0A").returncode == 0


def test_a_bad_plug_and_no_driver(tmp_path: Path) -> None:
    r = fence(tmp_path, "action=off\nplug=C\n")
    assert r.returncode == 1 and "expected A or B" in r.stderr
    r = fence(tmp_path, "action=off\nplug=A\npower_timeout=0.5\n")  # no desk polls
    assert r.returncode == 1 and "no answer from the lab driver in 0.5 s" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_metadata_and_the_cib_are_xml() -> None:
    import xml.etree.ElementTree as ET

    r = fence(Path("/nonexistent"), "action=metadata\n")
    assert ET.fromstring(r.stdout).get("name") == "fence_xenlab"
    cib = ET.fromstring(resources_xml(GuestSpec(name="g1")))
    prim = cib.find("clone/primitive")
    assert prim is not None and prim.get("type") == "protected-guest"
    meta = {n.get("name"): n.get("value") for n in cib.iter("nvpair")}
    assert meta["promotable"] == "true"
    maps = [n.get("value") for n in cib.iter("nvpair") if n.get("name") == "pcmk_host_map"]
    assert maps == ["dom0A:A", "dom0B:B"]  # a device per host (fence-A, fence-B)
    ids = [e.get("id") for e in cib.iter() if e.get("id")]
    assert len(ids) == len(set(ids))  # the CIB refuses duplicate ids


@pytest.mark.skipif(shutil.which("crm_verify") is None, reason="no pacemaker-cli-utils")
def test_the_cib_passes_crm_verify(tmp_path: Path) -> None:
    """Pacemaker's schema and scheduler take the clone and the fence device (warnings only
    about nodes that are offline in a CIB without status)."""
    cib = tmp_path / "cib.xml"
    cib.write_text(
        '<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">'
        '<configuration><crm_config><cluster_property_set id="o"><nvpair id="o-s" '
        'name="stonith-enabled" value="true"/></cluster_property_set></crm_config><nodes>'
        '<node id="1" uname="dom0A"/><node id="2" uname="dom0B"/></nodes>'
        f'{resources_xml(GuestSpec(name="g1"))}<constraints/></configuration><status/></cib>')
    r = subprocess.run(["crm_verify", "-V", "-x", str(cib)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode in (0, 78), r.stderr  # 78: warnings
    assert "error" not in r.stderr.lower(), r.stderr
