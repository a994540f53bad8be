"""A crashed primary stays harmless, on real Xen: `xen-remus protect` A->B SIGKILLed (host
A alive) between two epochs or while the guest is suspended for a checkpoint.

Its supervisor pauses the guest on A within a bounded time (the kill closes its pipe); the
guest's held output is never released (nobody releases it); B fails over from its last
committed epoch. Checked: A's copy is paused and stays so after B resumed (one copy runs),
and a client holding one TCP connection to the guest from B's dom0 never sees its counter go
back and keeps its connection.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab

pytestmark = pytest.mark.lab

KILL = "pkill -9 -f 'xen_remus -v protect'"
STATE = "xl list {name} | awk 'NR==2 {{print $5}}'"
# In the pause: A's dom0 polls the guest's state and kills protect once it reads suspended.
IN_PAUSE = ("end=$(( $(date +%s) + 60 )); while [ $(date +%s) -lt $end ]; do "
            "s=$(" + STATE + "); case $s in *s*) " + KILL + "; echo \"STATE $s\"; exit 0;; "
            "esac; done; echo 'STATE never-suspended'; exit 1")
# Between epochs (-i 2000: ~1 s idle after each ACK): the state read, then the kill.
BETWEEN = "s=$(" + STATE + "); " + KILL + "; echo \"STATE $s\""


@pytest.mark.lab(timeout=1200)
@pytest.mark.parametrize("moment", ["between-epochs", "in-pause"])
def test_protect_sigkilled_leaves_one_copy(lab_two: Lab, moment: str) -> None:
    a, b = lab_two.a, lab_two.b
    # A name per moment: the lab's hosts are shared by both, and after the first B holds
    # a failover generation record for its guest, which refuses an older protection of it.
    spec = GuestSpec(name=f"pk{moment[:2]}", ip="169.254.20.9", mac="00:16:3e:00:00:09")
    how = "xen-remus"
    if moment == "between-epochs":
        how = "xen-remus-i2000"
        protect.PROTECTORS[how] = protect.Protector(
            receiver=protect.PROTECTORS["xen-remus"].receiver,
            sender=protect.PROTECTORS["xen-remus"].sender.replace(" protect ",
                                                                  " protect -i 2000 "))
    try:
        guest.create(a, spec)
        recv, send = protect.protect(a, b, spec, how, port=8009)
        send.wait_output(r"protecting", 240, stderr=True)
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 150")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow, the client's counter climbs
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        found = re.findall(r"^epoch (\d+): ", send.stderr(), re.M)
        nxt = int(found[-1]) + 1 if found else 1
        send.wait_output(rf"(?m)^epoch {nxt}: ", 60, stderr=True)  # a fresh ACK
        if moment == "between-epochs":
            time.sleep(0.3)
        r = a.run((BETWEEN if moment == "between-epochs" else IN_PAUSE).format(
            name=spec.name), timeout=120)
        t_kill = time.time()
        t0 = time.monotonic()
        assert r.ok, f"kill at {moment} failed: {r.stdout} {r.stderr}"
        state_at_kill = r.stdout.split("STATE", 1)[-1].strip()
        seen = protect.Seen.by(client)
        before, top = seen.last, seen.top
        # The supervisor pauses A's copy: bounded, and said in protect's stderr.
        paused_after = None
        while time.monotonic() - t0 < 60:
            st = guest.domain_state(a, spec.name) or ""
            if "p" in st:
                paused_after = time.monotonic() - t0
                break
            time.sleep(0.5)
        print(f"\n[{moment}] protect SIGKILLed (guest state then: {state_at_kill!r}); A's "
              f"copy paused {paused_after} s after; supervisor: "
              f"{[ln for ln in send.stderr().splitlines() if 'supervisor' in ln]}")
        assert paused_after is not None, f"A's copy not paused: {guest.domain_state(a, spec.name)}"
        if moment == "in-pause":
            assert "s" in state_at_kill
        else:
            assert "s" not in state_at_kill, f"not between epochs: {state_at_kill}"
        running = protect.wait_failover(b, spec, recv, timeout=240)
        after = guest.counter(b, spec)
        assert after.bootid == before.bootid
        a_state = guest.domain_state(a, spec.name) or ""
        assert "p" in a_state and "r" not in a_state, f"A's copy runs: {a_state}"
        time.sleep(6)
        held = protect.HeldConnection.of(client.output(), t_kill)
        print(f"[{moment}] guest running on B {running:.1f} s after the kill; A's copy "
              f"{a_state!r}; counter seen before up to {top}, first on B {after.value}; "
              f"client: {held.text()}")
        protect.check_output_commit(top, after, held)
        assert "p" in (guest.domain_state(a, spec.name) or ""), "A's copy unpaused"
    finally:
        destroy(a, spec.name)
        destroy(b, spec.name)
