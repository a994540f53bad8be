"""Pacemaker drives xen-remus (lab, two hosts; not in ci-tests.txt): a two-node
cluster (lab/cluster.py) with fencing (lab/dom0tools/fence_xenlab, answered by this
machine killing a QEMU) and one guest as a promotable clone of the OCF agent
xen-remus:protected-guest. The guest runs on A, protected to B; host A is killed:
Pacemaker on B fences A (the fence request reaches this machine), then promotes B's
instance, whose promote releases the receiver held by --failover-on-promote; the guest
runs on B, the same boot, its counter never going back.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab import cluster, guest
from lab.cluster import FenceDesk
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.lab import Lab

pytestmark = pytest.mark.lab

SPEC = GuestSpec(name="g1", kind="pv", ip="169.254.20.41", mac="00:16:3e:00:00:41")
BACKUP_READY = (
    "xen-remus status --json | python3 -c 'import json, sys; sys.exit(0 if any(d.get(\"role\")"
    " == \"backup\" and d.get(\"alive\") and d.get(\"committed\") is not None for d in "
    "json.load(sys.stdin)) else 1)'")


def scenario(lab: Lab, desk: FenceDesk, say: Callable[[str], None] = print) -> None:
    a, b = lab.a, lab.b
    say("forming the cluster (corosync, pacemakerd, sshd) on both dom0s")
    cluster.form(lab)
    say(f"creating {SPEC.name} on A")
    guest.create(a, SPEC)
    say("configuring fencing and the promotable clone")
    cluster.configure(lab, SPEC)
    cluster.wait_for(a, "crm_mon -1 -r | grep -Eq '(Promoted|Masters): \\[ dom0A \\]'", 600,
                     "the clone promoted on dom0A")
    cluster.wait_for(b, BACKUP_READY, 900, "B's receiver holding a whole copy", every=10)
    c0 = guest.counter(b, SPEC)
    c1 = guest.advancing(b, SPEC, c0)
    say(f"protected A -> B, counter {c1.value}; killing host A")
    a.kill()
    deadline_s = 900
    cluster.wait_for(b, f"xl list {SPEC.name} | tail -n +2 | awk '{{print $5}}' | "
                     "grep -qv p", deadline_s, f"{SPEC.name} running on B", every=5)
    c2 = guest.advancing(b, SPEC, c1, timeout=120)  # the same boot, moving on from c1
    say(f"{SPEC.name} runs on B: counter {c1.value} -> {c2.value}, boot {c2.bootid}")
    fenced = [d for d in desk.done if d.get("action") == "off" and d.get("plug") == "A"]
    if not fenced:
        raise LabError(f"B resumed the guest but no fence request for A came: {desk.done}")
    if cluster.promoted_on(b) != "dom0B":
        raise LabError("the guest runs on B but crm_mon does not show B promoted")
    st = b.run("xen-remus status --json", timeout=120).stdout
    if '"failover"' not in st:
        raise LabError(f"B's receiver did not record a failover: {st[:2000]}")
    say(f"fenced by {fenced[0].get('from')}, promoted on dom0B; done")


@pytest.mark.lab(timeout=3600)
def test_pacemaker_fences_a_then_promotes_b() -> None:
    with Lab(2, cluster=True) as lab, FenceDesk(lab) as desk:
        scenario(lab, desk)
