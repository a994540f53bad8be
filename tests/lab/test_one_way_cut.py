"""The A-B link cut in one direction only for 30 s, both hosts alive, on real Xen (lab,
two hosts; not in ci-tests.txt): with the fence hook, and with the witness.

``direction`` "A->B": what A sends on the link is dropped (a pfifo of limit 0 as the root
qdisc of A's link NIC, lab/partition.py), what B sends still reaches A; "B->A" the
other way round. Clients in both dom0s hold one connection each to the guest.

What each side sees: the channel is one TCP connection, and TCP needs both directions.
With A->B dropped, B receives nothing more from A; A still receives what B sends, but its
acknowledgements never reach B, so after one retransmission timeout B sends nothing new
(only retransmissions of the heartbeat A already has) and A hears nothing more either.
B->A dropped is the mirror image: A's writes go unacknowledged, and within a fraction of
a second B receives nothing new. (Measured on this machine with a veth pair in a network
namespace: each side's last new bytes came within 1.5 s of the cut.) So both ends are
silent to each other and each declares the other dead after the heartbeat timeout, as in
a cut both ways (tests/lab/test_fence.py, test_witness.py); the gate decides:

- fence `false`: B's fence fails, its copy stays paused (it says so); A holds its output
  for B's heartbeat timeout + fence timeout + margin (cli/protect_fence.py: B could still
  fence it and resume), then goes on alone (it says so). One copy, A's, throughout.
- the lab's fence (A powered off through the share, not the link): B resumes only once A
  is off. A releases nothing once it lost B (it holds its output: killed during the hold),
  so the first counter on B is at least every counter any client saw from A.
- the witness (both hosts reach it by virtio-serial, not the link): A claims the next
  generation and goes on; B's failover is refused and its copy stays paused.

Every client's counter never goes back and keeps its boot id.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from lab import guest, protect
from lab.cluster import FenceDesk
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab
from lab.partition import CUT_S, copies, cut_one_way, running, watch
from lab.witness import WitnessedLab

pytestmark = pytest.mark.lab

DIRECTIONS = ["A->B", "B->A"]


def spec_for(direction: str) -> GuestSpec:
    return GuestSpec(name="ow" + direction.replace("->", "").lower(), ip="169.254.20.14",
                     mac="00:16:3e:00:00:14")


def clients(a: Host, b: Host, spec: GuestSpec, seconds: int) -> dict[str, Job]:
    """One client per dom0, each holding one connection to the guest (on A now)."""
    jobs = {h.name: h.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} "
                            f"{guest.COUNTER_PORT} {seconds}") for h in (a, b)}
    for job in jobs.values():
        job.wait_output(r'"counter"', 90)
    return jobs


def replies(job: Job) -> list[dict[str, Any]]:
    return [e for e in protect.client_events(job.output()) if "counter" in e]


def check_never_back(jobs: dict[str, Job]) -> str:
    """Each client's counter never went back, one boot throughout; a line saying so."""
    said = []
    for name, job in jobs.items():
        r = replies(job)
        back = [(x["counter"], y["counter"]) for x, y in zip(r, r[1:], strict=False)
                if y["counter"] < x["counter"]]
        assert not back, f"the client in {name}'s dom0 saw the counter go back: {back}"
        assert len({e["bootid"] for e in r}) == 1, f"client in {name}: {r[:1]} .. {r[-1:]}"
        gap = max((y["t"] - x["t"] for x, y in zip(r, r[1:], strict=False)), default=0.0)
        said.append(f"{name}: {len(r)} replies, {r[0]['counter']}..{r[-1]['counter']}, "
                    f"longest silence {gap:.1f} s")
    return "; ".join(said)


def dropped(cut: Job) -> str:
    """The drop counts the cut's `tc -s qdisc show` printed (before, after)."""
    return ", ".join(re.findall(r"dropped \d+", cut.output())) or "none shown"


