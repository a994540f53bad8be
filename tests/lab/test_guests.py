"""Guests of more than one vCPU, a 1 GiB guest and a guest below its maxmem, on real Xen.

- 2-vCPU PV and PVH guests protected A -> B (`xen-remus protect`, output commit), host A
  killed while a client in B's dom0 holds one TCP connection: the same guest runs on B,
  the counter never went back from the highest value the client saw, the connection
  survived, the memory pattern is intact, both vCPUs are online on B and the worker
  pinned to each keeps counting from where it was (a vCPU whose state was lost stops).
- A 1 GiB PV guest (a 128 MiB pattern), in a lab of its own whose host has room for the
  guest and its incoming copy: `xen-remus save` -> stock `xl restore`, then protect into
  a receiver on the same host and fail over; same boot, counter not back, pattern intact.
- A PV guest started below its maxmem (memory=96, maxmem=192): save -> stock restore;
  protected A -> B, ballooned up to 160 MiB while protected (Linux gives the new range a
  p2m page of its own: protect maps the p2m again), host A killed: the checks above.

None is in ci-tests.txt; `make lab-test-all` runs them. Timings are printed (-s).
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest, protect
from lab.build import pattern_sha256
from lab.guest import GuestSpec, destroy
from lab.host import Host
from lab.lab import Lab

pytestmark = pytest.mark.lab

XR = "python3 -m xen_remus"
# Room for a 1 GiB guest and its incoming copy beside dom0's 1 GiB (lab/host.py).
BIG_HOST_MIB = 4608


def check_pattern(h: Host, spec: GuestSpec) -> None:
    assert guest.pattern_sha(h, spec) == pattern_sha256(spec.pattern_lines), \
        f"{spec.name}: memory pattern changed"


def protect_and_kill(lab: Lab, spec: GuestSpec, port: int, tag: str,
                     while_protected: str = "") -> tuple[str, float]:
    """Protect ``spec`` (running on A) A -> B with output commit, run ``while_protected``
    in A's dom0 once it is protected, kill host A while a client on B holds a connection;
    kill_and_check. Returns the sender's stderr and the failover time."""
    a, b = lab.a, lab.b
    t0 = time.monotonic()
    recv, send = protect.protect(a, b, spec, "xen-remus", port=port)
    send.wait_output(r"protecting", 300, stderr=True)
    print(f"\n[{tag}] initial copy committed on B after {time.monotonic() - t0:.1f} s")
    if while_protected:
        a.run(while_protected, timeout=300, check=True)
    client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 150")
    client.wait_output(r'"counter"', 60)
    time.sleep(8)  # checkpoints flow
    assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
    took = protect.kill_and_check(a, b, spec, recv, client, tag)
    return send.stderr(), took


@pytest.mark.lab(timeout=1500)
@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_two_vcpu_guest_protect_and_host_kill(lab_two: Lab, kind: str) -> None:
    a, b = lab_two.a, lab_two.b
    n = {"pv": 1, "pvh": 2}[kind]
    spec = GuestSpec(name=f"smp{kind}", kind=kind, vcpus=2, ip=f"169.254.20.8{n}",
                     mac=f"00:16:3e:00:08:0{n}")
    try:
        guest.create(a, spec, timeout=300)
        on_a = guest.cpus_working(a, spec)
        print(f"\n[{kind}] 2 vCPUs on A: online {on_a.online}, worker counts {on_a.counts}")
        protect_and_kill(lab_two, spec, 8040 + n, f"{kind}-2vcpu")
        on_b = guest.cpus_working(b, spec)  # each worker counts on: both vCPUs run on B
        assert all(x >= y for x, y in zip(on_b.counts, on_a.counts, strict=True)), \
            f"a worker's count went back: {on_a.counts} on A, {on_b.counts} on B"
        check_pattern(b, spec)
        print(f"[{kind}] on B: online {on_b.online}, worker counts {on_b.counts}")
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)


def goes_on(h: Host, spec: GuestSpec, before: guest.Counter) -> guest.Counter:
    """Same boot, counter not back and moving, pattern intact."""
    after = guest.advancing(h, spec, before, timeout=120)
    check_pattern(h, spec)
    return after


