"""Replicated disks on real Xen: the block-remus script, and protect + failover with a disk.

The guest writes block (i mod 2048) = "xrseq i bootid=B" every tick, with fsync
(lab/guest/init). A disk is right for a guest that printed tick c when every sequence
number before c is on it and none after c (lab/disk.py SeqBlocks.check).
"""

from __future__ import annotations

import time

import pytest

from lab import disk, guest, protect
from lab.guest import GuestSpec, destroy
from lab.host import Host
from lab.lab import Lab

pytestmark = pytest.mark.lab

IMAGE = "/root/{name}.img"
MIB = 8


def check_paused(host: Host, name: str, image: str) -> int:
    """Pause the guest, check its disk against its ticks; returns its last tick."""
    host.run(f"xl pause {name}", timeout=60, check=True)
    try:
        time.sleep(2)  # the console's last lines reach its log
        last = guest.last_tick(host, name)
        disk.seq_blocks(host, image).check(last.bootid, last.value)
        return last.value
    finally:
        host.run(f"xl unpause {name}", timeout=60, check=True)


@pytest.mark.lab(timeout=900)
def test_block_remus_serves_a_guest_disk(lab_one: Host) -> None:
    """xl create with script=block-remus: the disk server starts, nbd-client attaches
    it, blkback serves it; the guest's fsynced blocks are in the image; xl destroy stops
    the server and frees the NBD device."""
    h = lab_one
    spec = GuestSpec(name="dk", ip="169.254.20.31", mac="00:16:3e:00:00:31",
                     disk=disk.spec_line(IMAGE.format(name="dk")))
    image = IMAGE.format(name="dk")
    disk.install(h)
    disk.make_image(h, image, MIB)
    try:
        guest.create(h, spec, timeout=300)
        guest.wait_console(h, spec.name, r"XRGUEST disk xvda sectors used=2048", 10)
        guest.wait_console(h, spec.name, r"XRGUEST tick 6 ", 60)
        last = check_paused(h, spec.name, image)
        print(f"\nblock-remus disk: ticks 1..{last - 1} on the image")
    finally:
        destroy(h, spec.name)
    r = h.run("sleep 3; ls /run/xen-remus/disk/; cat /sys/block/nbd*/pid 2>/dev/null; "
              "pgrep -f 'xen_remus disk serve'", timeout=60)
    assert "pid" not in r.stdout and not r.stdout.strip().isdigit(), r.stdout


@pytest.mark.lab(timeout=1500)
def test_protect_with_disk_failover_on_host_kill(lab_two: Lab) -> None:
    """protect without -d: the disk is synchronised to B (whose image starts as 0xEE
    garbage), then every write goes with its checkpoint; host A killed: the guest goes on
    on B with a disk that has every write it knows of and none it does not."""
    a, b = lab_two.a, lab_two.b
    image = IMAGE.format(name="pd")
    spec = GuestSpec(name="pd", ip="169.254.20.32", mac="00:16:3e:00:00:32",
                     disk=disk.spec_line(image))
    for h in (a, b):
        disk.install(h)
    disk.make_image(a, image, MIB)
    disk.make_image(b, image, MIB, fill=0xEE)
    try:
        guest.create(a, spec, timeout=300)
        recv, send = protect.protect(a, b, spec, "xen-remus-disk", port=8007)
        send.wait_output(r"protecting", 300, stderr=True)
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 150")
        client.wait_output(r'"counter"', 60)
        time.sleep(10)  # checkpoints with disk writes flow
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        st = a.run(f"python3 -m xen_remus status --json {spec.name}", timeout=120)
        assert st.ok and '"protecting"' in st.stdout, st.stdout + st.stderr
        seen = [e["counter"] for e in protect.client_events(client.output()) if "counter" in e]
        assert seen, f"the client saw no reply before the kill: {client.output()[-2000:]}"
        before = guest.last_tick(a, spec.name)
        a.kill()
        t_kill = time.time()
        print(f"\nkilled host A at tick {before.value}; clients saw up to {max(seen)}")
        running = protect.wait_failover(b, spec, recv, timeout=240)
        # The copy ran on B only since the failover: its first tick there, then the check.
        guest.wait_console(b, spec.name, r"XRGUEST tick \d+ ", 60)
        last = check_paused(b, spec.name, image)
        print(f"failover with a disk: running on B {running:.1f} s after the kill; the disk "
              f"holds ticks 1..{last - 1}, nothing newer")
        after = guest.advancing(b, spec, guest.counter(b, spec))
        time.sleep(4)
        held = protect.HeldConnection.of(client.output(), t_kill)
        print(f"client: {held.text()}\nreceiver log tail:\n{recv.stderr()[-800:]}")
        assert after.bootid == before.bootid, f"not the same guest: {before} vs {after}"
        assert after.value >= max(seen), f"counter went back: saw {max(seen)}, B has {after}"
        assert not held.backwards and not held.breaks and held.post, held
        assert "Traceback" not in recv.stderr()
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)
