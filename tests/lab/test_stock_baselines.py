"""Stock Xen 4.17 baselines in the lab: the reference every later issue compares against.

Each test asserts what the guest shows (its counter and boot id over TCP and on its console,
its memory pattern), not only exit codes, and prints its timings.
"""

from __future__ import annotations

import time

import pytest

from lab import guest, protect
from lab.build import pattern_sha256
from lab.guest import GuestSpec, advancing, destroy
from lab.host import Host
from lab.lab import Lab
from lab.streams import check_xl_save_file

pytestmark = pytest.mark.lab


@pytest.mark.lab(timeout=600)
@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_xl_create_save_restore(lab_one: Host, kind: str) -> None:
    """xl create, xl save (the file is checked with our stream tool too), xl restore: one
    guest for the three baselines, since every guest boot costs 40-50 s under TCG."""
    spec = GuestSpec(name=f"c{kind}", kind=kind, ip="169.254.20.2")
    path = f"/tmp/{spec.name}.save"
    try:
        took = guest.create(lab_one, spec)
        print(f"\nxl create ({kind}, {spec.memory} MiB) to workload ready: {took:.1f} s")
        first = guest.counter(lab_one, spec)
        assert guest.pattern_sha(lab_one, spec) == pattern_sha256()
        before = advancing(lab_one, spec, first)
        console = guest.ticks(lab_one, spec.name)
        assert console and console[-1][1] == first.bootid, console[-3:]
        assert before.value - 3 <= console[-1][0] <= before.value + 3, (before, console[-1])

        r = lab_one.run(f"xl save {spec.name} {path}", timeout=300, check=True)
        assert guest.domain_state(lab_one, spec.name) is None
        check_xl_save_file(lab_one, path, kind, spec.memory)
        r2 = lab_one.run(f"xl restore {path}", timeout=300, check=True)
        print(f"xl save {r.seconds:.1f} s, xl restore {r2.seconds:.1f} s (incl. agent)")
        after = advancing(lab_one, spec, before)  # same boot id, counter kept going
        assert after.value < before.value + 60, f"counter jumped: {before} -> {after}"
        assert guest.pattern_sha(lab_one, spec) == pattern_sha256()
    finally:
        lab_one.run(f"rm -f {path}", timeout=30)
        destroy(lab_one, spec.name)


@pytest.mark.lab(timeout=400)
def test_xl_migrate_a_to_b(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="mg", ip="169.254.20.4", mac="00:16:3e:00:00:04")
    try:
        guest.create(a, spec)
        before = advancing(a, spec, guest.counter(a, spec))
        recv = b.spawn("exec socat TCP-LISTEN:8002,reuseaddr EXEC:'xl migrate-receive'")
        time.sleep(2)
        r = a.run(f"xl migrate -s '' {spec.name} 'socat - TCP:{b.ip}:8002'", timeout=240)
        assert r.ok, f"xl migrate rc {r.rc}\n{r.stderr}\nreceiver:\n{recv.stderr()}"
        print(f"\nxl migrate A->B ({spec.memory} MiB over the lab link): {r.seconds:.1f} s")
        recv.wait(30)
        assert guest.domain_state(a, spec.name) is None
        after = advancing(b, spec, before)
        assert guest.pattern_sha(b, spec) == pattern_sha256()
        assert guest.ticks(b, spec.name)[-1][1] == before.bootid
        print(f"counter {before.value} on A -> {after.value} on B, same boot {after.bootid}")
    finally:
        destroy(a, spec.name)
        destroy(b, spec.name)


@pytest.mark.lab(timeout=420)
def test_xl_remus_failover_on_host_kill(lab_two: Lab) -> None:
    """`xl remus -F -n -d` A->B, SIGKILL A's QEMU: the guest goes on on B, counter continuing.

    Stock xl's backup fails over only when its socket errors: the receiver's socket gets TCP
    keepalive (lab/dom0tools/ka_exec.py) so a dead primary is noticed (LAB-NOTES 20).
    """
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="rm", ip="169.254.20.5", mac="00:16:3e:00:00:05")
    try:
        guest.create(a, spec)
        t0 = time.monotonic()
        recv, send = protect.protect(a, b, spec, "xl", port=8003)
        print(f"\nbackup copy on B after {time.monotonic() - t0:.1f} s")
        time.sleep(8)  # some checkpoints
        assert not send.done(), f"xl remus ended early: {send.stderr()}"
        # From A's console, not over TCP: with xl remus checkpointing, a TCG guest is paused
        # most of the time and a fresh TCP exchange took over 50 s.
        before = guest.last_tick(a, spec.name)
        a.kill()
        print(f"killed host A at counter {before.value} (its console)")
        running = protect.wait_failover(b, spec, recv, timeout=90)
        after = guest.counter(b, spec)
        assert after.bootid == before.bootid, f"not the same guest: {before} vs {after}"
        # No output buffering (-n): A may have shown a value newer than the last checkpoint.
        assert after.value >= before.value - 5, f"counter went back: {before} -> {after}"
        later = advancing(b, spec, after)
        print(f"failover: guest running on B {running:.1f} s after the kill; counter "
              f"{before.value} on A -> {after.value} -> {later.value} on B")
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)
