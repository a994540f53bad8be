"""A forged ACK injected into the channel, on real Xen (lab, two hosts; not in
ci-tests.txt).

protect A -> B with output commit, its transport lab/dom0tools/ack_forger.py in place of
socat: a relay that passes both directions and, once the test says so, writes one
REMUS_ACK of its own between two of the backup's frames, for the epoch after the last
one B acknowledged, numbered as A expects, with a MAC of zeros. A client in B's dom0
holds one connection to the guest throughout.

What the code does with it (channel/link.py, save_continuous.py, cli/protect_run.py): the
frame fails authentication (MacError), which is a failure of this side, not a lost
backup: protect names the frame (type, offset) and why, commits nothing for it, pauses the
guest on A (the backup may hold an epoch A has not seen acknowledged), drops the output
not acknowledged and exits 1; the stream ends and B, without a fence, resumes from its
last committed epoch. Checked: A's log names the forged frame at the offset the relay put
it; no epoch from the forged one on was released on A; B resumed from an epoch at least
as new as every one A released; exactly one copy runs (A's paused); the client's
counter never went back and its connection held.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab
from lab.partition import copies

pytestmark = pytest.mark.lab

FORGER = "python3 /mnt/project/lab/dom0tools/ack_forger.py"
PORT = 8031


@pytest.mark.lab(timeout=1500)
def test_a_forged_ack_is_refused_by_name_and_releases_nothing(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="fa", ip="169.254.20.13", mac="00:16:3e:00:00:13")
    when = f"/tmp/forge-{spec.name}"
    try:
        a.run(f"rm -f {when}", timeout=30)
        guest.create(a, spec)
        recv = b.spawn(protect.OURS_RECEIVER.format(port=PORT))
        recv.wait_output(r"listening", 30, stderr=True)
        send = a.spawn(protect.OURS + f" -F -d -s '' {spec.name} "
                       f"'{FORGER} --after 5 --when {when} {b.ip} {PORT}'")
        protect.wait_copy(b, spec, recv, send, PORT)
        send.wait_output(r"protecting", 240, stderr=True)
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 400")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow, the client's counter climbs
        found = re.findall(r"(?m)^epoch (\d+): ", send.stderr())
        nxt = int(found[-1]) + 1 if found else 1
        send.wait_output(rf"(?m)^epoch {nxt}: ", 60, stderr=True)  # a fresh ACK
        a.run(f"touch {when}", timeout=30, check=True)
        t_forge = time.time()
        ended = send.wait(180)
        err = ended.stderr
        m = re.search(r"ack_forger: forged REMUS_ACK of epoch (\d+) \(sequence number "
                      r"(\d+), a MAC of zeros\) at offset (\d+)", err)
        assert m, f"the relay forged nothing:\n{err[-3000:]}"
        forged, seq, offset = (int(g) for g in m.groups())

        # A: the frame refused by name, nothing of it released, the guest paused.
        assert ended.rc == 1, f"protect exited {ended.rc}:\n{err[-3000:]}"
        refusal = f"REMUS_ACK at offset {offset} "
        assert refusal in err and "bad MAC: refused" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "is PAUSED here" in err and "output not acknowledged was dropped" in err, \
            err[-3000:]
        released = [int(e) for e in re.findall(r"(?m)^epoch (\d+): ", err)]
        assert released and max(released) < forged, (forged, released[-5:])
        a_state = guest.domain_state(a, spec.name) or ""
        assert "p" in a_state, f"A's copy is not paused: {a_state!r}"

        # B: resumes when the stream ends, from an epoch A released nothing beyond.
        running = protect.wait_failover(b, spec, recv, timeout=240)
        rerr = recv.stderr()
        r = re.search(r"resuming from epoch (\d+)", rerr)
        assert r, rerr[-2000:]
        assert int(r.group(1)) >= max(released), (r.group(1), max(released))
        assert copies(a, b, spec.name) == ["B"]
        seen = protect.Seen.by(client)
        after = guest.counter(b, spec)
        assert after.bootid == seen.last.bootid
        time.sleep(6)
        held = protect.HeldConnection.of(client.output(), t_forge)
        print(f"\n[forged ACK] relay: epoch {forged}, sequence number {seq}, offset "
              f"{offset}; A refused it "
              f"({err[err.index(refusal):][:160]!r}), released up to epoch "
              f"{max(released)}, paused; B resumed from epoch {r.group(1)} {running:.1f} s "
              f"later; counter seen up to {seen.top}, first on B {after.value}; client: "
              f"{held.text()}")
        protect.check_output_commit(seen.top, after, held)
        assert copies(a, b, spec.name) == ["B"]
    finally:
        destroy(a, spec.name)
        destroy(b, spec.name)
