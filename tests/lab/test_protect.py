"""`xen-remus protect` end to end on real Xen: a PV guest protected from host A to host B,
host A killed (SIGKILL of its QEMU), the guest goes on on B.

A client in B's dom0 holds one TCP connection to the guest's counter service from before
the kill to after the failover (lab/dom0tools/counter_client.py). Checked: same guest (boot
id), it runs on B, with output commit (no -n) the counter never goes back from the
highest value any client saw, the client's connection survives; the primary's stderr
shows per-epoch progress. The pipeline-N cases (--pipeline N) check the same with up to N
epochs awaiting their ACK at once, and that A holds a ring of N IFBs for the vif. Failover
time and what the client saw are printed.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab
from lab.partition import LINK_NIC

pytestmark = pytest.mark.lab

CLIENT = protect.COUNTER_CLIENT


# Seconds after the sender reports an ACKed epoch at which host A dies. Under TCG an epoch
# cycle after an ACK: the interval (0.2 s), the pause (guest suspended, ~0.4-0.9 s), the
# send (~0.2 s compressed, ~4 s with -u), the backup committing it (~0.5 s), its ACK.
MOMENTS = {"after-ack": 0.0, "in-pause": 0.4, "mid-send": 2.0}
COMMITTED = re.compile(r"epoch (\d+) committed")
HOLD_IFB = "xrhold"


def acked(send: Job) -> int:
    """The newest epoch the sender says the backup ACKed (-1: none yet)."""
    found = re.findall(r"^epoch (\d+): ", send.stderr(), re.M)
    return int(found[-1]) if found else -1


def hold_data_packets(nic: str) -> str:
    """Shell for B's dom0 that makes IPv4 packets of 64 bytes or more leaving ``nic`` (the
    ACKs and heartbeats; pure TCP ACKs are 40-52) go through a plug qdisc on an IFB,
    released for now; `plug block` on the IFB then holds them in one quick step. Built
    from the modules the lab's dom0 has (clsact, u32, mirred, ifb, plug): one u32 filter
    per length bit 6-15, since u32 matches a mask, not a range."""
    redirect = " && ".join(
        f"tc filter add dev {nic} egress protocol ip prio {bit} u32 "
        f"match u16 {1 << bit:#06x} {1 << bit:#06x} at 2 "
        f"action mirred egress redirect dev {HOLD_IFB}" for bit in range(6, 16))
    return (f"ip link add {HOLD_IFB} type ifb && ip link set {HOLD_IFB} up && "
            f"tc qdisc add dev {HOLD_IFB} root plug limit 10000000 && "
            f"tc qdisc change dev {HOLD_IFB} root plug release_indefinite && "
            f"tc qdisc add dev {nic} clsact && {redirect}")


def kill_at(moment: str, send: Job, b: Host, recv: Job) -> str:
    """Wait for the moment of the epoch cycle at which host A dies (the sender's stderr is
    read on the share from this side, within ~0.2 s). "steady": wherever the loop is.
    "before-ack": B's packets to A that carry data (the ACKs and heartbeats) are held
    until B has committed an epoch A has not had the ACK of; returns B's link NIC (to
    unplug). Pure TCP ACKs (IP length < 64) and ARP still flow: holding them too stops
    A's send after one congestion window (15 KB into an epoch)."""
    if moment == "steady":
        return ""
    if moment == "before-ack":
        nic = b.run(LINK_NIC, timeout=30, check=True).stdout.split()[0]
        b.run(hold_data_packets(nic), timeout=60, check=True)
        # Right after an ACK reached A, so that A's heartbeat timeout (6 s, counted from
        # the last word it had from B) does not pass before the kill: if it did, A would
        # go on unprotected and release the guest's held output (setting the hold up
        # has taken seconds).
        nxt = acked(send) + 1
        send.wait_output(rf"(?m)^epoch {nxt}: ", 120, stderr=True)
        b.run(f"tc qdisc change dev {HOLD_IFB} root plug block", timeout=30, check=True)
        deadline = time.monotonic() + 5
        while True:
            done = [int(e) for e in COMMITTED.findall(recv.stderr())]
            if done and done[-1] > acked(send):
                time.sleep(0.3)  # an ACK sent just before the block shows on A by then
                if done[-1] > acked(send):
                    assert "backup lost" not in send.stderr(), send.stderr()[-1500:]
                    return nic
            assert time.monotonic() < deadline, (
                f"B committed nothing new within 5 s of holding its packets (B: {done[-3:]},"
                f" A's last ACK: {acked(send)})")
            time.sleep(0.05)
    nxt = acked(send) + 1
    send.wait_output(rf"(?m)^epoch {nxt}: ", 120, stderr=True)  # the backup ACKed it
    time.sleep(MOMENTS[moment])
    return ""


def landed(recv_err: str) -> str:
    m = re.search(r"discarding partial epoch (\d+) \((\d+) bytes", recv_err)
    if m and int(m[2]) > 4096:  # less: a heartbeat or two after the last epoch
        return f"mid-epoch: B discarded {m[2]} bytes of epoch {m[1]}"
    if m:
        return f"between epochs (B had {m[2]} bytes after epoch {int(m[1]) - 1})"
    m = re.search(r"resuming from epoch (\d+)", recv_err)
    return f"at an epoch boundary (after epoch {m[1] if m else '?'})"


