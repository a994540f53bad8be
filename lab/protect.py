"""Protecting a lab guest A -> B and waiting for failover: shared by tests and `make demo`.

PROTECTORS holds the command pair (backup's receiver, primary's sender) per implementation:
stock `xl remus` and the variants of `xen-remus protect`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

from lab import failover, guest
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.host import WITNESS_DEV, Host, Job

KA_EXEC = "python3 /mnt/project/lab/dom0tools/ka_exec.py"
# One TCP connection to a guest's counter service, held across a failover (JSON per event).
COUNTER_CLIENT = "/mnt/project/lab/dom0tools/counter_client.py"
# Heartbeat timeout for our rows. The product default (1 s) is for real hardware; under
# TCG a dom0 busy with an epoch (suspend, copy, or xl restoring on the backup) stalls its
# heartbeat thread for over a second, and 1 s has failed both ends over at once,
# leaving the guest running on both hosts.
HB_MS = 6000
# -v: a line per epoch once the backup ACKed it (tests time host kills by it).
OURS = f"exec python3 -m xen_remus -v protect --heartbeat-timeout {HB_MS}"
OURS_RECEIVER = (f"exec {KA_EXEC} {{port}} python3 -m xen_remus migrate-receive -r "
                 f"--heartbeat-timeout {HB_MS}")


# Both ends reach the witness through their virtio-serial port (Lab(witness=...)), with
# the key tests/lab/test_witness.py puts at WITNESS_KEY in each dom0.
WITNESS_KEY = "/root/witness.key"
WITNESS_OPTS = (f"--witness-via 'exec socat - {WITNESS_DEV}' "
                f"--witness-key-file {WITNESS_KEY}")


# The lab's fence command (lab/dom0tools/fence_xenlab, answered by lab/cluster.py's
# FenceDesk): powers host A off, as a PDU would. FENCE_TIMEOUT_S bounds it on B: the
# primary holds its output that much longer after losing a fencing backup.
FENCE_LAB = "python3 /mnt/project/lab/dom0tools/fence_xenlab --action=off --plug=A"
FENCE_TIMEOUT_S = 20


# The direct transport (--tcp): no socat, no ssh, both ends authenticated by the key both
# dom0s hold at DIRECT_KEY (tests/lab/test_tcp_direct.py writes it).
DIRECT_KEY = "/root/direct.key"


@dataclasses.dataclass(frozen=True)
class Protector:
    receiver: str  # run on B; {port}
    sender: str  # run on A; {name} {bip} {port}


PROTECTORS = {
    # -F: no safety net, -n: no network buffering (Debian's libxl has no libnl), -d: no disk
    # replication. The receiver's socket needs keepalive to notice a dead primary.
    "xl": Protector(
        receiver=f"exec {KA_EXEC} {{port}} xl migrate-receive -r",
        sender="exec xl remus -F -n -d -i 200 -s '' {name} 'socat - TCP:{bip}:{port}'",
    ),
    # Stock xl remus into our receiver: no heartbeats from a stock sender, so
    # keepalive and --idle-timeout notice a dead primary.
    "xl-ours": Protector(
        receiver=f"exec {KA_EXEC} {{port}} python3 -m xen_remus migrate-receive -r "
                 "--idle-timeout 5",
        sender="exec xl remus -F -n -d -i 200 -s '' {name} 'socat - TCP:{bip}:{port}'",
    ),
    # Ours: output commit on (IFB + plug per vif), ACK, heartbeats (HB_MS), compression.
    "xen-remus": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + " -F -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # The same with a line per committed epoch on B (-vv): a test can kill host A after
    # B committed an epoch whose ACK has not reached A.
    "xen-remus-vv": Protector(
        receiver=OURS_RECEIVER.replace("xen_remus migrate", "xen_remus -vv migrate"),
        sender=OURS + " -F -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # The same without network buffering, for contrast (as xl's -n).
    "xen-remus-n": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + " -F -n -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # -u -n: seconds-long sends, no output commit: a kill mid-send shows what buffering saves.
    "xen-remus-un": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + " -u -F -n -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # No compression (-u): tells the epoch loop apart from the lz4-over-XOR records.
    "xen-remus-u": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + " -u -F -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # Pipelined epochs (--pipeline DEPTH): a checkpoint is taken while up to DEPTH-1
    # earlier ones await B's ACK (under TCG an ACK takes longer than the interval), each
    # epoch's output held on its own IFB of a ring on A.
    **{f"xen-remus-p{depth}": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + f" --pipeline {depth} -F -d -s '' {{name}} "
               "'socat - TCP:{bip}:{port}'",
    ) for depth in (2, 3)},
    # Disks replicated (block-remus), output commit on: no -d, so no -F.
    "xen-remus-disk": Protector(
        receiver=OURS_RECEIVER,
        sender=OURS + " -s '' {name} 'socat - TCP:{bip}:{port}'",
    ),
    # Output commit and a witness on both ends (-s '': the receiver gets its own options).
    "xen-remus-witness": Protector(
        receiver=OURS_RECEIVER + f" {WITNESS_OPTS} --witness-id B",
        sender=OURS + f" -F -d {WITNESS_OPTS} --witness-id A -s '' {{name}} "
               "'socat - TCP:{bip}:{port}'",
    ),
    # The direct transport: B listens itself (keepalive on its socket), A connects to it.
    "xen-remus-tcp": Protector(
        receiver=f"exec python3 -m xen_remus migrate-receive -r --heartbeat-timeout {HB_MS} "
                 f"--listen {{port}} --key-file {DIRECT_KEY}",
        sender=OURS + f" -F -d --tcp {{port}} --key-file {DIRECT_KEY} {{name}} {{bip}}",
    ),
    # Our sender, stock `xl migrate-receive -r` as the backup: the plain standard stream.
    "xen-remus-stock": Protector(
        receiver=f"exec {KA_EXEC} {{port}} xl migrate-receive -r",
        sender=OURS + " --stock-backup -F -d -s '' {name} "
               "'socat - TCP:{bip}:{port}'",
    ),
}


STOCK_EPOCHS_AHEAD = 12


def protect(a: Host, b: Host, spec: GuestSpec, how: str = "xl", port: int = 8003,
            timeout: float = 420.0) -> tuple[Job, Job]:
    """Start protecting `spec` from ``a`` to ``b`` (any two hosts: failback protects B to
    A); return (receiver, sender) once ``b`` holds a copy."""
    p = PROTECTORS[how]
    recv = b.spawn(p.receiver.format(port=port))
    recv.wait_output(r"listening", 30, stderr=True)
    send = a.spawn(p.sender.format(name=spec.name, bip=b.ip, port=port))
    wait_copy(b, spec, recv, send, port, timeout)
    return recv, send


def protect_fenced(a: Host, b: Host, spec: GuestSpec, fence: str, port: int,
                   fence_timeout: float = FENCE_TIMEOUT_S) -> tuple[Job, Job]:
    """Protect ``spec`` A -> B with output commit, B's receiver running ``fence`` (a shell
    command) before any failover; (receiver, sender) once B holds a copy."""
    recv = b.spawn(OURS_RECEIVER.format(port=port)
                   + f" --fence '{fence}' --fence-timeout {fence_timeout:g}")
    recv.wait_output(r"listening", 30, stderr=True)
    send = a.spawn(OURS + f" -F -d -s '' {spec.name} 'socat - TCP:{b.ip}:{port}'")
    wait_copy(b, spec, recv, send, port)
    return recv, send


def wait_copy(b: Host, spec: GuestSpec, recv: Job, send: Job, port: int,
              timeout: float = 420.0) -> None:
    """Wait until ``b`` holds a whole first copy of ``spec`` (the receiver ``recv`` on
    ``port``, the sender ``send`` already started)."""
    deadline = time.monotonic() + timeout
    while guest.domain_state(b, f"{spec.name}--incoming") is None:
        if send.done() or recv.done():
            raise LabError(f"protection of {spec.name} ended early\n--- sender stderr\n"
                           f"{send.stderr()[-2000:]}--- receiver stderr\n{recv.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            raise LabError(f"no backup copy of {spec.name} on {b.name} after "
                           f"{timeout:.0f} s\n"
                           f"--- sender stderr\n{send.stderr()[-2000:]}")
        time.sleep(2)
    # The incoming domain exists from the first byte; B can only fail over once the first
    # full copy (the guest's memory) has arrived, so wait for that many bytes on B's socket.
    # Two more signs that need no socket statistics (ss has matched nothing):
    # ours says when the backup committed the initial copy; for stock xl remus, once
    # STOCK_EPOCHS_AHEAD epochs (~1.8 MB each) were written after the initial copy, more than
    # the socket buffers between A and B can hold has gone by, so B has all of it.
    need = spec.memory << 20
    got = 0
    while got < need:
        r = b.run(f"ss -tinH state established '( sport = :{port} )'", timeout=30)
        m = re.search(r"bytes_received:(\d+)", r.stdout)
        got = int(m.group(1)) if m else got
        err = send.stderr()
        if ("initial copy committed" in err
                or err.count("Checkpointed save") >= STOCK_EPOCHS_AHEAD):
            break
        if send.done() or recv.done() or time.monotonic() > deadline:
            raise LabError(f"first copy of {spec.name} incomplete: {got} of {need} bytes on "
                           f"{b.name}"
                           f"\n--- sender stderr\n{send.stderr()[-2000:]}"
                           f"--- receiver stderr\n{recv.stderr()[-2000:]}")
        time.sleep(2)


def wait_failover(b: Host, spec: GuestSpec, recv: Job, timeout: float = 90.0) -> float:
    """Wait (bounded: stock migrate-receive -r can hang, LAB-NOTES 11) until the guest runs
    unpaused on ``b`` under its own name; return the seconds waited."""
    return failover.wait_running(b, spec.name, timeout, recv)


def client_events(out: str) -> list[dict[str, Any]]:
    """The counter client's events (COUNTER_CLIENT prints one JSON object a line)."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@dataclasses.dataclass
