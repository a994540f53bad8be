"""End to end on real Xen: output buffering of a PV guest's vif (xen_remus.devices.netbuf).

The work happens in dom0 (lab/dom0tools/netbuf_probe.py, with Debian's python3-pyroute2): buffering
is set up on the guest's vif; a client in dom0 talks to the guest's TCP counter service,
pings it over IPv4 and IPv6 and ARPs for it. While output is held nothing comes back; each
commit lets exactly its epoch's replies out; a 100 ms postsuspend/commit cadence keeps the
TCP connection going (added latency printed); teardown drops what is still held (an ICMP
reply) and restores plain traffic, release_all lets it out first; a run killed
by SIGKILL leaves its qdiscs and state file behind and the next setup recovers.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest

pytestmark = pytest.mark.lab

PROBE = "/mnt/project/lab/dom0tools/netbuf_probe.py"
HOOKED = {"ingress": True, "filters": ["matchall"], "ifb": ["plug"]}
UNHOOKED = {"ingress": False, "filters": [], "ifb": None}
SPEC = dict(name="nbuf", kind="pv", ip="169.254.20.61", mac="00:16:3e:00:06:01")


def run_probe(host: Any) -> dict[str, Any]:
    from lab import guest

    spec = guest.GuestSpec(**SPEC)  # type: ignore[arg-type]
    host.run(f"xl destroy {spec.name} 2>/dev/null; true", timeout=60)
    guest.create(host, spec, timeout=240)
    try:
        domid = int(host.run(f"xl domid {spec.name}", timeout=30, check=True).stdout.strip())
        r = host.run(f"python3 {PROBE} {domid} {spec.ip} {spec.mac}", timeout=500)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE-RESULT ")]
        assert lines, f"probe printed no result (rc {r.rc}):\n{r.stdout}\n{r.stderr}"
        out: dict[str, Any] = json.loads(lines[-1][len("PROBE-RESULT "):])
        print("\nnetbuf probe:", json.dumps(out, indent=1))
        assert "fatal" not in out, f"{out['fatal']}\nstderr:\n{r.stderr}"
        out["domid"] = domid
        return out
    finally:
        host.run(f"xl destroy {spec.name} 2>/dev/null; true", timeout=60)


@pytest.mark.lab(timeout=900)
def test_netbuf_on_a_pv_guest(lab_one: Any) -> None:
    out = run_probe(lab_one)
    domid = out["domid"]
    vif, ifb = f"vif{domid}.0", f"xrifb{domid}.0"
    assert out["devices"] == [f"netbuf {vif} -> {ifb}"]
    # Plain traffic works before.
    assert out["greeting"] and out["unbuffered_ping"] == [[100], [100]]
    assert out["unbuffered_arp"]
    assert out["tc_after_setup"] == HOOKED
    assert out["state_files"] == [vif]
    # Held while buffering; each commit releases exactly its epoch's replies.
    assert out["held_tcp_e1"] and out["held_ping_e1"] and out["held_ping_e2_before_commit1"]
    assert out["tcp_e1_after_commit_ms"] is not None, "TCP reply not released by commit 1"
    assert out["ping_after_commit1"] == [1, 2, 3]
    assert out["ping_after_commit2"] == [4, 5]
    assert out["ifb_tx_commit1"] >= 4 and out["ifb_tx_commit2"] >= 2
    # Every protocol goes through the plug, not only IPv4.
    assert out["held_ping6"] and out["ping6_after_commit3"] == [7]
    assert out["held_arp"] and out["arp_after_commit3"]
    assert "commit of epoch 3 out of order" in out["recommit_refused"]
    # A 100 ms commit cadence lets TCP go on.
    assert out["cadence_error"] is None and out["cadence_epochs"] > 0
    assert len(out["rtt_cadence100_ms"]) == 20
    # Teardown drops what is held (never released without a commit), restores plain
    # traffic and leaves nothing; release_all before it lets the held output out.
    assert out["held_ping_before_teardown"] and out["ping_after_teardown"] == []
    assert out["held_ping_before_release"] and out["ping_after_release_teardown"] == [9]
    assert out["tc_after_teardown"] == UNHOOKED
    assert out["state_after_teardown"] == []
    assert len(out["rtt_after_teardown_ms"]) == 10
    # Crash (SIGKILL) leaves qdiscs and the state file; the next setup recovers.
    assert out["crash_child"]["status"] == -9
    assert out["state_after_crash"] == [vif]
    assert out["tc_after_crash"] == HOOKED
    assert out["held_after_crash"]
    assert out["tc_after_recovery_setup"] == HOOKED
    assert out["reply_after_recovery"] and out["reply_after_recovery"].startswith("counter=")
    assert out["recovery_cadence_error"] is None
    assert out["tc_final"] == UNHOOKED and len(out["rtt_final_ms"]) == 5
    assert out["missing_module"].startswith(
        "netbuf: kernel module missing: sch_nonexistent_xr (modprobe: FATAL: Module")
    med = statistics.median
    print(f"\npyroute2 {out['pyroute2']}; RTT median ms: before {med(out['rtt_before_ms'])}, "
          f"100 ms cadence {med(out['rtt_cadence100_ms'])} (max "
          f"{max(out['rtt_cadence100_ms'])}), after teardown {med(out['rtt_after_teardown_ms'])}"
          f"; postsuspend+commit ms median {med(out['postsuspend_commit_ms'])} max "
          f"{max(out['postsuspend_commit_ms'])}; released by commit 1: "
          f"{out['ifb_tx_commit1']} packets, commit 2: {out['ifb_tx_commit2']}")
