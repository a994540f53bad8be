"""The direct TCP transport on real Xen (lab, two hosts; not in ci-tests.txt): `xen-remus
migrate-receive -r --listen PORT --key-file K` on B, `xen-remus protect --tcp PORT
--key-file K` on A; no ssh, no socat.

1. A primary with the wrong key is refused by the handshake: protect exits 1 naming the
   key, before the guest is touched (it runs on A, unpaused, and nothing of it reaches
   B); B logs the refused peer by address and listens on.
2. The same listener then takes the right primary: the guest is protected, host A is
   killed (SIGKILL of its QEMU) and the guest goes on on B, the same guest, with a
   client's TCP connection to it held across the failover and its counter never going
   back (output commit), as tests/lab/test_protect.py checks over socat.
"""

from __future__ import annotations

import re
import secrets
import time

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab

pytestmark = pytest.mark.lab

PORT = 8013
WRONG_KEY = "/root/wrong.key"


def running_unpaused(state: str | None) -> bool:
    return state is not None and not {"p", "s", "c", "d"} & set(state)


@pytest.mark.lab(timeout=1500)
def test_tcp_direct_wrong_key_refused_then_failover_on_host_kill(lab_two: Lab) -> None:
    a, b = lab_two.a, lab_two.b
    spec = GuestSpec(name="td", kind="pv", ip="169.254.20.10", mac="00:16:3e:00:00:0a")
    key, wrong = secrets.token_hex(16), secrets.token_hex(16)
    p = protect.PROTECTORS["xen-remus-tcp"]
    try:
        for h in (a, b):
            h.run(f"umask 077 && printf %s {key} > {protect.DIRECT_KEY}", timeout=60,
                  check=True)
        a.run(f"umask 077 && printf %s {wrong} > {WRONG_KEY}", timeout=60, check=True)
        guest.create(a, spec)
        before_state = guest.domain_state(a, spec.name)
        assert running_unpaused(before_state), before_state
        recv = b.spawn(p.receiver.format(port=PORT))
        recv.wait_output(r"listening on", 60, stderr=True)

        # 1. The wrong key.
        bad = a.spawn(p.sender.replace(protect.DIRECT_KEY, WRONG_KEY).format(
            name=spec.name, bip=b.ip, port=PORT))
        r = bad.wait(180)
        print(f"\n[tcp] wrong key: protect exited {r.rc} after {r.seconds:.1f} s: "
              f"{r.stderr.strip().splitlines()[-1:]}")
        assert r.rc == 1, r.stderr[-2000:]
        assert "the backup's proof does not verify under our key" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "initial copy" not in r.stderr, r.stderr[-2000:]
        recv.wait_output(r"refused \S+: the peer refused our proof", 60, stderr=True)
        assert not recv.done(), recv.stderr()[-2000:]  # it listens on
        state = guest.domain_state(a, spec.name)
        assert running_unpaused(state), f"the guest on A after the refusal: {state}"
        assert guest.domain_state(b, f"{spec.name}--incoming") is None
        assert guest.domain_state(b, spec.name) is None
        print(f"[tcp] receiver on B: {recv.stderr().strip().splitlines()[-1:]}")

        # 2. The right key, through the same listener; then host A dies.
        t0 = time.monotonic()
        send = a.spawn(p.sender.format(name=spec.name, bip=b.ip, port=PORT))
        protect.wait_copy(b, spec, recv, send, PORT)
        send.wait_output(r"protecting", 240, stderr=True)  # epoch 0 committed on B
        print(f"[tcp] initial copy committed on B after {time.monotonic() - t0:.1f} s")
        assert re.search(r"authenticated; receiving", recv.stderr()), recv.stderr()[-2000:]
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 150")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        acked = re.findall(r"^epoch (\d+): ", send.stderr(), re.M)
        assert len(acked) > 3, send.stderr()[-2000:]
        protect.kill_and_check(a, b, spec, recv, client, "tcp")
        print(f"[tcp] receiver log tail:\n{recv.stderr()[-800:]}")
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)
        destroy(b, f"{spec.name}--incoming")
