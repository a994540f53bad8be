"""Pacemaker drives xen-remus (lab, two hosts; not in ci-tests.txt): a two-node
cluster (lab/cluster.py) with fencing (lab/dom0tools/fence_xenlab, answered by this
machine killing a QEMU), each guest a promotable clone of the OCF agent
xen-remus:protected-guest. A killed host cannot be booted again, so each test is one lab
that ends with a host gone:

- test_pacemaker_fences_a_then_promotes_b: one guest, run by hand on A, protected to B;
  host A killed: Pacemaker on B fences A, then promotes B's instance, whose promote
  releases the receiver held by --failover-on-promote; the guest runs on B, the same boot.
- test_two_guests_moved_by_hand_then_host_a_killed: two guests, each its own clone,
  booted by Pacemaker (`config`) where a location preference puts them, both on A,
  protected to B. cg2 moved by hand (`crm_resource --move --promoted`) to B and back: each
  move a handover (the agent's demote: `xen-remus handover`), the guest never running on
  both hosts (polled every 2 s), resumed on the other host from exactly the epoch handed
  over, a client's one TCP connection never broken nor seeing the counter go back. Then
  host A killed: A fenced, both guests promoted on B from their last committed epochs,
  the clients' counters never back.
- test_link_cut_fencing_decides: cg1 placed on A, cg2 on B, each protected to the other
  host; the inter-host link cut (A's NIC down): corosync loses the peer, both nodes try
  to fence, the device fencing A waits pcmk_delay_base (the usual two-node tie-break), so
  A fences B; cg2 is promoted on A from its last committed epoch. Exactly one copy of
  each guest runs throughout (both hosts polled every 3 s); clients on A's side of the cut
  never see a counter go back. Not covered: a client that reaches B but not A (the lab's
  clients share the cut link): B's cg2, unprotected once its backup fell silent, released
  output to such clients until B was fenced, which A's copy does not know (a witness,
  `--witness`, is what holds output through a partition).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import pytest

from lab import cluster, guest, protect
from lab.cluster import NODES, FenceDesk
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.host import Host, Job
from lab.lab import Lab
from lab.partition import LINK_NIC

pytestmark = pytest.mark.lab

SPEC = GuestSpec(name="g1", kind="pv", ip="169.254.20.41", mac="00:16:3e:00:00:41")
BACKUP_READY = (
    "xen-remus status --json | python3 -c 'import json, sys; sys.exit(0 if any(d.get(\"role\")"
    " == \"backup\" and d.get(\"alive\") and d.get(\"committed\") is not None for d in "
    "json.load(sys.stdin)) else 1)'")


def scenario(lab: Lab, desk: FenceDesk, say: Callable[[str], None] = print) -> None:
    a, b = lab.a, lab.b
    say("forming the cluster (corosync, pacemakerd, sshd) on both dom0s")
    cluster.form(lab)
    say(f"creating {SPEC.name} on A")
    guest.create(a, SPEC)
    say("configuring fencing and the promotable clone")
    cluster.configure(lab, SPEC)
    cluster.wait_for(a, "crm_mon -1 -r | grep -Eq '(Promoted|Masters): \\[ dom0A \\]'", 600,
                     "the clone promoted on dom0A")
    cluster.wait_for(b, BACKUP_READY, 900, "B's receiver holding a whole copy", every=10)
    c0 = guest.counter(b, SPEC)
    c1 = guest.advancing(b, SPEC, c0)
    say(f"protected A -> B, counter {c1.value}; killing host A")
    a.kill()
    deadline_s = 900
    cluster.wait_for(b, f"xl list {SPEC.name} | tail -n +2 | awk '{{print $5}}' | "
                     "grep -qv p", deadline_s, f"{SPEC.name} running on B", every=5)
    c2 = guest.advancing(b, SPEC, c1, timeout=120)  # the same boot, moving on from c1
    say(f"{SPEC.name} runs on B: counter {c1.value} -> {c2.value}, boot {c2.bootid}")
    fenced = [d for d in desk.done if d.get("action") == "off" and d.get("plug") == "A"]
    if not fenced:
        raise LabError(f"B resumed the guest but no fence request for A came: {desk.done}")
    if cluster.promoted_on(b) != "dom0B":
        raise LabError("the guest runs on B but crm_mon does not show B promoted")
    st = b.run("xen-remus status --json", timeout=120).stdout
    if '"failover"' not in st:
        raise LabError(f"B's receiver did not record a failover: {st[:2000]}")
    say(f"fenced by {fenced[0].get('from')}, promoted on dom0B; done")


@pytest.mark.lab(timeout=3600)
def test_pacemaker_fences_a_then_promotes_b() -> None:
    with Lab(2, cluster=True) as lab, FenceDesk(lab) as desk:
        scenario(lab, desk)


GUESTS = (GuestSpec(name="cg1", kind="pv", ip="169.254.20.44", mac="00:16:3e:00:00:44"),
          GuestSpec(name="cg2", kind="pv", ip="169.254.20.45", mac="00:16:3e:00:00:45"))
CLIENT_S = 3600  # each client's one connection, held across every move and the failure
COPY_S = 900  # an initial copy (96 MiB over the 3-4 MB/s link, two at once, TCG)
SWITCH_S = 600  # crm_resource --move until the guest runs on the other host
FAILOVER_S = 900  # a host gone until its guests run on the other (fence, promote, resume)
REPLY_S = 180  # a held connection's first reply after the guest came back (TCP backoff)
FENCE_DELAY = "90s"  # on the device fencing A: A wins the race (B's attempt waits)
CUT_S = 600  # longer than the test needs: B is fenced long before the link is back


def other(lab: Lab, host: Host) -> Host:
    return lab.b if host is lab.a else lab.a


def placed(lab: Lab, prefer: Mapping[str, str], say: Callable[[str], None],
           fence_delay: Mapping[str, str] | None = None,
           stonith_timeout: str = "120s") -> None:
    """Form the cluster and let Pacemaker boot each of GUESTS on the host ``prefer``
    names (`config`: the agent's cold boot where it promotes); return once each runs
    there, promoted, with a whole copy on the other host."""
    say("forming the cluster (corosync, pacemakerd, sshd) on both dom0s")
    cluster.form(lab)
    say(f"configuring fencing and a promotable clone per guest, placed {dict(prefer)}")
    cluster.configure(lab, *GUESTS, cold=True, prefer=prefer, fence_delay=fence_delay,
                      stonith_timeout=stonith_timeout)
    for spec in GUESTS:
        home = lab.hosts[prefer[spec.name]]
        cluster.wait_role(home, spec, {NODES[home.name]: "Promoted"}, COPY_S)
    for spec in GUESTS:
        home = lab.hosts[prefer[spec.name]]
        peer = other(lab, home)
        cluster.wait_for(peer, cluster.backup_ready(spec.name), COPY_S,
                         f"holding a whole copy of {spec.name}", every=10)
        c = guest.counter(home, spec)
        say(f"{spec.name} runs on {home.name} (booted there by Pacemaker), protected to "
            f"{peer.name}; counter {c.value}")


def clients(host: Host) -> dict[str, Job]:
    """One held connection per guest from ``host``'s dom0, each answered once."""
    out = {s.name: host.spawn(f"exec python3 {protect.COUNTER_CLIENT} {s.ip} "
                              f"{guest.COUNTER_PORT} {CLIENT_S}") for s in GUESTS}
    for job in out.values():
        job.wait_output(r'"counter"', 120)
    return out


def watch(lab: Lab, names: list[str], until: Callable[[dict[str, list[str]]], bool],
          timeout: float, every: float, what: str) -> tuple[float, list[dict[str, list[str]]]]:
    """Poll where each guest runs (both hosts) until ``until`` holds; never two copies of
    one guest. Returns (time.time() when it held, every poll)."""
    polls: list[dict[str, list[str]]] = []
    deadline = time.monotonic() + timeout
    while True:
        on = cluster.copies((lab.a, lab.b), names)
        polls.append(on)
        two = {n: h for n, h in on.items() if len(h) > 1}
        if two:
            raise LabError(f"two running copies {two} ({what}); polls: {polls}")
        if until(on):
            return time.time(), polls
        if time.monotonic() > deadline:
            raise LabError(f"not {what} after {timeout:.0f} s; polls: {polls[-10:]}\n"
                           + "\n".join(cluster.diagnose(h, n) for h in (lab.a, lab.b)
                                       for n in names))
        time.sleep(every)


def resumed(host: Host, spec: GuestSpec, client: Job, seen: protect.Seen, t0: float,
            t_running: float, tag: str) -> None:
    """protect.check_resumed once the held connection had a reply after the guest came
    back at ``t_running`` (its TCP may be deep in exponential backoff)."""
    waited = protect.wait_reply(client, t_running, REPLY_S)
    print(f"[{tag}] first reply on the held connection {waited:.1f} s after {spec.name} "
          f"ran on {host.name}")
    protect.check_resumed(host, spec, client, seen, t0, t_running - t0, tag)


def switch_over(lab: Lab, spec: GuestSpec, src: Host, dst: Host, client: Job,
                say: Callable[[str], None]) -> None:
    """`crm_resource --move --promoted` of the guest's clone from ``src`` to ``dst``:
    the agent's demote hands it over, its promote on ``dst`` resumes it. Never two
    copies; ``dst`` resumes exactly the epoch ``src`` handed over (not the crash path);
    the client's connection and counter as output commit promises; then ``src`` holds a
    whole copy again."""
    tag = f"move {spec.name} {src.name}->{dst.name}"
    seen = protect.Seen.by(client)
    t0 = time.time()
    src.run(f"crm_resource --resource {cluster.clone_id(spec)} --move --node "
            f"{NODES[dst.name]} --promoted", timeout=120).check()
    t_running, polls = watch(lab, [spec.name], lambda on: on[spec.name] == [dst.name],
                             SWITCH_S, 2, f"{spec.name} running on {dst.name} only")
    cluster.wait_role(dst, spec, {NODES[dst.name]: "Promoted",
                                  NODES[src.name]: "Unpromoted"}, 300)
    handed = cluster.status(src, spec.name).get("primary", {})
    took = cluster.status(dst, spec.name).get("backup", {})
    if handed.get("state") != "handed-over":
        raise LabError(f"[{tag}] {src.name}'s protect ended {handed.get('state')} "
                       f"({handed.get('detail')}), not handed over\n"
                       f"{cluster.diagnose(src, spec.name)}")
    if took.get("state") != "failover" or took.get("committed") != handed.get("epoch"):
        raise LabError(f"[{tag}] {dst.name}'s receiver: {took.get('state')} at epoch "
                       f"{took.get('committed')}; {src.name} handed over epoch "
                       f"{handed.get('epoch')}")
    resumed(dst, spec, client, seen, t0, t_running, tag)
    say(f"{tag}: handed over at epoch {handed.get('epoch')}, running on {dst.name} "
        f"{t_running - t0:.1f} s after crm_resource (polls every 2 s: "
        f"{[p[spec.name] for p in polls]})")
    cluster.wait_for(src, cluster.backup_ready(spec.name), COPY_S,
                     f"holding a whole copy of {spec.name} again", every=10)


def two_guests_moved_then_a_killed(lab: Lab, desk: FenceDesk,
                                   say: Callable[[str], None] = print) -> None:
    a, b = lab.a, lab.b
    names = [s.name for s in GUESTS]
    placed(lab, {"cg1": "A", "cg2": "A"}, say)
    held = clients(b)
    cg2 = GUESTS[1]
    switch_over(lab, cg2, a, b, held["cg2"], say)
    switch_over(lab, cg2, b, a, held["cg2"], say)
    b.run(f"crm_resource --resource {cluster.clone_id(cg2)} --clear", timeout=120).check()
    time.sleep(10)  # both guests checkpoint to B again
    seen = {n: protect.Seen.by(held[n]) for n in names}
    say("both guests on A, protected to B; killing host A")
    a.kill()
    t_kill = time.time()
    t_running, _ = watch(lab, names, lambda on: all(on[n] == ["B"] for n in names),
                         FAILOVER_S, 5, "both guests running on B")
    for spec in GUESTS:
        resumed(b, spec, held[spec.name], seen[spec.name], t_kill, t_running,
                f"kill A: {spec.name}")
        cluster.wait_role(b, spec, {NODES["B"]: "Promoted"}, 300)
        doc = cluster.status(b, spec.name).get("backup", {})
        if doc.get("state") != "failover":
            raise LabError(f"{spec.name}: B's receiver ended {doc.get('state')}: {doc}")
        say(f"{spec.name} resumed on B from epoch {doc.get('committed')}")
    fenced = [d for d in desk.done if d.get("action") == "off" and d.get("plug") == "A"]
    if not fenced:
        raise LabError(f"B resumed the guests but no fence request for A came: {desk.done}")
    say(f"A fenced by {fenced[0].get('from')}; both guests promoted on B "
        f"{t_running - t_kill:.1f} s after the kill; done")


def link_cut(lab: Lab, desk: FenceDesk, say: Callable[[str], None] = print) -> None:
    a, b = lab.a, lab.b
    names = [s.name for s in GUESTS]
    placed(lab, {"cg1": "A", "cg2": "B"}, say, fence_delay={"A": FENCE_DELAY},
           stonith_timeout="180s")
    held = clients(a)  # on the side that wins
    time.sleep(10)
    seen = {n: protect.Seen.by(held[n]) for n in names}
    nic = a.run(LINK_NIC, timeout=30, check=True).stdout.split()[0]
    say(f"cutting the link (A's {nic} down for {CUT_S} s)")
    t_cut = time.time()
    a.spawn(f"ip link set {nic} down && sleep {CUT_S}; ip link set {nic} up")
    t_running, polls = watch(
        lab, names, lambda on: not b.alive() and all(on[n] == ["A"] for n in names),
        FAILOVER_S, 3, "B fenced and both guests running on A")
    deadline = time.monotonic() + 20  # and it stays so
    while time.monotonic() < deadline:
        on = cluster.copies((a, b), names)
        if any(on[n] != ["A"] for n in names):
            raise LabError(f"after the fence: {on}")
        time.sleep(3)
    if not a.alive():
        raise LabError(f"A was fenced: the delay on fence-A did not decide; {desk.done}")
    fenced = [d for d in desk.done if d.get("action") == "off" and d.get("plug") == "B"]
    if not fenced or fenced[0].get("from") != NODES["A"]:
        raise LabError(f"B is off, but not fenced by A: {desk.done}")
    for spec in GUESTS:
        resumed(a, spec, held[spec.name], seen[spec.name], t_cut, t_running,
                f"cut: {spec.name}")
        cluster.wait_role(a, spec, {NODES["A"]: "Promoted"}, 300)
    doc = cluster.status(a, "cg2").get("backup", {})
    if doc.get("state") != "failover":
        raise LabError(f"cg2: A's receiver ended {doc.get('state')}: {doc}")
    say(f"A fenced B; cg2 resumed on A from epoch {doc.get('committed')}, "
        f"{t_running - t_cut:.1f} s after the cut; one copy of each throughout: "
        f"{[[p[n] for n in names] for p in polls]}")


@pytest.mark.lab(timeout=4800)
def test_two_guests_moved_by_hand_then_host_a_killed() -> None:
    with Lab(2, cluster=True) as lab, FenceDesk(lab) as desk:
        two_guests_moved_then_a_killed(lab, desk)


@pytest.mark.lab(timeout=3600)
def test_link_cut_fencing_decides() -> None:
    with Lab(2, cluster=True) as lab, FenceDesk(lab) as desk:
        link_cut(lab, desk)
