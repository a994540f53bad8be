"""Failback on real Xen (lab, two hosts; not in ci-tests.txt): a guest protected A -> B by
`xen-remus protect` (output commit), host A killed, the guest goes on on B; then a fresh
host A (Lab.restart: a new dom0, nothing of the old one left), `xen-remus protect` run on
B protects the guest back to A, host B killed: the guest goes on on A.

At each kill a client in the surviving dom0 holds one TCP connection to the guest
(lab/dom0tools/counter_client.py): the same guest (boot id), its counter never back from
the highest value any client saw in either phase, the connection survives. Memory only
(-d -F): a fresh host A has no disk image left to resync, and failback does not yet use
the backup's own dirty bitmap (README, "Protecting a VM with a disk"). The times of each
phase are printed.
"""

from __future__ import annotations

import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab

pytestmark = pytest.mark.lab

HOW = "xen-remus"
PORT_AB, PORT_BA = 8071, 8072
CLIENT_S = 600  # each client outlives its phase; a host kill ends it anyway


@pytest.mark.lab(timeout=1800)
def test_failback_to_a_fresh_host_a(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="fb", ip="169.254.20.71", mac="00:16:3e:00:00:71")
    seen: list[int] = []
    try:
        guest.create(a, spec)
        bootid = guest.counter(a, spec).bootid

        # 1. A -> B, host A killed.
        t0 = time.monotonic()
        recv, send = protect.protect(a, b, spec, HOW, port=PORT_AB)
        send.wait_output(r"protecting", 240, stderr=True)
        print(f"\n[failback] A->B: initial copy committed on B after "
              f"{time.monotonic() - t0:.1f} s")
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 {CLIENT_S}")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow
        assert not send.done(), f"protect A->B ended early: {send.stderr()[-3000:]}"
        protect.kill_and_check(a, b, spec, recv, client, "failback: A->B, A killed")
        seen += [e["counter"] for e in protect.client_events(client.output())
                 if "counter" in e]
        print(f"[failback] B's receiver log tail:\n{recv.stderr()[-600:]}")

        # 2. A fresh host A; B protects the guest back to it.
        t0 = time.monotonic()
        a = lab_two.restart("A")
        print(f"[failback] fresh host A up after {time.monotonic() - t0:.1f} s")
        r = a.run(f"xl list {spec.name}; ls /var/lib/xen-remus", timeout=60)
        assert r.rc != 0 and not r.stdout.strip(), f"host A is not fresh: {r.stdout}"
        t0 = time.monotonic()
        recv, send = protect.protect(b, a, spec, HOW, port=PORT_BA)
        send.wait_output(r"protecting", 240, stderr=True)
        print(f"[failback] B->A: initial copy committed on A after "
              f"{time.monotonic() - t0:.1f} s")
        st = b.run(f"python3 -m xen_remus status --json {spec.name}", timeout=120)
        assert st.ok and '"protecting"' in st.stdout, st.stdout + st.stderr
        client = a.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 {CLIENT_S}")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)
        assert not send.done(), f"protect B->A ended early: {send.stderr()[-3000:]}"

        # 3. Host B killed: the guest goes on on A.
        protect.kill_and_check(b, a, spec, recv, client, "failback: B->A, B killed")
        seen += [e["counter"] for e in protect.client_events(client.output())
                 if "counter" in e]
        print(f"[failback] A's receiver log tail:\n{recv.stderr()[-600:]}")
        home = guest.counter(a, spec)
        print(f"[failback] the guest runs on A again: counter {home.value}, the clients saw "
              f"up to {max(seen)} across both failovers")
        assert home.bootid == bootid, f"not the guest first created on A ({bootid}): {home}"
        assert home.value >= max(seen), f"counter went back: saw {max(seen)}, A has {home}"
    finally:
        for h in (lab_two.a, lab_two.b):
            if h.alive():
                destroy(h, spec.name)
                destroy(h, f"{spec.name}--incoming")
