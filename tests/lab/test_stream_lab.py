"""Streams written by stock Xen 4.17 (`xl migrate`, `xl remus`) verify clean and dump
sensibly with `xen-remus stream`, run in dom0 (Debian's python3 and numpy). `xl save` files
are checked (lab/streams.py) in test_save.test_save_then_stock_restore, which CI runs, and
test_stock_baselines.test_xl_create_save_restore.

Captures are taken with `tee` in the transport, so they hold exactly what xl sent. A
migration capture also holds the xl handshake after the stream (the sender's "cleared to
unpause" message); the test checks those trailing bytes are exactly that message.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest
from lab.guest import GuestSpec, destroy
from lab.host import Host
from lab.lab import Lab
from lab.streams import STREAM, dump, pages

pytestmark = pytest.mark.lab

KA_EXEC = "python3 /mnt/project/lab/dom0tools/ka_exec.py"
GO_MESSAGE = b"domain is yours, you are cleared to unpause"  # tools/xl/xl_migrate.c


def verify_capture_with_trailer(host: Host, path: str, trailer: bytes) -> tuple[str, int]:
    """Verify a capture whose stream is followed by ``trailer``; return the summary and
    the stream's length."""
    r = host.run(f"{STREAM} verify --plain {path}", timeout=600)
    m = re.search(r"(\d+) bytes of data after the final END at offset (\d+)", r.stderr)
    assert r.rc == 1 and m, f"rc {r.rc}: {r.stdout}{r.stderr}"
    end = int(m.group(2))
    tail = host.run(f"tail -c +{end + 1} {path} | head -c {len(trailer)}", timeout=60,
                    check=True)
    assert tail.stdout == trailer.decode(), tail.stdout
    ok = host.run(f"head -c {end} {path} | {STREAM} verify --plain -", timeout=600)
    assert ok.rc == 0, ok.stderr
    return ok.stdout.strip(), end


@pytest.mark.lab(timeout=900)
def test_xl_migrate_stream(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="sm", ip="169.254.20.32", mac="00:16:3e:00:00:32")
    cap = "/tmp/sm.migrate"
    try:
        guest.create(a, spec, timeout=300)  # slow under TCG on a loaded machine
        recv = b.spawn("exec socat TCP-LISTEN:8031,reuseaddr EXEC:'xl migrate-receive'")
        time.sleep(2)
        r = a.run(f"xl migrate -s '' {spec.name} 'tee {cap} | socat - TCP:{b.ip}:8031'",
                  timeout=400)
        assert r.ok, f"xl migrate rc {r.rc}\n{r.stderr}\nreceiver:\n{recv.stderr()}"
        recv.wait(60)
        summary, end = verify_capture_with_trailer(a, cap, GO_MESSAGE)
        print(f"\nxl migrate capture: {summary}")
        assert summary.startswith("valid plain xl stream (x86 PV)")
        objs = dump(a, f"<(head -c {end} {cap})")
        assert pages(objs) >= spec.memory * 256 * 0.9
        assert [o["record"] for o in objs][-3:] == ["END", "END", "-- end of stream"]
    finally:
        a.run(f"rm -f {cap}", timeout=30)
        destroy(a, spec.name)
        destroy(b, spec.name)


def wait_stable(host: Host, path: str, timeout: float = 120.0) -> None:
    """Until ``path`` stops growing (the capturing tee got EOF), bounded."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        size = int(host.run(f"stat -c %s {path}", timeout=30, check=True).stdout)
        if size == last:
            return
        assert time.monotonic() < deadline, f"{path} still growing after {timeout:.0f} s"
        last = size
        time.sleep(3)


@pytest.mark.lab(timeout=900)
def test_xl_remus_stream(lab_two: Lab) -> None:
    """`xl remus` A->B into a receiver that tees; the sender is then killed (by pid)."""
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="sr2", ip="169.254.20.33", mac="00:16:3e:00:00:33")
    cap, pidf = "/tmp/sr2.remus", "/tmp/sr2.remus.pid"
    try:
        guest.create(a, spec, timeout=300)  # slow under TCG on a loaded machine
        recv = b.spawn(f"exec {KA_EXEC} 8032 sh -c 'tee {cap} | xl migrate-receive -r'")
        recv.wait_output(r"listening", 60, stderr=True)
        send = a.spawn(f"echo $$ > {pidf}; exec xl remus -F -n -d -i 200 -s '' {spec.name} "
                       f"'socat - TCP:{b.ip}:8032'")
        deadline = time.monotonic() + 400
        while guest.domain_state(b, f"{spec.name}--incoming") is None:
            assert not send.done(), f"xl remus ended: {send.stderr()[-2000:]}"
            assert time.monotonic() < deadline, "no backup copy on B"
            time.sleep(2)
        # B's "--incoming" domain appears when the stream starts: wait until the initial
        # copy (the guest's memory, at 3-4 MB/s on the lab link) is through, then for
        # some checkpoints (every 200 ms, slower under TCG).
        deadline = time.monotonic() + 400
        while int(b.run(f"stat -c %s {cap}", timeout=30, check=True).stdout) < \
                spec.memory * 1.05 * (1 << 20):
            assert not send.done(), f"xl remus ended: {send.stderr()[-2000:]}"
            assert time.monotonic() < deadline, "initial copy not through"
            time.sleep(3)
        time.sleep(20)
        a.run(f"kill -9 $(cat {pidf})", timeout=30)
        send.wait(60)
        wait_stable(b, cap)
        r = b.run(f"{STREAM} verify --checkpointed {cap}", timeout=600)
        print(f"\nxl remus capture: rc {r.rc} {r.stdout.strip()}{r.stderr.strip()}")
        objs = dump(b, cap, "--checkpointed")
        ends = [o["offset"] for o in objs if o["record"] == "-- end of epoch"]
        assert len(ends) >= 3, f"only {len(ends)} checkpoints"
        if r.rc != 0:
            # The sender died mid-epoch: only a truncation of the last epoch is allowed.
            assert "truncated" in r.stderr and f"(epoch {len(ends)})" in r.stderr, r.stderr
            r = b.run(f"head -c {ends[-1]} {cap} | {STREAM} verify --checkpointed -",
                      timeout=600)
        assert r.rc == 0, r.stderr
        assert r.stdout.startswith("valid checkpointed xl stream (x86 PV)"), r.stdout
        names = [(o["epoch"], o["record"]) for o in objs]
        # Every later epoch: its own pages and vCPU state, CHECKPOINT, CHECKPOINT_END.
        for e in range(1, len(ends)):
            recs = [n for ep, n in names if ep == e]
            assert recs[-3:] == ["CHECKPOINT", "CHECKPOINT_END", "-- end of epoch"], recs
            assert "X86_PV_VCPU_BASIC" in recs and "LIBXC_CONTEXT" not in recs
            assert "ImageHeader" not in recs
    finally:
        a.run(f"kill -9 $(cat {pidf}) 2>/dev/null; rm -f {pidf}", timeout=30)
        destroy(a, spec.name)
        destroy(b, spec.name)
        destroy(b, f"{spec.name}--incoming")
        b.run(f"rm -f {cap}", timeout=30)
