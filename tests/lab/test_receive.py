"""Our receiver (`xen-remus migrate-receive`) behind stock senders, on real Xen.

- stock `xl migrate` A -> our receiver on B: the guest runs on B, counter continuing;
- stock `xl remus -F -n -d` A -> our receiver on B, kill host A: the guest resumes on B;
- stock `xl remus` into our receiver through a relay that cuts the stream in the middle of
  an epoch: the guest resumes from the epoch before, and the log says which.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest, protect
from lab.build import pattern_sha256
from lab.guest import GuestSpec
from lab.host import Host, Job
from lab.lab import Lab
from tests.lab.test_stock_baselines import advancing, destroy

pytestmark = pytest.mark.lab

RECV = "python3 -m xen_remus migrate-receive"
RELAY = "python3 /mnt/project/tests/lab/receive_relay.py"
RESUMED = re.compile(r"guest resumed from epoch (\d+) in ([0-9.]+) s")


def wait_running(host: Host, name: str, timeout: float, why: Job) -> float:
    """Seconds until ``name`` runs unpaused on ``host`` (bounded)."""
    t0 = time.monotonic()
    while True:
        state = guest.domain_state(host, name)
        if state and "p" not in state:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, (
            f"{name} not running after {timeout} s (state {state})\n{why.stderr()}")
        time.sleep(1)


def wait_file(host: Host, path: str, timeout: float, why: Job) -> str:
    deadline = time.monotonic() + timeout
    while True:
        r = host.run(f"cat {path} 2>/dev/null", timeout=120)
        if r.rc == 0 and r.stdout.strip():
            return r.stdout.strip()
        assert not why.done(), f"sender ended early:\n{why.stderr()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s:\n{why.stderr()}"
        time.sleep(2)


@pytest.mark.lab(timeout=900)
def test_stock_migrate_a_to_our_receiver_on_b(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="rmg", ip="169.254.20.21", mac="00:16:3e:00:00:21")
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
def test_stock_remus_into_our_receiver_kill_host_a(lab_two: Lab) -> None:
    """The receiver's socket has keepalive (ka_exec) like stock's baseline, and our receiver
    also gives up on a silent sender after --idle-timeout."""
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="rrm", ip="169.254.20.22", mac="00:16:3e:00:00:22")
    try:
        guest.create(a, spec, timeout=240)
        # Until B holds the whole initial copy (a kill before that has nothing to fail
        # over to: run 20261126-040206 killed A 10 s after B's domain appeared, at 17 MB).
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


STOCK = "xl migrate-receive -r"


def cut_and_fail_over(host: Host, spec: GuestSpec, epoch: int, into: int,
                      recv: str = f"{RECV} -r", tag: str = "",
                      hang_after: float = 120.0) -> tuple[int | None, float]:
    """Stock `xl remus` on ``host`` into ``recv`` via a relay cutting ``into`` bytes past
    epoch ``epoch``; destroy the primary, end the stream; the backup must take over within
    ``hang_after`` s. Returns (the epoch our receiver says it resumed from, None for stock;
    seconds from the stream's end to a running backup)."""
    mark, rel, rpid = f"/tmp/cut{tag}", f"/tmp/release{tag}", f"/tmp/recv{tag}.pid"
    host.run(f"rm -f {mark} {rel} {rpid}", timeout=60)
    state = guest.domain_state(host, spec.name)
    if not state or "p" in state:  # else protect the guest again (the last failover's)
        host.run(f"xl destroy {spec.name} 2>/dev/null; true", timeout=60)
        guest.create(host, spec, timeout=240)
    before = guest.counter(host, spec)
    send = host.spawn(f"exec xl remus -F -n -d -i 200 -s '' {spec.name} "
                      f"'{RELAY} --epoch {epoch} --into {into} --mark {mark} --release {rel} "
                      f"--pidfile {rpid} -- {recv}'")
    cut = wait_file(host, mark, 400, send)
    whole = int(re.search(r"last whole epoch (\d+)", cut)[1])  # type: ignore[index]
    # The link is dead (the sender blocks mid-checkpoint). The primary goes away first
    # (localhost: the backup can take the name only then), then the stream ends.
    host.run(f"xl destroy {spec.name}", timeout=120, check=True)
    t0 = time.monotonic()
    host.run(f"touch {rel}", timeout=120, check=True)
    try:
        wait_running(host, spec.name, hang_after, send)
        took = time.monotonic() - t0
    except AssertionError:
        # Leave evidence of what the receiver was doing, then clear the host for the next run.
        diag = host.run(f"p=$(cat {rpid}); ps -eo pid,ppid,stat,pcpu,wchan:24,args | "
                        "grep -E 'xl|save-helper|receive' | grep -v grep; "
                        "for q in $p $(pgrep -P $p); do echo \"== $q\"; "
                        "cat /proc/$q/wchan; echo; ls -l /proc/$q/fd; done; "
                        "xl list", timeout=60)
        print(f"\nHANG: {cut}; no running guest {hang_after:g} s after the stream ended\n"
              f"{diag.stdout}\n{send.stderr()[-3000:]}")
        host.run(f"kill -9 $(cat {rpid}) 2>/dev/null; sleep 1; "
                 f"xl destroy {spec.name}--incoming 2>/dev/null; "
                 f"xl destroy {spec.name} 2>/dev/null; true", timeout=90)
        raise
    if recv != STOCK:  # the receiver's log goes to the sender's stderr
        send.wait_output(RESUMED.pattern, 60, stderr=True)
    err = send.stderr()
    m = RESUMED.search(err)
    if recv != STOCK:
        assert m, err
        assert int(m[1]) == whole, f"relay cut after epoch {whole}, receiver says {m[1]}:\n{err}"
        assert f"resuming from epoch {whole}" in err and "Traceback" not in err, err
    after = guest.counter(host, spec)
    assert after.bootid == before.bootid, f"not the same guest: {before} vs {after}"
    assert after.value >= before.value, f"counter went back: {before} -> {after}"
    advancing(host, spec, after)
    said = f"receiver resumed from epoch {m[1]}, sink failover {m[2]} s" if m else "stock"
    print(f"\n{cut}; {said}; guest running {took:.1f} s after the stream ended; counter "
          f"{before.value} -> {after.value}")
    return (int(m[1]) if m else None), took


@pytest.mark.lab(timeout=900)
def test_stream_cut_mid_epoch_resumes_from_previous_epoch(lab_one: Host) -> None:
    spec = GuestSpec(name="rct", ip="169.254.20.23", mac="00:16:3e:00:00:23")
    try:
        epoch, _ = cut_and_fail_over(lab_one, spec, epoch=5, into=3000)
        assert epoch == 5
    finally:
        destroy(lab_one, spec.name)
