"""`make demo`: protect a guest on host A, kill host A, watch the guest go on on host B."""

from __future__ import annotations

import time

from lab import guest, protect
from lab.build import pattern_sha256
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.lab import Lab

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def show_counter(host_name: str, c: guest.Counter) -> None:
    say(f"  guest counter seen from dom0 {host_name}: {c.value} (boot id {c.bootid})")


def main(how: str = "xl") -> int:
    spec = GuestSpec(name="demo", ip="169.254.20.9", mac="00:16:3e:00:00:09")
    say("Two Xen 4.17 hosts will boot under QEMU (building the images first if needed).")
    with Lab(2) as lab:
        try:
            return run(lab, spec, how)
        finally:
            say(f"Logs: {lab.rundir} (serial-A.log, serial-B.log, share/hosts/*/xen/)")


def run(lab: Lab, spec: GuestSpec, how: str) -> int:
    a, b = lab.a, lab.b
    say(f"Hosts up. dom0 A {a.ip}, dom0 B {b.ip}, linked by a private virtual wire.")
    say(f"Starting guest '{spec.name}' ({spec.kind}, {spec.memory} MiB) on host A; it counts "
        "once a second and serves the count on TCP 7000.")
    guest.create(a, spec)
    show_counter("A", guest.counter(a, spec))
    cmd = protect.PROTECTORS[how].sender.split("exec ", 1)[1].format(
        name=spec.name, bip=b.ip, port=8003)
    say(f"Protecting it: `{cmd}` on A; B keeps a paused, current copy.")
    recv, _send = protect.protect(a, b, spec, how)
    say("B now holds a copy (xl list on B shows "
        f"'{spec.name}--incoming', paused). Letting checkpoints flow for 10 s.")
    for _ in range(2):
        time.sleep(5)
        show_counter("A", guest.counter(a, spec))
    before = guest.counter(a, spec)
    say(f"Killing host A now (SIGKILL of its QEMU, pid {a.pid}): no shutdown, no goodbye.")
    a.kill()
    say("Waiting for B to notice (TCP keepalive on its socket) and fail over...")
    took = protect.wait_failover(b, spec, recv)
    say(f"Failover: '{spec.name}' is running on B {took:.1f} s after the kill.")
    after = guest.counter(b, spec)
    show_counter("B", after)
    if after.bootid != before.bootid:
        raise LabError(f"the guest on B is a new boot ({after.bootid}), not the protected one")
    time.sleep(3)
    show_counter("B", guest.counter(b, spec))
    ticks = guest.ticks(b, spec.name)
    say("Its console on B, last lines: " + ", ".join(f"tick {n}" for n, _ in ticks[-3:]))
    if guest.pattern_sha(b, spec) != pattern_sha256():
        raise LabError("the guest's memory pattern changed across the failover")
    say(f"The counter went on from {before.value}: same guest (boot id {after.bootid}), its "
        "boot-time memory pattern intact (sha256 checked in the guest), now on host B.")
    return 0
