"""A replicated ext4 disk, the backup host killed: the guest goes on on A, unprotected.

As in test_disk_kill.py, the guest mounts ext4 on its replicated disk and writes
sequence-numbered, fsynced blocks (lab/guest/dseq); here the client holding one TCP
connection to it, told which number is durable, runs in A's dom0. Host B is killed
(SIGKILL of its QEMU, no word on the link) under steady writes. Then:

- protect on A notices B's silence (the heartbeat timeout) and exits 3, "backup lost"
  (README: the guest runs here unprotected; BackupLost, not ReplicaLost: A's disk
  daemon is fine), saying UNPROTECTED, without a traceback;
- the guest runs on A, not paused, and its held output is released: the client's one
  connection survives and is told newer durable numbers after protect exited;
- A's disk daemon ended the replication and serves the disk on, locally: the guest's
  writes and fsyncs go on (those newer numbers are durable ones);
- the guest checks its disk against its in-memory log, unmounts it; once it is destroyed,
  in A's dom0, every number the client was told is in the image's sequence file and
  `fsck.ext4 -fn` finds the file system clean.

One lab of two hosts (B's kill ends it): about 4-5 min on an idle machine; bounded at
20 min. Not in ci-tests.txt (written, not yet run on real Xen).
"""

from __future__ import annotations

import time

import pytest

from lab import disk, guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab
from tests.lab.test_disk_kill import DURABLE_PORT, IMAGE, MIB, STEADY_S, ask, told

pytestmark = pytest.mark.lab

PORT = 8015
EXIT_UNPROTECTED = 3  # cli/protect.py: backup lost, the guest runs here unprotected
LOST_WITHIN_S = 120  # B's silence noticed (6 s heartbeat timeout) and protect's exit
AFTER_S = 8.0  # of replies from A after protect exited


@pytest.mark.lab(timeout=1200)
def test_ext4_disk_backup_kill_the_guest_goes_on_on_a(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="dkb", ip="169.254.20.37", mac="00:16:3e:00:00:37",
                     disk=disk.spec_line(IMAGE), cmdline="xenlab_disk=ext4")
    for h in (a, b):
        disk.install(h)
    disk.make_ext4_image(a, IMAGE, MIB)
    disk.copy_image(a, b, IMAGE)  # a pre-seeded replica: a short synchronisation
    try:
        guest.create(a, spec, timeout=300)
        guest.wait_console(a, spec.name, r"XRGUEST dseq start", 120)
        recv, send = protect.protect(a, b, spec, "xen-remus-disk", port=PORT)
        send.wait_output(r"protecting", 300, stderr=True)
        client = a.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} {DURABLE_PORT} 900")
        client.wait_output(r'"durable"', 90)
        time.sleep(STEADY_S)
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        before, _ = told(client)
        assert before, f"no durable number told before the kill: {client.output()[-2000:]}"
        b.kill()
        t_kill = time.time()
        r = send.wait(LOST_WITHIN_S)
        t_exit = time.time()
        at_exit = len(protect.client_events(client.output()))  # dom0's clock is not ours
        print(f"\nkilled host B with {max(before)} told durable; protect exited {r.rc} "
              f"{t_exit - t_kill:.1f} s later: {r.stderr.strip().splitlines()[-2:]}")
        assert r.rc == EXIT_UNPROTECTED, r.stderr[-3000:]
        assert "backup lost" in r.stderr and "UNPROTECTED" in r.stderr, r.stderr[-3000:]
        assert "replication of disk" not in r.stderr, "a disk's failure, not B's silence"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        state = guest.domain_state(a, spec.name)
        assert state is not None and state[2] != "p", f"{spec.name} on A: {state}"
        # Output released, disk served locally: newer durable numbers on the one connection.
        time.sleep(AFTER_S)
        events = protect.client_events(client.output())
        broke = [e for e in events if e.get("event") in ("closed", "error")]
        after = [int(e["durable"]) for e in events[at_exit:] if "durable" in e]
        held = f"broke: {broke}" if broke else "held"
        print(f"client: {len(after)} durable numbers told after protect exited, up to "
              f"{max(after, default=None)}; connection {held}")
        assert not broke, broke
        assert after and max(after) > max(before), "no newer durable number from A"
        logs = "".join(p.read_text(errors="replace")
                       for p in a.xenlog.glob("xen-remus-disk-*.log"))
        assert "replication ended" in logs and "serving locally" in logs, logs[-2000:]
        verdict = ask(a, spec, "verify", "verify ")
        print(f"guest: {verdict}")
        assert verdict.startswith("verify ok"), verdict
        gone = ask(a, spec, "umount", "umount ")
        assert gone.startswith("umount ok"), gone
        numbers, boots = told(client)
        assert len(boots) == 1, f"told by boots {boots}"
        destroy(a, spec.name)
        a.run("for i in $(seq 60); do ls /run/xen-remus/disk/*.pid >/dev/null 2>&1 || "
              "exit 0; sleep 1; done; exit 1", timeout=90, check=True)  # the server stopped
        disk.ext4_seq_blocks(a, IMAGE).check_told(numbers, boots.pop())
        report = disk.fsck(a, IMAGE)
        print(f"A's image: every one of {len(numbers)} told numbers (up to {max(numbers)}) "
              f"on disk; fsck.ext4 -fn clean: {report.strip().splitlines()[-1]}")
    finally:
        if a.alive():
            destroy(a, spec.name)
