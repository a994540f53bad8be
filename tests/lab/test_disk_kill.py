"""A replicated ext4 disk, host A killed at five moments: what B resumes is consistent.

The guest mounts ext4 on its replicated disk (made by mkfs.ext4 in A's dom0) and writes
sequence-numbered 4 KiB blocks into a file, each fsynced; a client in B's dom0 holds one
TCP connection to it and is told, over and over, which number is durable
(lab/guest/dseq, dsrv). Output commit holds every reply until the backup has the
checkpoint it came from, so every number a client was told must survive any kill of A.

Host A is killed (SIGKILL of its QEMU) at each of these moments, one fresh lab each:

- ``sync``: during the disk's initial synchronisation (B's image all 0xEE, so every chunk
  is sent): B has no checkpoint, so it must resume nothing and clean up;
- ``steady``: under steady writes, 0.6 s after an ACK (mid-epoch under TCG);
- ``after-ack``: as soon as A's sender reports an ACK;
- ``flush``: while the guest's `sync` of 1 MiB of bulk writes is in flight (between its
  "dflush begin" and "dflush end" console lines, read from A's console log);
- ``backlog``: with the replication stream backed up at its cap (2 MiB on A, the guest
  writing 4 MiB a round): once A's disk daemon logs that guest I/O waits at the cap.

Then on B: the guest runs; it checks its disk (O_DIRECT) against its in-memory log (no
block it does not know of, none it wrote missing); it unmounts the file system; once it
is stopped, in B's dom0, every number the client was told is in the image's sequence
file (debugfs) and `fsck.ext4 -fn` finds the file system clean; and a copy of B's image
taken right after the failover (guest paused for it) passes `e2fsck -fy` as a crashed
ext4 does: the journal replayed, nothing fixed but the free block and inode counts.

Each case boots its own two hosts (the kill ends the lab): about 3 min for ``sync`` and
4-5 min for each other case on an idle machine; bounded at 20 min each.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import disk, guest, protect
from lab.errors import LabError
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab

pytestmark = pytest.mark.lab

IMAGE = "/root/dke.img"
CRASH_COPY = "/root/dke-failover.img"
MIB = 32  # about 10 s of synchronisation over the lab's link when every chunk differs
PORT = 8014
DURABLE_PORT = 7001  # lab/guest/dsrv
ASK = "python3 /mnt/project/lab/dom0tools/guest_ask.py"
CAP_MIB = 2  # the backlog case's cap on unACKed replication bytes (A's disk daemon)
# Kernel arguments of the guest's ext4 workload per moment (lab/guest/init, dseq).
WORKLOAD = {"flush": "xenlab_disk=ext4 xenlab_dbulk=1024",
            "backlog": "xenlab_disk=ext4 xenlab_dbulk=4096"}
STEADY_S = 8.0  # of protected writes before the kill is timed
MID_EPOCH_S = 0.6  # after an ACK: the next epoch's writes are in flight (TCG)
ACK_LINE = re.compile(r"(?m)^epoch (\d+): ")
FLUSH_LINE = re.compile(r"XRGUEST dflush (begin|end) (\d+)")
AT_CAP = "replication backlog at its cap"


def acked(send: Job) -> int:
    found = ACK_LINE.findall(send.stderr())
    return int(found[-1]) if found else -1


def kill_at(moment: str, a: Host, send: Job, spec: GuestSpec) -> str:
    """Wait for ``moment``, kill host A at once; returns what the kill landed in."""
    if moment in ("steady", "after-ack"):
        nxt = acked(send) + 1
        deadline = time.monotonic() + 120
        while acked(send) < nxt:  # the sender's stderr is on the share: read here, often
            if send.done() or time.monotonic() > deadline:
                raise LabError(f"no ACK of epoch {nxt} in 120 s: {send.stderr()[-2000:]}")
            time.sleep(0.02)
        if moment == "steady":
            time.sleep(MID_EPOCH_S)
        a.kill()
        return f"{MID_EPOCH_S if moment == 'steady' else 0} s after the ACK of epoch {nxt}"
    if moment == "flush":
        deadline = time.monotonic() + 120
        while True:  # the console log is on the share: read here, within milliseconds
            lines = FLUSH_LINE.findall(a.guest_console(spec.name))
            if lines and lines[-1][0] == "begin":
                a.kill()
                n = lines[-1][1]
                after = FLUSH_LINE.findall(a.guest_console(spec.name))
                ended = ("end", n) in after
                return (f"the flush of round {n}" +
                        (" (its end line made it out before the kill)" if ended else
                         ", not finished"))
            if time.monotonic() > deadline:
                raise LabError(f"no flush in flight seen on {spec.name}'s console in 120 s")
            time.sleep(0.02)
    if moment == "backlog":
        def said() -> int:
            return sum(p.read_text(errors="replace").count(AT_CAP)
                       for p in a.xenlog.glob("xen-remus-disk-*.log"))
        before = said()
        deadline = time.monotonic() + 180
        while said() == before:
            if time.monotonic() > deadline:
                raise LabError(f"A's disk daemon never said {AT_CAP!r} in 180 s")
            time.sleep(0.05)
        a.kill()
        return f"the backlog at its cap of {CAP_MIB} MiB (A's daemon said so {said()} times)"
    raise ValueError(moment)


def ask(b: Host, spec: GuestSpec, request: str, prefix: str) -> str:
    r = b.run(f"{ASK} {spec.ip} {DURABLE_PORT} {request} '{prefix}' 200", timeout=260)
    if not r.ok:
        raise LabError(f"{request} on {spec.name}: {r.stdout.strip()}\nconsole tail:\n"
                       + "\n".join(b.guest_console(spec.name).splitlines()[-10:]))
    return str(r.stdout.strip())


def told(client: Job) -> tuple[list[int], set[str]]:
    events = [e for e in protect.client_events(client.output()) if "durable" in e]
    return [int(e["durable"]) for e in events], {str(e["bootid"]) for e in events}


def kill_during_sync(a: Host, b: Host, spec: GuestSpec, recv: Job, send: Job) -> None:
    """B has no checkpoint yet: it must end its receive, resume nothing, leave nothing."""
    deadline = time.monotonic() + 300
    while not re.search(r"initial synchronisation [\d.]+/", send.stderr()):
        assert "synchronised" not in send.stderr(), (
            f"the synchronisation ended before a progress line: too fast to kill A during "
            f"it\n{send.stderr()[-2000:]}")
        assert not send.done() and time.monotonic() < deadline, send.stderr()[-3000:]
        time.sleep(0.05)
    a.kill()
    t_kill = time.monotonic()
    r = recv.wait(180)
    print(f"\n[sync] killed host A during the disk's initial synchronisation "
          f"({send.stderr().strip().splitlines()[-1]}); B's receiver ended after "
          f"{time.monotonic() - t_kill:.1f} s, rc {r.rc}: {r.stderr.strip().splitlines()[-1:]}")
    assert r.rc != 0 and re.search(r"before any complete epoch|no complete epoch",
                                   r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    deadline = time.monotonic() + 60
    while guest.domain_state(b, f"{spec.name}--incoming") is not None:
        assert time.monotonic() < deadline, "the half-received domain is left on B"
        time.sleep(2)
    assert guest.domain_state(b, spec.name) is None, "a guest was started on B"


@pytest.mark.lab(timeout=1200)
@pytest.mark.parametrize("moment", ["sync", "steady", "after-ack", "flush", "backlog"])
def test_ext4_disk_host_kill(lab_two: Lab, moment: str) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="dke", ip="169.254.20.36", mac="00:16:3e:00:00:36",
                     disk=disk.spec_line(IMAGE),
                     cmdline=WORKLOAD.get(moment, "xenlab_disk=ext4"))
    t0 = time.monotonic()
    for h in (a, b):
        disk.install(h)
    if moment == "backlog":
        a.run(f"echo XEN_REMUS_DISK_MAX_UNACKED_MIB={CAP_MIB} >> /etc/default/xen-remus",
              timeout=60, check=True)
    disk.make_ext4_image(a, IMAGE, MIB)
    if moment == "sync":
        disk.make_image(b, IMAGE, MIB, fill=0xEE)  # every chunk differs: a long sync
    else:
        disk.copy_image(a, b, IMAGE)  # a pre-seeded replica: only what changed is sent
    try:
        guest.create(a, spec, timeout=300)
        guest.wait_console(a, spec.name, r"XRGUEST dseq start", 120)
        p = protect.PROTECTORS["xen-remus-disk"]
        if moment == "sync":
            recv = b.spawn(p.receiver.format(port=PORT))
            recv.wait_output(r"listening", 30, stderr=True)
            send = a.spawn(p.sender.format(name=spec.name, bip=b.ip, port=PORT))
            kill_during_sync(a, b, spec, recv, send)
            return
        recv, send = protect.protect(a, b, spec, "xen-remus-disk", port=PORT)
        send.wait_output(r"protecting", 300, stderr=True)
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} {DURABLE_PORT} 900")
        client.wait_output(r'"durable"', 90)
        time.sleep(STEADY_S)
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        before, _ = told(client)
        t_setup = time.monotonic() - t0
        landed = kill_at(moment, a, send, spec)
        t_kill = time.monotonic()
        running = protect.wait_failover(b, spec, recv, timeout=240)
        print(f"\n[{moment}] killed host A in {landed}; client told up to "
              f"{max(before, default=None)} before; guest running on B {running:.1f} s "
              f"after the kill ({t_setup:.0f} s of set-up)")
        # B's disk as the failover left it (the guest paused a moment for the copy): a
        # crash-consistent ext4, checked once the test is done with B.
        b.run(f"xl pause {spec.name} && cp {IMAGE} {CRASH_COPY}; xl unpause {spec.name}",
              timeout=120, check=True)
        resumed = re.search(r"resuming from epoch (\d+)", recv.stderr())
        print(f"[{moment}] B: {resumed[0] if resumed else 'no resume line'}; "
              f"A's last ACK: epoch {acked(send)}")
        # The guest itself: its blocks on the disk against what its memory wrote.
        verdict = ask(b, spec, "verify", "verify ")
        print(f"[{moment}] guest: {verdict}")
        assert verdict.startswith("verify ok"), verdict
        time.sleep(3)  # a few more replies on the held connection, from B
        gone = ask(b, spec, "umount", "umount ")
        assert gone.startswith("umount ok"), gone
        numbers, boots = told(client)
        assert numbers and len(boots) == 1, f"told {numbers[-5:]} by boots {boots}"
        assert max(numbers) >= max(before, default=0), "the durable number went back"
        destroy(b, spec.name)
        b.run("for i in $(seq 60); do ls /run/xen-remus/disk/*.pid >/dev/null 2>&1 || "
              "exit 0; sleep 1; done; exit 1", timeout=90, check=True)  # the server stopped
        blocks = disk.ext4_seq_blocks(b, IMAGE)
        blocks.check_told(numbers, boots.pop())
        report = disk.fsck(b, IMAGE)
        crash = disk.fsck_crashed(b, CRASH_COPY)
        print(f"[{moment}] B's image at the failover, fsck'd as a crash image: "
              f"{'journal replayed' if 'recovering journal' in crash else 'no journal to replay'}"
              f"; {crash.strip().splitlines()[-1]}")
        print(f"[{moment}] B's image: every one of {len(numbers)} told numbers (up to "
              f"{max(numbers)}) on disk; fsck.ext4 -fn clean: {report.strip().splitlines()[-1]}"
              f"; {time.monotonic() - t_kill:.0f} s from the kill to here")
        assert "Traceback" not in recv.stderr(), recv.stderr()[-3000:]
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, f"{spec.name}--incoming")
        destroy(b, spec.name)
