"""The patched xl (patches/, built by patches/build-xl.sh) handing `xl remus` over to
xen-remus on real Xen: a PV guest protected from host A to host B by `xl -v remus` (and,
in a second case, by `xl -v migrate --remus`), host A killed, the guest goes on on B.

On A the patched xl runs in a mount namespace of its own whose /etc/xen/xl.conf is the
host's plus remus.engine naming a wrapper that records its arguments and runs
`python3 -m xen_remus` (the lab runs xen-remus from the share, not from PATH). B runs our
receiver as for test_protect.py. Checked: the engine got `protect` with the xl remus options
translated, the protection is ours (per-epoch ACK lines, `xen-remus status`), and after the
kill the same guest runs on B with its counter not gone back and the client's connection
held. Needs on this machine what build-xl.sh needs (libxen-dev, libyajl-dev, dpkg-dev):
the test fails with build-xl.sh's message when they are missing.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from lab import guest, protect
from lab.guest import GuestSpec, destroy
from lab.lab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
DIR = "/tmp/xlr"  # on A (tmpfs): the patched xl, its xl.conf, the engine wrapper
PORT = 8051
# The engine wrapper: records its arguments (one a line), then is xen-remus.
ENGINE = """#!/bin/sh
printf '%s\\n' "$@" > {dir}/engine-argv
exec python3 -m xen_remus "$@"
"""
# The patched xl with remus.engine set for it alone (a private mount namespace).
RUN = """#!/bin/sh
exec unshare -m sh -c 'mount --bind {dir}/xl.conf /etc/xen/xl.conf && exec {dir}/xl "$@"' \\
    xl "$@"
"""
# `xl remus` (patch 0001) and `xl migrate --remus` (0002: the same command, as xm had it).
SENDER = ("exec {dir}/run -v {cmd} -F -d -s '' {{name}} 'socat - TCP:{{bip}}:{{port}}'")
HOW = {"remus": ("remus", "px", 51), "migrate--remus": ("migrate --remus", "pm", 52)}


def build_xl() -> Path:
    r = subprocess.run([str(ROOT / "patches" / "build-xl.sh")], capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, f"patches/build-xl.sh failed:\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.mark.lab(timeout=1500)
@pytest.mark.parametrize("how", list(HOW))
def test_patched_xl_remus_hands_over_and_fails_over(lab_two: Lab, how: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = lab_two.a, lab_two.b
    xl = build_xl()
    staged = a.share / "xlr"  # /mnt/lab/xlr in A's dom0
    staged.mkdir(exist_ok=True)
    (staged / "xl").write_bytes(xl.read_bytes())
    (staged / "xen-remus").write_text(ENGINE.format(dir=DIR))
    (staged / "run").write_text(RUN.format(dir=DIR))
    a.run(f"mkdir -p {DIR} && install -m 755 /mnt/lab/xlr/xl /mnt/lab/xlr/xen-remus "
          f"/mnt/lab/xlr/run {DIR}/ && touch /etc/xen/xl.conf && "
          f"{{ cat /etc/xen/xl.conf; echo 'remus.engine=\"{DIR}/xen-remus\"'; }} "
          f"> {DIR}/xl.conf", timeout=60, check=True)
    # The binary runs on this dom0 (its libxl) and is the patched one.
    h = a.run(f"{DIR}/run migrate -h", timeout=60)
    assert h.rc == 0 and "--remus" in h.stdout, h.stdout + h.stderr
    cmd, name, n = HOW[how]
    monkeypatch.setitem(protect.PROTECTORS, "xl-patched", protect.Protector(
        receiver=protect.OURS_RECEIVER, sender=SENDER.format(dir=DIR, cmd=cmd)))

    spec = GuestSpec(name=name, ip=f"169.254.20.{n}", mac=f"00:16:3e:00:00:{n}")
    try:
        guest.create(a, spec)
        t0 = time.monotonic()
        recv, send = protect.protect(a, b, spec, "xl-patched", port=PORT)
        send.wait_output(r"protecting", 240, stderr=True)  # epoch 0 committed on B
        print(f"\n[xl {cmd}] initial copy committed on B after "
              f"{time.monotonic() - t0:.1f} s")
        argv = a.run(f"cat {DIR}/engine-argv", timeout=30, check=True).stdout.split("\n")
        want = ["-v", "protect", "-d", "-F", "-s", "", "--", spec.name,
                f"socat - TCP:{b.ip}:{PORT}"]
        assert argv[:-1] == want, f"the engine got {argv[:-1]}, expected {want}"
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 150")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow
        assert not send.done(), f"xl remus ended early: {send.stderr()[-3000:]}"
        st = a.run(f"python3 -m xen_remus status --json {spec.name}", timeout=120)
        assert st.ok and '"protecting"' in st.stdout, st.stdout + st.stderr
        acked = [int(e) for e in re.findall(r"(?m)^epoch (\d+): ", send.stderr())]
        assert acked, f"no ACKed epoch on A: {send.stderr()[-2000:]}"
        send.wait_output(rf"(?m)^epoch {acked[-1] + 1}: ", 120, stderr=True)
        protect.kill_and_check(a, b, spec, recv, client, "xl-patched")
    finally:
        if a.alive():
            destroy(a, spec.name)
        destroy(b, spec.name)