class HeldConnection:
    """What the client holding one connection across a kill at ``t_kill`` saw."""

    pre: list[int]  # counters replied before the kill
    post: list[int]  # and after it
    gap: float  # the longest silence between two replies, s
    backwards: list[tuple[int, int]]  # consecutive replies where the counter went back
    breaks: list[dict[str, Any]]  # the connection closed or failed

    @classmethod
    def of(cls, out: str, t_kill: float) -> HeldConnection:
        events = client_events(out)
        replies = [e for e in events if "counter" in e]
        pairs = list(zip(replies, replies[1:], strict=False))
        return cls([e["counter"] for e in replies if e["t"] < t_kill],
                   [e["counter"] for e in replies if e["t"] >= t_kill],
                   max((y["t"] - x["t"] for x, y in pairs), default=0.0),
                   [(x["counter"], y["counter"]) for x, y in pairs
                    if y["counter"] < x["counter"]],
                   [e for e in events if e.get("event") in ("closed", "error")])

    def text(self) -> str:
        return (f"{len(self.pre)} replies before, {len(self.post)} after, longest silence "
                f"{self.gap:.1f} s, went back {self.backwards or 'never'}, connection "
                f"{'broke: ' + str(self.breaks) if self.breaks else 'survived'}")


@dataclasses.dataclass(frozen=True)
class Seen:
    """What a client holding one connection to the guest saw before a kill."""

    last: guest.Counter  # its newest reply
    top: int  # the highest counter of all its replies

    @classmethod
    def by(cls, client: Job) -> Seen:
        seen = [e for e in client_events(client.output()) if "counter" in e]
        assert seen, f"the client saw no reply before the kill: {client.output()[-2000:]}"
        return cls(guest.Counter(seen[-1]["counter"], seen[-1]["bootid"]),
                   max(e["counter"] for e in seen))