@pytest.mark.lab(timeout=3600)
def test_one_gib_guest_save_restore_and_protect_on_one_host() -> None:
    spec = GuestSpec(name="big", memory=1024, pattern_mib=128, ip="169.254.20.83",
                     mac="00:16:3e:00:08:03")
    with Lab(1, mem_mib=BIG_HOST_MIB) as lab:
        h = lab.a
        path = f"/mnt/lab/{spec.name}.save"  # the share: dom0's own RAM holds 1 GiB less
        try:
            took = guest.create(h, spec, timeout=900)
            check_pattern(h, spec)
            before = guest.counter(h, spec)
            print(f"\n1 GiB PV guest up in {took:.0f} s; counter {before.value}")
            r = h.run(f"{XR} -v save {spec.name} {path}", timeout=1800)
            assert r.ok, f"xen-remus save failed:\n{r.stderr[-3000:]}"
            print(f"xen-remus save {r.seconds:.1f} s: {r.stderr.strip().splitlines()[-1]}")
            r = h.run(f"xl restore {path}", timeout=1800)
            assert r.ok, f"xl restore failed:\n{r.stderr[-3000:]}"
            print(f"xl restore {r.seconds:.1f} s")
            h.run(f"rm -f {path}", timeout=120)
            before = goes_on(h, spec, before)
            pidfile = "/tmp/big-protect.pid"
            t0 = time.monotonic()
            job = protect.protect_one_host(h, spec, pidfile)
            print(f"protect: initial copy committed after {time.monotonic() - t0:.1f} s")
            time.sleep(15)  # checkpoints flow
            assert not job.done(), f"protect ended early: {job.stderr()[-3000:]}"
            running = protect.fail_over_one_host(h, spec, job, pidfile)
            resumed = re.search(r"guest resumed from epoch (\d+)", job.stderr())
            assert resumed and int(resumed[1]) >= 1, job.stderr()[-3000:]
            after = goes_on(h, spec, before)
            print(f"failover on one host: running {running:.1f} s after protect was killed, "
                  f"from epoch {resumed[1]}; counter {before.value} -> {after.value}")
        finally:
            h.run(f"rm -f {path}; xl destroy {spec.name}--incoming 2>/dev/null; true",
                  timeout=120)
            destroy(h, spec.name)


def ballooned(name: str) -> GuestSpec:
    """Started with 96 MiB of a maxmem of 192: the rest of its p2m has no memory."""
    return GuestSpec(name=name, memory=96, maxmem=192, ip="169.254.20.84",
                     mac="00:16:3e:00:08:04")


def mem_mib(h: Host, name: str) -> int:
    """The domain's memory as `xl list` shows it (MiB)."""
    r = h.run(f"xl list {name} | tail -n +2", timeout=60, check=True)
    return int(r.stdout.split()[2])


@pytest.mark.lab(timeout=900)
def test_guest_below_maxmem_save_then_stock_restore(lab_one: Host) -> None:
    h, spec = lab_one, ballooned("bal")
    path = f"/tmp/{spec.name}.save"
    try:
        guest.create(h, spec, timeout=300)
        check_pattern(h, spec)
        before = guest.counter(h, spec)
        print(f"\nballooned guest: {mem_mib(h, spec.name)} MiB of maxmem {spec.maxmem}")
        r = h.run(f"{XR} -v save {spec.name} {path}", timeout=600)
        assert r.ok, f"xen-remus save failed:\n{r.stderr[-3000:]}"
        v = h.run(f"{XR} stream verify {path}", timeout=300)
        assert v.ok, f"stream verify:\n{v.stdout}\n{v.stderr}"
        r = h.run(f"xl restore {path}", timeout=600)
        assert r.ok, f"xl restore failed:\n{r.stderr[-3000:]}"
        goes_on(h, spec, before)
        mib = mem_mib(h, spec.name)
        print(f"restored: {mib} MiB")
        assert mib <= spec.memory + 4, f"the restored guest has {mib} MiB, it had {spec.memory}"
    finally:
        h.run(f"rm -f {path}", timeout=60)
        destroy(h, spec.name)


@pytest.mark.lab(timeout=1500)
def test_guest_below_maxmem_ballooned_up_while_protected_then_host_kill(lab_two: Lab
                                                                        ) -> None:
    a, b = lab_two.a, lab_two.b
    spec = ballooned("balp")
    up = 160
    # Until the guest has it: its balloon driver takes a moment (the lab runs under TCG).
    balloon = (f"xl mem-set {spec.name} {up}m && for i in $(seq 60); do "
               f"[ $(xl list {spec.name} | awk 'NR == 2 {{ print $3 }}') -ge {up - 4} ] && "
               "exit 0; sleep 1; done; xl list; exit 1")
    try:
        guest.create(a, spec, timeout=300)
        err, _ = protect_and_kill(lab_two, spec, 8044, "ballooned", while_protected=balloon)
        check_pattern(b, spec)
        print(f"[ballooned] on B: {mem_mib(b, spec.name)} MiB (B's configuration says "
              f"{spec.memory}: its balloon driver may give back what it took on A)")
        moved = re.findall(r"p2m generation .* p2m frames sent again", err)
        print(f"[ballooned] protect: {moved or 'no p2m rebuilt'}")
        assert moved, ("the guest ballooned up without rebuilding its p2m: this test no "
                       "longer exercises p2m_changes")
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)