@pytest.mark.lab(timeout=1200)
@pytest.mark.parametrize("how,kind,moment", [
    ("xen-remus", "pv", "steady"), ("xen-remus-u", "pv", "steady"),
    ("xen-remus", "pv", "after-ack"), ("xen-remus", "pv", "in-pause"),
    ("xen-remus-u", "pv", "mid-send"), ("xen-remus-un", "pv", "mid-send"),
    ("xen-remus-n", "pv", "steady"), ("xen-remus-stock", "pv", "steady"),
    ("xen-remus", "pvh", "steady"), ("xen-remus-vv", "pv", "before-ack"),
    ("xen-remus-p2", "pv", "steady"), ("xen-remus-p3", "pv", "after-ack"),
    ("xen-remus", "hvm", "steady"),
], ids=["xen-remus", "xen-remus-u", "after-ack", "in-pause", "mid-send", "mid-send-n",
        "xen-remus-n", "xen-remus-stock", "xen-remus-pvh", "before-ack", "pipeline-2",
        "pipeline-3", "xen-remus-hvm"])
def test_protect_failover_on_host_kill(lab_two: Lab, how: str, kind: str, moment: str) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="pt", kind=kind, ip="169.254.20.7", mac="00:16:3e:00:00:07")
    try:
        guest.create(a, spec)
        t0 = time.monotonic()
        recv, send = protect.protect(a, b, spec, how, port=8005)
        send.wait_output(r"protecting", 240, stderr=True)  # epoch 0 committed on B
        print(f"\n[{how}] initial copy committed on B after {time.monotonic() - t0:.1f} s")
        client = b.spawn(f"exec python3 {CLIENT} {spec.ip} 7000 150")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        st = a.run(f"python3 -m xen_remus status --json {spec.name}", timeout=120)
        print(f"[{how}] xen-remus status on A: {st.stdout.strip()[:600]}")
        assert st.ok and '"protecting"' in st.stdout, st.stdout + st.stderr
        if m := re.fullmatch(r"xen-remus-p(\d)", how):  # a ring of one IFB per epoch
            ifbs = a.run("ip -o link show type ifb", timeout=30, check=True).stdout
            ring = re.findall(r"xrifb\d+\.0(?:-\d)?[@:]", ifbs)
            assert len(ring) == int(m[1]), f"IFBs for --pipeline {m[1]}: {ifbs}"
            assert f"pipeline depth {m[1]}" in st.stdout, st.stdout
            acks = [float(x) for x in re.findall(r"ack ([\d.]+) ms", send.stderr())[-20:]]
            print(f"[{how}] last ACK times (ms; the interval is 200): {acks}")
        nic = kill_at(moment, send, b, recv)
        seen = protect.Seen.by(client)
        before, top = seen.last, seen.top
        a.kill()
        t_kill = time.time()
        if nic:  # A is gone: B's held frames may go (to the guest, once it runs on B)
            b.run(f"tc qdisc del dev {nic} clsact; ip link del {HOLD_IFB}", timeout=30,
                  check=True)
        print(f"[{how}] killed host A; highest counter seen by clients {top}; A's last ACK: "
              f"epoch {acked(send)}")
        running = protect.wait_failover(b, spec, recv, timeout=240)
        after = guest.counter(b, spec)
        assert after.bootid == before.bootid, f"not the same guest: {before} vs {after}"
        time.sleep(6)
        held = protect.HeldConnection.of(client.output(), t_kill)
        print(f"[{how}] failover: guest running on B {running:.1f} s after the kill; counter "
              f"seen before the kill up to {top}, first on B {after.value}; client: "
              f"{held.text()}")
        print(f"[{how}] host A died {moment}, {landed(recv.stderr())}")
        if moment == "before-ack":  # B resumed from an epoch whose ACK A never had
            resumed = re.search(r"resuming from epoch (\d+)", recv.stderr())
            assert resumed and int(resumed[1]) > acked(send), recv.stderr()[-2000:]
        print(f"[{how}] receiver log tail:\n{recv.stderr()[-800:]}")
        if how not in ("xen-remus-n", "xen-remus-un"):  # output commit: nothing seen is lost
            protect.check_output_commit(top, after, held)
        later = guest.counter(b, spec)
        assert later.value > after.value and later.bootid == after.bootid
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)


@pytest.mark.lab(timeout=900)
def test_protect_host_kill_during_initial_copy(lab_two: Lab) -> None:
    """Host A dies before B has one whole copy: nothing to fail over to. B must say so and
    clean up (no half-built domain left), not hang or start a broken guest."""
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="pc", ip="169.254.20.8", mac="00:16:3e:00:00:08")
    p = protect.PROTECTORS["xen-remus"]
    try:
        guest.create(a, spec)
        recv = b.spawn(p.receiver.format(port=8006))
        recv.wait_output(r"listening", 30, stderr=True)
        send = a.spawn(p.sender.format(name=spec.name, bip=b.ip, port=8006))
        deadline = time.monotonic() + 120
        while guest.domain_state(b, f"{spec.name}--incoming") is None:
            assert not send.done() and time.monotonic() < deadline, send.stderr()[-2000:]
            time.sleep(2)
        time.sleep(20)  # well into the initial copy (96 MiB at 3-4 MB/s)
        assert "protecting" not in send.stderr(), "initial copy done already: too fast to test"
        a.kill()
        t_kill = time.monotonic()
        r = recv.wait(180)
        err = r.stderr
        print(f"\nkilled host A during the initial copy; B's receiver ended after "
              f"{time.monotonic() - t_kill:.1f} s, rc {r.rc}: {err.strip().splitlines()[-1:]}")
        assert r.rc != 0 and re.search(r"before any complete epoch|no complete epoch", err), \
            err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        deadline = time.monotonic() + 60
        while guest.domain_state(b, f"{spec.name}--incoming") is not None:
            assert time.monotonic() < deadline, "the half-received domain is left on B"
            time.sleep(2)
        assert guest.domain_state(b, spec.name) is None, "a guest was started on B"
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, f"{spec.name}--incoming")
        destroy(b, spec.name)
