"""`make demo`: protect a guest on host A, kill host A, watch the guest go on on host B.

A client in B's dom0 holds one TCP connection to the guest's counter service from before
the kill to after the failover: with output commit (ours, no -n) it must see the counter
only go forward and keep its connection; that is what clients of a Remus guest get.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lab import guest, protect
from lab.build import pattern_sha256
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.host import Job
from lab.lab import Lab

T0 = time.monotonic()
PORT = 8003


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def show_counter(host_name: str, c: guest.Counter) -> None:
    say(f"  guest counter seen from dom0 {host_name}: {c.value} (boot id {c.bootid})")


def replies(client: Job) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.output().splitlines()
            if line.startswith("{")]


def main(how: str = "xen-remus") -> int:
    spec = GuestSpec(name="demo", ip="169.254.20.9", mac="00:16:3e:00:00:09")
    say("Two Xen 4.17 hosts will boot under QEMU (building the images first if needed).")
    with Lab(2) as lab:
        try:
            return run(lab, spec, how)
        except LabError as exc:
            say(f"FAILED: {exc}")
            return 1
        finally:
            say(f"Logs: {lab.rundir} (serial-A.log, serial-B.log, share/hosts/*/xen/)")


def run(lab: Lab, spec: GuestSpec, how: str) -> int:
    a, b = lab.a, lab.b
    ours = how != "xl"
    say(f"Hosts up. dom0 A {a.ip}, dom0 B {b.ip}, linked by a private virtual wire.")
    say(f"Starting guest '{spec.name}' ({spec.kind}, {spec.memory} MiB) on host A; it counts "
        "once a second and serves the count on TCP 7000.")
    guest.create(a, spec)
    show_counter("A", guest.counter(a, spec))
    cmd = protect.PROTECTORS[how].sender.split("exec ", 1)[1].format(
        name=spec.name, bip=b.ip, port=PORT)
    say(f"Protecting it: `{cmd}` on A; B keeps a paused copy, current as of the last "
        "complete checkpoint. The first full copy crosses the slow virtual wire (minutes).")
    recv, send = protect.protect(a, b, spec, how, port=PORT)
    if ours:
        send.wait_output(r"protecting", 240, stderr=True)
        say("B committed the initial copy; from now on each epoch: suspend, copy dirty "
            "pages, resume, send, B commits and ACKs, A releases that epoch's packets.")
    client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 420")
    client.wait_output(r'"counter"', 120)
    say("A client in B's dom0 opened one TCP connection to the guest and asks for the "
        "counter 5 times a second; it keeps that one connection throughout.")
    for _ in range(2):
        time.sleep(6)
        seen = [e for e in replies(client) if "counter" in e]
        say(f"  the client has {len(seen)} replies, the latest counter={seen[-1]['counter']}")
    seen = [e for e in replies(client) if "counter" in e]
    top = max(e["counter"] for e in seen)
    bootid = seen[-1]["bootid"]
    say(f"Killing host A now (SIGKILL of its QEMU, pid {a.pid}): no shutdown, no goodbye. "
        f"Highest counter any client saw: {top}.")
    a.kill()
    t_kill = time.time()
    say("Waiting for B to notice (heartbeats / TCP keepalive) and fail over...")
    took = protect.wait_failover(b, spec, recv, timeout=240)
    say(f"Failover: '{spec.name}' is running on B {took:.1f} s after the kill.")
    tail = [ln for ln in recv.stderr().splitlines() if "epoch" in ln or "fail" in ln]
    for line in tail[-3:]:
        say(f"  B's receiver: {line.strip()}")
    after = guest.counter(b, spec)
    show_counter("B", after)
    if after.bootid != bootid:
        raise LabError(f"the guest on B is a new boot ({after.bootid}), not the protected one")
    time.sleep(6)
    report(client, t_kill, top, ours)
    if guest.pattern_sha(b, spec) != pattern_sha256():
        raise LabError("the guest's memory pattern changed across the failover")
    ticks = guest.ticks(b, spec.name)
    say("Its console on B, last lines: " + ", ".join(f"tick {n}" for n, _ in ticks[-3:]))
    say(f"Same guest (boot id {after.bootid}), its boot-time memory pattern intact (sha256 "
        "checked in the guest), now running on host B.")
    return 0


def report(client: Job, t_kill: float, top: int, ours: bool) -> None:
    events = replies(client)
    got = [e for e in events if "counter" in e]
    post = [e["counter"] for e in got if e["t"] >= t_kill]
    breaks = [e for e in events if e.get("event") in ("closed", "error")]
    back = [(x["counter"], y["counter"]) for x, y in zip(got, got[1:], strict=False)
            if y["counter"] < x["counter"]]
    conn = f"BROKE {breaks}" if breaks else "survived"
    say(f"The held connection: {len(got) - len(post)} replies before the kill, {len(post)} "
        f"after ({post[0] if post else '-'} .. {post[-1] if post else '-'}); the counter "
        f"went back: {back or 'never'}; connection {conn}.")
    if not ours:
        say("(stock xl remus here runs with -n: no output commit, so what the client saw may "
            "be lost in a failover.)")
        return
    if breaks or back or not post or post[0] < top:
        raise LabError(f"output commit broken: saw up to {top}, after the kill {post[:5]}, "
                       f"back {back}, breaks {breaks}")