def wait_reply(client: Job, since: float, timeout: float) -> float:
    """Seconds until ``client`` has a reply stamped after ``since`` (time.time()): after a
    long silence its TCP retransmits back off exponentially, for tens of seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for e in client_events(client.output()):
            if "counter" in e and e["t"] > since:
                return float(e["t"]) - since
        if client.done() or time.monotonic() > deadline:
            raise LabError(f"no reply on the held connection {timeout:.0f} s after "
                           f"{since:.1f}: {client.output()[-1500:]}")
        time.sleep(2)


def check_output_commit(top: int, after: guest.Counter, held: HeldConnection) -> None:
    """What output commit promises across a failover: the counter after it (``after``)
    never goes back from the highest any client saw (``top``), and the connection held
    across it survives, never sees the counter go back, and has replies after it."""
    assert after.value >= top, f"counter went back: saw {top}, then {after.value}"
    assert not held.backwards, f"the held connection saw the counter go back: {held}"
    assert not held.breaks, f"the client's connection broke: {held.breaks}"
    assert held.post, "no reply on the held connection after the failover"


def check_resumed(backup: Host, spec: GuestSpec, client: Job, seen: Seen, t_kill: float,
                  running: float, tag: str) -> None:
    """What output commit promises once the primary died at ``t_kill`` (time.time()) and
    the guest ran on ``backup`` ``running`` s later: the same guest, its counter never
    back from the highest value ``client`` saw, the client's one connection survived."""
    after = guest.counter(backup, spec)
    assert after.bootid == seen.last.bootid, f"not the same guest: {seen.last} vs {after}"
    time.sleep(6)
    held = HeldConnection.of(client.output(), t_kill)
    print(f"[{tag}] failover: guest running on {backup.name} {running:.1f} s after the kill;"
          f" counter seen up to {seen.top}, first on {backup.name} {after.value}; client: "
          f"{held.text()}")
    check_output_commit(seen.top, after, held)
    later = guest.counter(backup, spec)
    assert later.value > after.value and later.bootid == after.bootid, (after, later)


