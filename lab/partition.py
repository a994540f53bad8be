"""Partitions of a two-host lab with both hosts alive, and who runs the guest meanwhile.

The inter-host link is each dom0's virtio NIC, a port of its bridge xenbr0 (lab/dom0/init):
everything between the hosts crosses it (the stream, the guests' traffic to the other
dom0), nothing else does (the agent's 9p share, the witness's virtio-serial port, the lab
fence's share). Two ways to break it, each undone by the dom0 itself after ``seconds``
(the test may fail meanwhile):

- ``cut_link``: the NIC down, nothing crosses either way;
- ``cut_egress``: what the host sends on the link is dropped, what it receives still
  arrives (one direction lost). The NIC's root qdisc becomes a pfifo of limit 0, which
  drops every packet it is given: pfifo is built into the kernel (CONFIG_NET_SCH_FIFO is
  not a module), so no module beyond the dom0's own is needed. Deleting it restores the
  NIC's default qdisc.
"""

from __future__ import annotations

import time

from lab import guest
from lab.errors import LabError
from lab.host import Host, Job

CUT_S = 30  # how long the tests break the link (both hosts' heartbeat timeouts run out)
# The host's NIC on the inter-host link (the virtio NIC in xenbr0, lab/dom0/init).
LINK_NIC = ("for n in /sys/class/net/*; do [ \"$(basename \"$(readlink -f $n/device/driver)\")\" "
            "= virtio_net ] && basename $n; done; true")
DROP_EGRESS = "tc qdisc replace dev {nic} root pfifo limit 0"
RESTORE_EGRESS = "tc qdisc del dev {nic} root"


def link_nic(host: Host) -> str:
    names = host.run(LINK_NIC, timeout=30, check=True).stdout.split()
    if len(names) != 1:
        raise LabError(f"host {host.name}: expected one virtio NIC, found {names}")
    return names[0]


def cut_link(host: Host, seconds: float) -> Job:
    """``host``'s link NIC down for ``seconds``: both directions lost."""
    nic = link_nic(host)
    return host.spawn(f"ip link set {nic} down && sleep {seconds}; ip link set {nic} up")


def cut_egress(host: Host, seconds: float) -> Job:
    """Every packet ``host`` sends on the link dropped for ``seconds`` (what it receives
    still arrives); the job says "egress dropped" once the drop is in place."""
    nic = link_nic(host)
    return host.spawn(f"{DROP_EGRESS.format(nic=nic)} && echo 'egress dropped' && "
                      f"tc -s qdisc show dev {nic} && sleep {seconds}; "
                      f"tc -s qdisc show dev {nic}; {RESTORE_EGRESS.format(nic=nic)}")


def cut_one_way(a: Host, b: Host, direction: str, seconds: float) -> Job:
    """``direction`` "A->B" (drop on A's egress) or "B->A" (on B's) for ``seconds``,
    in place when this returns."""
    src = {"A->B": a, "B->A": b}[direction]
    job = cut_egress(src, seconds)
    job.wait_output(r"egress dropped", 60)
    return job


def running(host: Host, name: str) -> bool:
    """``name`` runs unpaused on ``host`` (a dead host runs nothing, also one that dies
    while asked: a fence may power it off just then)."""
    try:
        state = guest.domain_state(host, name) if host.alive() else None
    except LabError:
        if host.alive():
            raise
        return False
    return state is not None and "p" not in state


def copies(a: Host, b: Host, name: str) -> list[str]:
    """The hosts on which the guest runs (unpaused)."""
    return [h.name for h in (a, b) if running(h, name)]


def watch(a: Host, b: Host, name: str, seconds: float, every: float = 3.0
          ) -> list[list[str]]:
    """copies() every ``every`` s for ``seconds``."""
    seen: list[list[str]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        seen.append(copies(a, b, name))
        time.sleep(every)
    return seen
