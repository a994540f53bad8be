"""Our receiver (`xen-remus migrate-receive`) behind stock senders, on real Xen.

- stock `xl migrate` A -> our receiver on B: the guest runs on B, counter continuing;
- stock `xl remus -F -n -d` A -> our receiver on B, kill host A: the guest resumes on B;
- stock `xl remus` into our receiver through a relay that cuts the stream in the middle of
  an epoch: the guest resumes from the epoch before, and the log says which.
"""

from __future__ import annotations

import time

import pytest

from lab import guest, protect
from lab.build import pattern_sha256
from lab.failover import RECV, RESUMED, cut_and_fail_over, wait_running
from lab.guest import GuestSpec, advancing, destroy
from lab.host import Host
from lab.lab import Lab

pytestmark = pytest.mark.lab

@pytest.mark.lab(timeout=900)
@pytest.mark.parametrize("kind", ["pv", "hvm"])
def test_stock_migrate_a_to_our_receiver_on_b(lab_two: Lab, kind: str) -> None:
    """HVM: stock libxl puts QEMU's state in EMULATOR_CONTEXT after libxc's END; our
    receiver relays it to stock `xl migrate-receive`, which starts QEMU with it."""
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="rmg", kind=kind, ip="169.254.20.21", mac="00:16:3e:00:00:21")
    try:
        guest.create(a, spec, timeout=240)
        before = advancing(a, spec, guest.counter(a, spec))
        recv = b.spawn(f"exec socat TCP-LISTEN:8021,reuseaddr EXEC:'{RECV} -e'")
        time.sleep(2)
        r = a.run(f"xl migrate -s '' {spec.name} 'socat - TCP:{b.ip}:8021'", timeout=600)
        assert r.ok, f"xl migrate rc {r.rc}\n{r.stderr}\nour receiver:\n{recv.stderr()}"
        print(f"\nstock xl migrate A -> our receiver on B: {r.seconds:.1f} s")
        recv.wait(60)
        assert "Traceback" not in recv.stderr(), recv.stderr()
        assert guest.domain_state(a, spec.name) is None
        after = advancing(b, spec, before)
        assert guest.pattern_sha(b, spec) == pattern_sha256()
        print(f"counter {before.value} on A -> {after.value} on B, same boot {after.bootid}")
    finally:
        destroy(a, spec.name)
        destroy(b, spec.name)


@pytest.mark.lab(timeout=900)
@pytest.mark.parametrize("kind", ["pv", "hvm"])
def test_stock_remus_into_our_receiver_kill_host_a(lab_two: Lab, kind: str) -> None:
    """The receiver's socket has keepalive (ka_exec) like stock's baseline, and our receiver
    also gives up on a silent sender after --idle-timeout. HVM: each epoch carries QEMU's
    state between CHECKPOINT and CHECKPOINT_END; B's QEMU starts from the last one."""
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="rrm", kind=kind, ip="169.254.20.22", mac="00:16:3e:00:00:22")
    try:
        guest.create(a, spec, timeout=240)
        # Until B holds the whole initial copy (a kill before that has nothing to fail
        # over to: a kill 10 s after B's domain appeared found 17 MB there).
        recv, send = protect.protect(a, b, spec, "xl-ours", port=8022)
        time.sleep(10)  # some checkpoints
        assert not send.done(), f"xl remus ended: {send.stderr()}\n{recv.stderr()}"
        before = guest.last_tick(a, spec.name)  # console: see test_xl_remus_failover...
        a.kill()
        print(f"\nkilled host A at counter {before.value} (its console)")
        took = wait_running(b, spec.name, 120, recv)
        m = RESUMED.search(recv.stderr())
        assert m, recv.stderr()
        after = guest.counter(b, spec)
        assert after.bootid == before.bootid, f"not the same guest: {before} vs {after}"
        assert after.value >= before.value - 5, f"counter went back: {before} -> {after}"
        later = advancing(b, spec, after)
        print(f"failover: guest running on B {took:.1f} s after the kill (receiver: resumed "
              f"from epoch {m[1]}, sink failover {m[2]} s); counter {before.value} on A -> "
              f"{after.value} -> {later.value} on B")
        assert "Traceback" not in recv.stderr()
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)


@pytest.mark.lab(timeout=900)
def test_stream_cut_mid_epoch_resumes_from_previous_epoch(lab_one: Host) -> None:
    spec = GuestSpec(name="rct", ip="169.254.20.23", mac="00:16:3e:00:00:23")
    try:
        epoch, _ = cut_and_fail_over(lab_one, spec, epoch=5, into=3000)
        assert epoch == 5
    finally:
        destroy(lab_one, spec.name)
