"""`migrate-receive -r --fence CMD` on real Xen (lab, two hosts; not in ci-tests.txt).

The A-B link is cut (A's NIC down) with both hosts alive, so B declares the primary dead:
1. The fence fails (`false`): B's copy stays paused; A holds its output for as long as
   B could take to fence it (cli/protect_fence.py), then runs on alone (unprotected); only
   A's copy runs during the cut and after the link is back.
2. The fence is the lab's (lab/dom0tools/fence_xenlab: this machine kills A's QEMU, as
   a PDU would cut its power): B resumes the guest only once A is off; exactly one copy
   runs throughout, the same boot, its counter never back.
"""

from __future__ import annotations

import time

import pytest

from lab import guest
from lab.cluster import FenceDesk
from lab.guest import GuestSpec, destroy
from lab.lab import Lab
from lab.partition import CUT_S, copies, cut_link, running, watch
from lab.protect import FENCE_LAB, protect_fenced

pytestmark = pytest.mark.lab


@pytest.mark.lab(timeout=2400)
def test_fence_decides_the_failover_on_a_cut_link() -> None:
    spec = GuestSpec(name="fc", kind="pv", ip="169.254.20.12", mac="00:16:3e:00:00:12")
    with Lab(2) as lab, FenceDesk(lab) as desk:
        a, b = lab.a, lab.b
        guest.create(a, spec)

        # 1. A fence that fails: B holds its copy paused, A goes on alone.
        recv, send = protect_fenced(a, b, spec, "false", 8021)
        cut = cut_link(a, CUT_S)
        seen = watch(a, b, spec.name, CUT_S + 5)
        cut.wait(60).check()
        recv_err = recv.wait(120).stderr
        send_err = send.wait(120).stderr
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
        # A held its output while B might still fence it, then went on alone.
        assert "fences this host before it resumes its copy" in send_err, send_err[-2000:]
        assert "UNPROTECTED" in send_err, send_err[-2000:]
        assert "fencing the primary first" in recv_err, recv_err[-2000:]
        assert "exited with status 1" in recv_err and "stays paused" in recv_err, \
            recv_err[-2000:]
        assert guest.domain_state(b, f"{spec.name}--incoming") is not None  # held, paused
        time.sleep(10)  # the link is back: still only A
        assert copies(a, b, spec.name) == ["A"]
        assert not desk.done, desk.done
        print(f"\n[fence false] copies seen every 3 s during the cut: {len(seen)} x ['A']; "
              "B held its copy paused")

        # 2. The lab's fence: B resumes only once A is off.
        destroy(b, f"{spec.name}--incoming")
        recv, send = protect_fenced(a, b, spec, FENCE_LAB, 8022)
        c = guest.advancing(a, spec, guest.counter(a, spec))
        cut = cut_link(a, 120)  # A is fenced long before the link would come back
        t0 = time.monotonic()
        seen = []
        while not running(b, spec.name) and time.monotonic() - t0 < 240:
            seen.append(copies(a, b, spec.name))
            time.sleep(2)
        took = time.monotonic() - t0
        assert running(b, spec.name), f"not running on B {took:.0f} s after the cut: " \
            f"{recv.stderr()[-2000:]}"
        assert all(len(s) <= 1 for s in seen), seen
        assert not a.alive(), "B runs the guest but host A is still alive"
        fenced = [d for d in desk.done if d.get("action") == "off" and d.get("plug") == "A"]
        assert fenced, desk.done
        err = recv.stderr()
        assert "the primary is fenced" in err, err[-2000:]
        c2 = guest.advancing(b, spec, c, timeout=120)
        assert c2.bootid == c.bootid
        print(f"[fence lab] guest running on B {took:.1f} s after the cut began; A fenced "
              f"by {fenced[0].get('from')}; counter {c.value} on A -> {c2.value} on B; "
              f"copies seen every 2 s: {seen}")
