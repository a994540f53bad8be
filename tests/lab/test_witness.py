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

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CUT_S = 30
# A's NIC on the inter-host link (the virtio NIC in xenbr0, lab/dom0/init).
LINK_NIC = ("for n in /sys/class/net/*; do [ \"$(basename \"$(readlink -f $n/device/driver)\")\" "
            "= virtio_net ] && basename $n; done; true")


@pytest.fixture
def witnessed_lab() -> Iterator[tuple[Lab, subprocess.Popen[bytes], str]]:
    """A witness on this machine and a two-host lab whose hosts reach it."""
    tmp = tempfile.mkdtemp(prefix="xr-witness-", dir="/tmp")  # short: a socket path
    key = secrets.token_hex(16)
    key_path = os.path.join(tmp, "key")
    with open(key_path, "w") as f:
        f.write(key)
    os.chmod(key_path, 0o600)
    sock = Path(tmp) / "w.sock"
    log = open(os.path.join(tmp, "witness.log"), "wb")  # closed below
    proc = subprocess.Popen([sys.executable, "-m", "xen_remus", "-v", "witness", "--listen",
                             f"unix:{sock}", "--key-file", key_path, "--state-dir",
                             os.path.join(tmp, "state")],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, "the witness exited"
            assert time.monotonic() < deadline, "the witness did not listen within 30 s"
            time.sleep(0.2)
        with Lab(2, witness=sock) as lab:
            for h in (lab.a, lab.b):
                h.run(f"umask 077 && printf %s {key} > {protect.WITNESS_KEY} && "
                      "ls -l /dev/virtio-ports/", timeout=60, check=True)
            yield lab, proc, os.path.join(tmp, "witness.log")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        print(f"witness log: {os.path.join(tmp, 'witness.log')}")


def running(host: Host, name: str) -> bool:
    state = guest.domain_state(host, name)
    return state is not None and "p" not in state


def copies(a: Host, b: Host, name: str) -> list[str]:
    """The hosts on which the guest runs (unpaused)."""
    return [h.name for h in (a, b) if running(h, name)]


def ended(job: Job, timeout: float) -> str:
    return job.wait(timeout).stderr  # wait() files the job's output away


@pytest.mark.lab(timeout=2400)
def test_witness_partition_then_host_kill(
        witnessed_lab: tuple[Lab, subprocess.Popen[bytes], str]) -> None:
    lab, witness, wlog = witnessed_lab
    a, b = lab.a, lab.b
    spec = GuestSpec(name="wt", kind="pv", ip="169.254.20.9", mac="00:16:3e:00:00:09")
    try:
        guest.create(a, spec)
        recv, send = protect.protect(a, b, spec, "xen-remus-witness", port=8011)
        assert "granted" in Path(wlog).read_text(errors="replace")

        # 1. The partition.
        nic = a.run(LINK_NIC, timeout=30, check=True).stdout.split()[0]
        cut = a.spawn(f"ip link set {nic} down && sleep {CUT_S}; ip link set {nic} up")
        t0 = time.monotonic()
        seen: list[list[str]] = []
        while time.monotonic() - t0 < CUT_S + 5:
            seen.append(copies(a, b, spec.name))
            time.sleep(3)
        cut.wait(60).check()
        send_err, recv_err = ended(send, 120), ended(recv, 120)
        assert all(s == ["A"] for s in seen), (seen, send_err[-2000:], recv_err[-2000:])
        assert "gave generation" in send_err and "UNPROTECTED" in send_err, send_err[-2000:]
        assert "refused generation" in recv_err and "stays paused" in recv_err, \
            recv_err[-2000:]
        assert guest.domain_state(b, f"{spec.name}--incoming") is not None  # held, paused
        time.sleep(10)  # the link is back: still only A
        assert copies(a, b, spec.name) == ["A"]
        assert witness.poll() is None

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
              f"witness said:\n{Path(wlog).read_text(errors='replace')[-1500:]}")
    finally:
        for h in (a, b):
            if h.alive():
                destroy(h, spec.name)
                destroy(h, f"{spec.name}--incoming")