@pytest.mark.lab(timeout=2400)
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["a-to-b", "b-to-a"])
def test_one_way_cut_with_the_fence(direction: str) -> None:
    spec = spec_for(direction)
    with Lab(2) as lab, FenceDesk(lab) as desk:
        a, b = lab.a, lab.b
        guest.create(a, spec)

        # 1. A fence that fails: B holds its copy paused; A holds its output, then goes on.
        recv, send = protect.protect_fenced(a, b, spec, "false", 8041)
        jobs = clients(a, b, spec, 300)
        time.sleep(3)
        top_before = max(e["counter"] for e in replies(jobs["A"]))
        cut = cut_one_way(a, b, direction, CUT_S)
        seen = watch(a, b, spec.name, CUT_S + 5)
        cut.wait(60).check()
        recv_err = recv.wait(120).stderr
        send_err = send.wait(180).stderr  # A's hold ends some 40 s after it lost B
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
        assert "fencing the primary first" in recv_err, recv_err[-2000:]
        assert "exited with status 1" in recv_err and "stays paused" in recv_err, \
            recv_err[-2000:]
        assert "backup lost" in send_err, send_err[-2000:]
        assert "fences this host before it resumes its copy" in send_err, send_err[-2000:]
        assert "UNPROTECTED" in send_err, send_err[-2000:]
        assert guest.domain_state(b, f"{spec.name}--incoming") is not None  # held, paused
        after = watch(a, b, spec.name, 15)  # the link is back, A's hold is over
        assert all(s == ["A"] for s in after), after
        guest.advancing(a, spec, guest.counter(a, spec))
        deadline = time.monotonic() + 60  # the held replies, then the client's backoff
        while replies(jobs["A"])[-1]["counter"] <= top_before and \
                time.monotonic() < deadline:
            time.sleep(2)
        said = check_never_back(jobs)
        assert replies(jobs["A"])[-1]["counter"] > top_before, \
            "the client in A's dom0 got no reply after the cut: A's output never resumed"
        assert not desk.done, desk.done
        print(f"\n[{direction}, fence false] copies every 3 s during the cut: {seen}, after: "
              f"{after}; cut {dropped(cut)}; clients: {said}")

        # 2. The lab's fence: B resumes only once A is off; A released nothing once it
        # lost B.
        destroy(b, f"{spec.name}--incoming")
        recv, send = protect.protect_fenced(a, b, spec, protect.FENCE_LAB, 8042)
        jobs = clients(a, b, spec, 400)
        cut = cut_one_way(a, b, direction, CUT_S)
        t0 = time.monotonic()
        seen = []
        while not running(b, spec.name) and time.monotonic() - t0 < 240:
            seen.append(copies(a, b, spec.name))
            time.sleep(2)
        took = time.monotonic() - t0
        assert running(b, spec.name), f"not running on B {took:.0f} s after the cut: " \
            f"{recv.stderr()[-2000:]}"
        first_on_b = guest.counter(b, spec)
        assert all(len(s) <= 1 for s in seen), seen
        assert not a.alive(), "B runs the guest but host A is still alive"
        assert any(d.get("action") == "off" and d.get("plug") == "A" for d in desk.done), \
            desk.done
        err = recv.stderr()
        assert "the primary is fenced" in err, err[-2000:]
        a_err = send.stderr()  # what A's protect said before it was powered off
        # Once it lost B it held its output (protect_fence.py: longer than B's fence
        # took), so it never went on alone.
        assert "UNPROTECTED" not in a_err, a_err[-2000:]
        top_a = max(e["counter"] for e in replies(jobs["A"]))
        assert first_on_b.bootid == replies(jobs["A"])[-1]["bootid"]
        assert first_on_b.value >= top_a, \
            f"a client saw {top_a} from A, B resumed at {first_on_b.value}: {a_err[-1500:]}"
        later = guest.advancing(b, spec, first_on_b, timeout=120)
        deadline = time.monotonic() + 60  # the client in B retransmits with a backoff
        while replies(jobs["B"])[-1]["counter"] < first_on_b.value and \
                time.monotonic() < deadline:
            time.sleep(2)
        said = check_never_back(jobs)
        assert replies(jobs["B"])[-1]["counter"] >= first_on_b.value, \
            "the client in B's dom0 saw no reply from B's copy"
        if direction == "B->A":
            cut.wait(120)  # B's egress back before the lab goes (A's cut died with A)
        print(f"[{direction}, lab fence] running on B {took:.1f} s after the cut; A said: "
              f"{[ln for ln in a_err.splitlines() if 'xen-remus protect' in ln][-3:]}; "
              f"highest counter from A {top_a}, first on B {first_on_b.value}, then "
              f"{later.value}; copies every 2 s: {seen}; clients: {said}")


@pytest.mark.lab(timeout=1800)
@pytest.mark.parametrize("direction", DIRECTIONS, ids=["a-to-b", "b-to-a"])
def test_one_way_cut_with_the_witness(direction: str, witnessed_lab: WitnessedLab) -> None:
    a, b = witnessed_lab.lab.a, witnessed_lab.lab.b
    spec = spec_for(direction)
    try:
        guest.create(a, spec)
        recv, send = protect.protect(a, b, spec, "xen-remus-witness", port=8043)
        jobs = clients(a, b, spec, 300)
        cut = cut_one_way(a, b, direction, CUT_S)
        seen = watch(a, b, spec.name, CUT_S + 5)
        cut.wait(60).check()
        send_err, recv_err = send.wait(120).stderr, recv.wait(180).stderr
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
        assert "gave generation" in send_err and "UNPROTECTED" in send_err, send_err[-2000:]
        assert "refused generation" in recv_err and "stays paused" in recv_err, \
            recv_err[-2000:]
        assert guest.domain_state(b, f"{spec.name}--incoming") is not None  # held, paused
        after = watch(a, b, spec.name, 15)  # the link is back: still only A
        assert all(s == ["A"] for s in after), after
        guest.advancing(a, spec, guest.counter(a, spec))
        time.sleep(5)
        said = check_never_back(jobs)
        assert witnessed_lab.proc.poll() is None
        print(f"\n[{direction}, witness] copies every 3 s during the cut: {seen}, after: "
              f"{after}; cut {dropped(cut)}; clients: {said}; the witness said:\n"
              f"{witnessed_lab.said()[-1200:]}")
    finally:
        for h in (a, b):
            if h.alive():
                destroy(h, spec.name)
                destroy(h, f"{spec.name}--incoming")
