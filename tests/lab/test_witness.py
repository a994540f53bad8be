"""The witness on real Xen (lab, two hosts; not in ci-tests.txt): `xen-remus witness`
runs on this machine, each lab host reaches it through its own virtio-serial port
(Lab(witness=...), lab/host.py), apart from the A-B link.

1. A guest protected A -> B with --witness on both ends; the A-B link is cut for 30 s
   (A's NIC down: heartbeats stop both ways, both hosts still reach the witness). A loses
   its backup and takes the next generation from the witness; B's failover asks the
   witness for that generation and is refused: its copy stays paused. Exactly one copy
   runs during the cut and after the link is back.
2. B's held copy destroyed, protection again A -> B; A is killed (the witness reachable
   from B): once A's lease ran out, the witness gives B the next generation and the guest
   resumes on B.
"""

from __future__ import annotations

import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.host import Job
from lab.partition import CUT_S, copies, cut_link, watch
from lab.witness import WitnessedLab

pytestmark = pytest.mark.lab


def ended(job: Job, timeout: float) -> str:
    return job.wait(timeout).stderr  # wait() files the job's output away


@pytest.mark.lab(timeout=2400)
def test_witness_partition_then_host_kill(witnessed_lab: WitnessedLab) -> None:
    a, b = witnessed_lab.lab.a, witnessed_lab.lab.b
    spec = GuestSpec(name="wt", kind="pv", ip="169.254.20.9", mac="00:16:3e:00:00:09")
    try:
        guest.create(a, spec)
        recv, send = protect.protect(a, b, spec, "xen-remus-witness", port=8011)
        assert "granted" in witnessed_lab.said()

        # 1. The partition.
        cut = cut_link(a, CUT_S)
        seen = watch(a, b, spec.name, CUT_S + 5)
        cut.wait(60).check()
        send_err, recv_err = ended(send, 120), ended(recv, 120)
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
        assert "gave generation" in send_err and "UNPROTECTED" in send_err, send_err[-2000:]
        assert "refused generation" in recv_err and "stays paused" in recv_err, \
            recv_err[-2000:]
        assert guest.domain_state(b, f"{spec.name}--incoming") is not None  # held, paused
        time.sleep(10)  # the link is back: still only A
        assert copies(a, b, spec.name) == ["A"]
        assert witnessed_lab.proc.poll() is None

        # 2. A new protection, then A dies; B gets the guest once A's lease ran out.
        destroy(b, f"{spec.name}--incoming")
        recv, send = protect.protect(a, b, spec, "xen-remus-witness", port=8012)
        c = guest.counter(a, spec)
        a.kill()
        took = protect.wait_failover(b, spec, recv, timeout=180)
        err = recv.stderr()
        assert "granted generation" in err, err[-2000:]
        assert guest.counter(b, spec).bootid == c.bootid
        print(f"\nB resumed the guest {took:.1f} s after the kill was noticed; the "
              f"witness said:\n{witnessed_lab.said()[-1500:]}")
    finally:
        for h in (a, b):
            if h.alive():
                destroy(h, spec.name)
                destroy(h, f"{spec.name}--incoming")
