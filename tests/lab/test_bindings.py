"""End to end on real Xen: xen_remus.xen and pagetable.py on a running PV and a PVH guest.

The work happens in dom0 (lab/dom0tools/bindings_probe.py); this side (on the ``lab_one`` host)
creates each guest, runs the probe, checks its report and that the guest's counter keeps
going after the suspend and fast resume.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = pytest.mark.lab(timeout=900)

PROBE = "/mnt/project/lab/dom0tools/bindings_probe.py"


def probe(host: Any, name: str) -> dict[str, Any]:
    domid = int(host.run(f"xl domid {name}", timeout=30, check=True).stdout.strip())
    r = host.run(f"python3 {PROBE} {domid}", timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE-RESULT ")]
    assert lines, f"probe printed no result (rc {r.rc}):\n{r.stdout}\n{r.stderr}"
    out: dict[str, Any] = json.loads(lines[-1][len("PROBE-RESULT "):])
    assert "fatal" not in out, f"{out['fatal']}\nstderr:\n{r.stderr}"
    assert out["domid"] in out["domains"]
    return out


def ticks_after(host: Any, name: str, last: int, timeout: float = 30.0) -> list[tuple[int, str]]:
    from lab import guest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [t for t in guest.ticks(host, name) if t[0] > last]
        if len(new) >= 2:
            return new
        time.sleep(1)
    raise AssertionError(f"{name}: counter stuck at {last} after resume")


def check_common(out: dict[str, Any]) -> None:
    assert out["pause_unpause"] == [True, False]
    rounds = out["clean_rounds"]
    assert all(r["dirty_count"] > 0 and r["bitmap_pfns"] > 0 for r in rounds), rounds
    assert out["suspended"] is True
    assert out["after_resume"] == {"shutdown": False, "paused": False, "dying": False}
    assert out["cpu_policy"]["leaves"] > 0
    assert out["vcpu0"]["online"]


def run_guest(host: Any, kind: str, name: str, ip: str, mac: str) -> dict[str, Any]:
    from lab import guest

    spec = guest.GuestSpec(name=name, kind=kind, ip=ip, mac=mac)
    guest.create(host, spec, timeout=300)  # TCG: the guest writes its pattern first
    try:
        before = guest.ticks(host, name)
        assert before, f"{name}: no counter ticks before the probe"
        out = probe(host, name)
        mid = guest.ticks(host, name)  # the probe has resumed the guest by now
        out["_ticks"] = (before[-1], ticks_after(host, name, mid[-1][0]))
        return out
    finally:
        host.run(f"xl destroy {name}", timeout=60)


def test_pv_guest(lab_one: Any) -> None:
    out = run_guest(lab_one, "pv", "bpv", "169.254.20.11", "00:16:3e:00:01:01")
    check_common(out)
    p2m = out["p2m"]
    assert p2m["valid"] > 0 and p2m["m2p_mismatch"] == 0 and p2m["p2m_m2p_mfn_mismatch"] == 0
    assert p2m.get("tree_agrees", True)
    assert out["map64"]["errors"] == 0 and out["map64"]["nonzero_pages"] > 0
    norm = out["normalise_suspended"]
    assert norm["tables"] > 0 and norm["levels"]["L4"] > 0
    assert norm["normalised"] == norm["tables"] and norm["retry"] == 0
    assert out["vcpus_normalised"] and out["vcpus_normalised"][0]["cr3_pfn"] < p2m["entries"]
    (_, bootid), after = out["_ticks"]
    assert all(b == bootid for _, b in after), "guest rebooted"


def test_pvh_guest(lab_one: Any) -> None:
    out = run_guest(lab_one, "pvh", "bpvh", "169.254.20.12", "00:16:3e:00:01:02")
    check_common(out)
    assert out["info"]["pvh"] and out["hvm_context_bytes"] > 0
    assert out["hvm_params"]["store_pfn"] > 0
    assert out["map256"]["nonzero_pages"] > 0
    (_, bootid), after = out["_ticks"]
    assert all(b == bootid for _, b in after), "guest rebooted"
