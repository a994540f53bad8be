"""`migrate-receive -r --fence CMD` on real Xen (lab, two hosts; not in ci-tests.txt).

The A-B link is cut (A's NIC down) with both hosts alive, so B declares the primary dead:
1. The fence fails (`false`): B's copy stays paused, A runs on alone (unprotected), and
   only A's copy runs during the cut and after the link is back.
2. The fence is the lab's (lab/dom0tools/fence_xenlab: this machine kills A's QEMU, as
   a PDU would cut its power): B resumes the guest only once A is off; exactly one copy
   runs throughout, the same boot, its counter never back.
"""

from __future__ import annotations

import time

import pytest

from lab import guest, protect
from lab.cluster import FenceDesk
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab

pytestmark = pytest.mark.lab

CUT_S = 30
# A's NIC on the inter-host link (the virtio NIC in xenbr0, lab/dom0/init).
LINK_NIC = ("for n in /sys/class/net/*; do [ \"$(basename \"$(readlink -f $n/device/driver)\")\" "
            "= virtio_net ] && basename $n; done; true")
FENCE_LAB = "python3 /mnt/project/lab/dom0tools/fence_xenlab --action=off --plug=A"


def running(host: Host, name: str) -> bool:
    state = guest.domain_state(host, name) if host.alive() else None
    return state is not None and "p" not in state


def copies(a: Host, b: Host, name: str) -> list[str]:
    """The hosts on which the guest runs (unpaused)."""
    return [h.name for h in (a, b) if running(h, name)]


def fenced_protect(a: Host, b: Host, spec: GuestSpec, fence: str, port: int
                   ) -> tuple[Job, Job]:
    recv = b.spawn(protect.OURS_RECEIVER.format(port=port) + f" --fence '{fence}'")
    recv.wait_output(r"listening", 30, stderr=True)
    send = a.spawn(protect.OURS + f" -F -d -s '' {spec.name} 'socat - TCP:{b.ip}:{port}'")
    protect.wait_copy(b, spec, recv, send, port)
    return recv, send


def cut_link(a: Host, seconds: int) -> Job:
    nic = a.run(LINK_NIC, timeout=30, check=True).stdout.split()[0]
    return a.spawn(f"ip link set {nic} down && sleep {seconds}; ip link set {nic} up")


@pytest.mark.lab(timeout=2400)
def test_fence_decides_the_failover_on_a_cut_link() -> None:
    spec = GuestSpec(name="fc", kind="pv", ip="169.254.20.12", mac="00:16:3e:00:00:12")
    with Lab(2) as lab, FenceDesk(lab) as desk:
        a, b = lab.a, lab.b
        guest.create(a, spec)

        # 1. A fence that fails: B holds its copy paused, A goes on alone.
        recv, send = fenced_protect(a, b, spec, "false", 8021)
        cut = cut_link(a, CUT_S)
        seen: list[list[str]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < CUT_S + 5:
            seen.append(copies(a, b, spec.name))
            time.sleep(3)
        cut.wait(60).check()
        recv_err = recv.wait(120).stderr
        send_err = send.wait(120).stderr
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
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
        recv, send = fenced_protect(a, b, spec, FENCE_LAB, 8022)
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
