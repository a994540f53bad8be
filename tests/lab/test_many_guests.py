"""Several guests per host pair on real Xen (lab, two hosts; not in ci-tests.txt): three
small PV guests protected A -> B at once by three `xen-remus protect`s (output commit),
each with its own receiver port, network buffer (IFB) and status files; host A killed:
each guest goes on on B on its own.

Checked for each guest, as tests/lab/test_protect.py checks one: the same guest (boot
id), its counter never back from the highest value its client (one TCP connection from
B's dom0, held across the kill) saw, the connection survives. Printed per guest: the
initial copy's time, the seconds from the kill to it running on B, the epoch B resumed it
from and B's failover timeline; and dom0 memory on both hosts while all three run
(three guests are 288 MiB of Xen's ~2 GiB; each protect and receiver holds a page cache
in dom0's 1 GiB).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from lab import failover, guest, protect
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab

pytestmark = pytest.mark.lab

HOW = "xen-remus"
# The smallest guest the lab boots (lab/guest.py: Debian's kernel needs 96 MiB for PV).
SPECS = [GuestSpec(name=f"mg{i}", ip=f"169.254.20.8{i}", mac=f"00:16:3e:00:00:8{i}")
         for i in (1, 2, 3)]
PORTS = {s.name: 8080 + i for i, s in enumerate(SPECS, 1)}
CLIENT_S = 900
FAILOVER_S = 300  # three failovers at once on B's two TCG vCPUs
RESUMED = re.compile(r"guest resumed from epoch (\d+) in ([0-9.]+) s")


def status_docs(host: Host, role: str) -> dict[str, dict[str, object]]:
    """`xen-remus status --json` on ``host``: its docs of ``role``, by domain."""
    r = host.run("python3 -m xen_remus status --json", timeout=120)
    assert r.ok, f"xen-remus status on {host.name}: {r.stdout}{r.stderr}"
    return {str(d["domain"]): d for d in json.loads(r.stdout) if d.get("role") == role}


@pytest.mark.lab(timeout=2700)
def test_three_guests_protected_at_once_fail_over_on_host_kill(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    names = [s.name for s in SPECS]
    recvs: dict[str, Job] = {}
    sends: dict[str, Job] = {}
    clients: dict[str, Job] = {}
    try:
        print()
        for spec in SPECS:
            took = guest.create(a, spec)
            print(f"[many] {spec.name} ({spec.memory} MiB) running on A after {took:.1f} s")
        # One after another: each initial copy has the link to itself (3-4 MB/s), while
        # the guests protected before it checkpoint.
        for spec in SPECS:
            t0 = time.monotonic()
            recvs[spec.name], sends[spec.name] = protect.protect(a, b, spec, HOW,
                                                                 port=PORTS[spec.name])
            sends[spec.name].wait_output(r"protecting", 300, stderr=True)
            print(f"[many] {spec.name}: initial copy committed on B after "
                  f"{time.monotonic() - t0:.1f} s")
        for spec in SPECS:
            clients[spec.name] = b.spawn(
                f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 {CLIENT_S}")
        for spec in SPECS:
            clients[spec.name].wait_output(r'"counter"', 120)
        time.sleep(10)  # all three checkpoint at once
        for name in names:
            assert not sends[name].done(), (f"protect of {name} ended early: "
                                             f"{sends[name].stderr()[-3000:]}")
        # Side by side: a status doc per guest and role, each its own file; an IFB each.
        prim, back = status_docs(a, "primary"), status_docs(b, "backup")
        for name in names:
            assert prim.get(name, {}).get("state") == "protecting", (name, prim.get(name))
            assert back.get(name, {}).get("committed") is not None, (name, back.get(name))
        files = {h.name: h.run("ls /run/xen-remus", timeout=30, check=True).stdout.split()
                 for h in (a, b)}
        for name in names:
            assert f"{name}.json" in files["A"], files
            assert f"{name}.backup.json" in files["B"], files
        ifbs = re.findall(r"xrifb\d+\.0[@:]", a.run("ip -o link show type ifb", timeout=30,
                                                    check=True).stdout)
        assert len(set(ifbs)) == len(SPECS), f"one IFB per guest's vif on A: {ifbs}"
        for name in names:
            acked = re.findall(r"(?m)^epoch \d+: .*$", sends[name].stderr())
            assert acked, f"no ACKed epoch for {name}: {sends[name].stderr()[-2000:]}"
            print(f"[many] {name}: {len(acked)} epochs ACKed so far; the last: {acked[-1]}")
        for h in (a, b):
            mem = h.run("free -m | sed -n 2p", timeout=30, check=True).stdout.split()
            print(f"[many] dom0 {h.name} memory (MiB): total {mem[1]}, used {mem[2]}, "
                  f"available {mem[-1]}")

        # Host A dies: each guest on its own to B.
        seen = {name: protect.Seen.by(clients[name]) for name in names}
        a.kill()
        t_kill = time.time()
        running = failover.wait_all_running(b, recvs, FAILOVER_S)
        print("[many] after the kill of A, running on B after (s): "
              + ", ".join(f"{n} {running[n]:.1f}" for n in names))
        for spec in SPECS:
            protect.check_resumed(b, spec, clients[spec.name], seen[spec.name], t_kill,
                                  running[spec.name], f"many: {spec.name}")
        for name in names:
            err = recvs[name].stderr()
            m = RESUMED.search(err)
            timeline = [ln for ln in err.splitlines() if "failover timeline" in ln]
            print(f"[many] {name}: running on B {running[name]:.1f} s after the kill; "
                  f"resumed from epoch {m[1] if m else '?'} (receiver: {m[2] if m else '?'} "
                  f"s); {timeline[-1].strip() if timeline else 'no timeline line'}")
            assert "Traceback" not in err, err[-3000:]
    finally:
        for h in (a, b):
            if h.alive():
                for name in names:
                    destroy(h, name)
                    destroy(h, f"{name}--incoming")
