"""Failover into a receiver on one lab host, at a chosen cut of a stock `xl remus` stream.

Used by the cut and soak tests and by `make bench` (ours against stock `xl
migrate-receive -r`, the same cuts). The relay (dom0tools/receive_relay.py) stops
forwarding a chosen number of bytes into an epoch, like a link gone dead; the primary is
then destroyed and the stream ended, and the backup must take over.
"""

from __future__ import annotations

import re
import time

from lab import guest
from lab.errors import LabError
from lab.guest import GuestSpec
from lab.host import Host, Job

RECV = "python3 -m xen_remus migrate-receive"
STOCK = "xl migrate-receive -r"
RELAY = "python3 /mnt/project/lab/dom0tools/receive_relay.py"
RESUMED = re.compile(r"guest resumed from epoch (\d+) in ([0-9.]+) s")


class FailoverHang(LabError):
    """The backup did not run the guest within the bounded wait."""


def wait_running(host: Host, name: str, timeout: float, why: Job) -> float:
    """Seconds until ``name`` runs unpaused on ``host`` (bounded)."""
    return wait_all_running(host, {name: why}, timeout)[name]


def wait_all_running(host: Host, why: dict[str, Job], timeout: float) -> dict[str, float]:
    """Seconds until each domain named in ``why`` runs unpaused on ``host``, all watched
    at once (one `xl list` a second, bounded); ``why[name]``: the job whose stderr tells
    why that one does not."""
    t0 = time.monotonic()
    took: dict[str, float] = {}
    while True:
        states = guest.domain_states(host)
        for name, state in states.items():
            if name in why and name not in took and "p" not in state:
                took[name] = time.monotonic() - t0
        if len(took) == len(why):
            return took
        if time.monotonic() - t0 > timeout:
            late = [n for n in why if n not in took]
            raise FailoverHang(
                f"host {host.name}: {', '.join(late)} not running after {timeout:.0f} s "
                f"(states {', '.join(f'{n} {states.get(n)}' for n in late)})\n"
                + "\n".join(f"--- {n}\n{why[n].stderr()[-3000:]}" for n in late))
        time.sleep(1)


def wait_file(host: Host, path: str, timeout: float, why: Job) -> str:
    """The contents of ``path`` in ``host``'s dom0 once it is not empty (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        r = host.run(f"cat {path} 2>/dev/null", timeout=120)
        if r.rc == 0 and r.stdout.strip():
            return r.stdout.strip()
        if why.done():
            raise LabError(f"host {host.name}: sender ended before {path}:\n{why.stderr()}")
        if time.monotonic() > deadline:
            raise LabError(f"host {host.name}: no {path} after {timeout:.0f} s:\n"
                           f"{why.stderr()[-3000:]}")
        time.sleep(2)


def cut_and_fail_over(host: Host, spec: GuestSpec, epoch: int, into: int,
                      recv: str = f"{RECV} -r", tag: str = "",
                      hang_after: float = 120.0) -> tuple[int | None, float]:
    """Stock `xl remus` on ``host`` into ``recv`` via a relay cutting ``into`` bytes past
    epoch ``epoch``; destroy the primary, end the stream; the backup must take over within
    ``hang_after`` s (else FailoverHang, the host cleared). Returns (the epoch our receiver
    says it resumed from, None for stock; seconds from the stream's end to a running
    backup). The guest is created if it is not running, else protected again."""
    mark, rel, rpid = f"/tmp/cut{tag}", f"/tmp/release{tag}", f"/tmp/recv{tag}.pid"
    host.run(f"rm -f {mark} {rel} {rpid}", timeout=60)
    state = guest.domain_state(host, spec.name)
    if not state or "p" in state:  # else protect the guest again (the last failover's)
        guest.destroy(host, spec.name)
        guest.create(host, spec, timeout=240)
    before = guest.counter(host, spec)
    send = host.spawn(f"exec xl remus -F -n -d -i 200 -s '' {spec.name} "
                      f"'{RELAY} --epoch {epoch} --into {into} --mark {mark} --release {rel} "
                      f"--pidfile {rpid} -- {recv}'")
    cut = wait_file(host, mark, 400, send)
    found = re.search(r"last whole epoch (\d+)", cut)
    if not found:
        raise LabError(f"relay's mark says {cut!r}, expected 'last whole epoch N'")
    whole = int(found[1])
    # The link is dead (the sender blocks mid-checkpoint). The primary goes away first
    # (localhost: the backup can take the name only then), then the stream ends.
    host.run(f"xl destroy {spec.name}", timeout=120, check=True)
    t0 = time.monotonic()
    host.run(f"touch {rel}", timeout=120, check=True)
    try:
        wait_running(host, spec.name, hang_after, send)
        took = time.monotonic() - t0
    except FailoverHang:
        # Leave evidence of what the receiver was doing, then clear the host for the next run.
        diag = host.run(f"p=$(cat {rpid}); ps -eo pid,ppid,stat,pcpu,wchan:24,args | "
                        "grep -E 'xl|save-helper|receive' | grep -v grep; "
                        "for q in $p $(pgrep -P $p); do echo \"== $q\"; "
                        "cat /proc/$q/wchan; echo; ls -l /proc/$q/fd; done; "
                        "xl list", timeout=60)
        print(f"\nHANG: {cut}; no running guest {hang_after:g} s after the stream ended\n"
              f"{diag.stdout}\n{send.stderr()[-3000:]}")
        host.run(f"kill -9 $(cat {rpid}) 2>/dev/null; sleep 1; "
                 f"xl destroy {spec.name}--incoming 2>/dev/null; "
                 f"xl destroy {spec.name} 2>/dev/null; true", timeout=90)
        raise
    if recv != STOCK:  # the receiver's log goes to the sender's stderr
        send.wait_output(RESUMED.pattern, 60, stderr=True)
    err = send.stderr()
    m = RESUMED.search(err)
    if recv != STOCK:
        if not m or int(m[1]) != whole or f"resuming from epoch {whole}" not in err \
                or "Traceback" in err:
            raise LabError(f"relay cut after epoch {whole}; the receiver should resume from "
                           f"it, and says:\n{err[-3000:]}")
    after = guest.counter(host, spec)
    if after.bootid != before.bootid or after.value < before.value:
        raise LabError(f"not the same guest, or its counter went back: {before} -> {after}")
    guest.advancing(host, spec, after)
    said = f"receiver resumed from epoch {m[1]}, sink failover {m[2]} s" if m else "stock"
    print(f"\n{cut}; {said}; guest running {took:.1f} s after the stream ended; counter "
          f"{before.value} -> {after.value}")
    return (int(m[1]) if m else None), took