def kill_and_check(primary: Host, backup: Host, spec: GuestSpec, recv: Job, client: Job,
                   tag: str) -> float:
    """Kill ``primary`` (its QEMU) while ``client`` in ``backup``'s dom0 holds one
    connection to the guest; check_resumed on ``backup`` (``recv``: its receiver).
    Returns the seconds from the kill to the guest running on ``backup``."""
    seen = Seen.by(client)
    primary.kill()
    t_kill = time.time()
    running = wait_failover(backup, spec, recv, timeout=240)
    check_resumed(backup, spec, client, seen, t_kill, running, tag)
    return running


# One host: the backup is a receiver on the same host, run by protect itself (-s ''). Its
# heartbeat timeout is long: failing over needs the primary gone first, and the kill below
# stops protect's heartbeats for a moment before that.
ONE_HOST_RECEIVER = "python3 -m xen_remus migrate-receive -r --heartbeat-timeout 60000"


def protect_one_host(h: Host, spec: GuestSpec, pidfile: str, timeout: float = 1800.0) -> Job:
    """`xen-remus protect -n -F -d` of ``spec`` into a receiver on ``h`` itself; returns the
    job once the backup committed the initial copy. -n: held output would pin the guest's
    pages in netback, and the primary must be destroyed before the backup can take its
    name (LAB-NOTES 10)."""
    job = h.spawn(f"echo $$ > {pidfile}; exec python3 -m xen_remus -v protect --heartbeat-timeout "
                  f"{HB_MS} -n -F -d -s '' {spec.name} '{ONE_HOST_RECEIVER}'")
    job.wait_output(r"protecting", timeout, stderr=True)
    return job


def fail_over_one_host(h: Host, spec: GuestSpec, job: Job, pidfile: str,
                       timeout: float = 300.0) -> float:
    """The primary's end on one host: protect stopped, the guest destroyed, protect killed
    (its receiver then has the stream's end and resumes the last whole epoch under the
    guest's name). Returns the seconds until the guest runs again."""
    h.run(f"p=$(cat {pidfile}); kill -STOP $p; xl destroy {spec.name}; rc=$?; kill -9 $p; "
          "exit $rc", timeout=120, check=True)
    return failover.wait_running(h, spec.name, timeout, job)
