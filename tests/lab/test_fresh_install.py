"""The README's install steps on fresh lab hosts, then protect (lab, two hosts; not in
ci-tests.txt).

The steps are read from the README ("Install on your Xen hosts", lab/install.py) and
followed in both dom0s with nothing of ours importable: the agent's PYTHONPATH to the
checkout is unset, and the test first checks that neither `xen-remus` nor the module is
there. Lab VMs have no network, so: `apt-get install` is checked rather than run (each
package it names must be installed in the lab's image, lab/build.py DOM0_PACKAGES;
xen-system-amd64 and `reboot` are what the lab does by booting its pinned hypervisor, so
dom0 must run on Xen), and the wheel `pip install --no-index` takes is built on this
machine and reaches dom0 over the run's share (/path/to/ is /mnt/lab/dist/). Every other
step runs as written. `xen-remus check` may miss only the block-remus script while a later
step installs it, and must pass once all steps ran.

Then the installed command protects a guest from A to B over the direct transport
(README, "A direct TCP transport": a key at /etc/xen-remus/key on both hosts, the backup's
listener, `protect --tcp`; no ssh: the lab's dom0s run no sshd), and host A is killed:
the guest goes on on B, the same guest, its counter never back, a client's connection
held (as tests/lab/test_tcp_direct.py checks for the checkout).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator

import pytest

from lab import guest, install, protect
from lab.guest import GuestSpec, destroy
from lab.host import Host, Job
from lab.lab import Lab

pytestmark = pytest.mark.lab

PORT = 8091
KEY = "/etc/xen-remus/key"
STEP_TIMEOUT_S = 900  # a venv with pip, or pip itself, under TCG
# Installed by the lab by other means than apt (it boots the pinned hypervisor directly).
NOT_FROM_APT = {"xen-system-amd64"}


def on_both(hosts: tuple[Host, ...], cmd: str, timeout: float) -> dict[str, tuple[int, str]]:
    """Run ``cmd`` in every dom0 at once; (rc, stdout + stderr) by host."""
    jobs: dict[str, Job] = {h.name: h.spawn(cmd) for h in hosts}
    out = {}
    for name, job in jobs.items():
        r = job.wait(timeout)
        out[name] = (r.rc, r.stdout + r.stderr)
    return out


def follow_readme(hosts: tuple[Host, ...], steps: list[str]) -> None:
    """The README's steps in order, in every dom0, each checked (see the module doc)."""
    for i, step in enumerate(steps):
        t0 = time.monotonic()
        pkgs = install.apt_packages(step)
        if pkgs is not None:
            want = [p for p in pkgs if p not in NOT_FROM_APT]
            got = on_both(hosts, f"dpkg-query -W -f '${{Package}} ${{Status}}\\n' {' '.join(want)}",
                          120)
            for name, (_, text) in got.items():
                ok = set(re.findall(r"^(\S+) install ok installed$", text, re.M))
                assert ok >= set(want), (f"host {name}: the README's `apt-get install` names "
                                         f"{sorted(set(want) - ok)}, not in the lab's dom0 "
                                         f"(lab/build.py DOM0_PACKAGES):\n{text}")
            what = f"installed already: {' '.join(want)}"
        elif step == "reboot":
            got = on_both(hosts, "cat /proc/xen/capabilities", 60)
            for name, (_, text) in got.items():
                assert "control_d" in text, f"host {name}: dom0 does not run on Xen: {text}"
            what = "the lab booted dom0 on Xen"
        else:
            got = on_both(hosts, install.in_dom0(step), STEP_TIMEOUT_S)
            for name, (rc, text) in got.items():
                if step == "xen-remus check" and rc == 1:
                    gaps = install.missing(text)
                    later = any("service install" in s for s in steps[i + 1:])
                    assert later and gaps == ["block-remus"], (
                        f"host {name}: `xen-remus check` misses {gaps}:\n{text}")
                else:
                    assert rc == 0, f"host {name}: `{step}` exited {rc}:\n{text[-3000:]}"
            last = got["A"][1].strip().splitlines()
            what = f"ran; on A: {last[-1] if last else '(no output)'}"
        print(f"[install] {step}\n[install]   {what} ({time.monotonic() - t0:.1f} s)")


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    """Two hosts booted for this test alone (the shared lab's may hold what other tests
    installed, e.g. block-remus)."""
    with Lab(2) as lab:
        yield lab


@pytest.mark.lab(timeout=2400)
def test_readme_install_then_protect_and_fail_over(fresh_lab: Lab) -> None:
    lab = fresh_lab
    a, b = lab.a, lab.b
    hosts = (a, b)
    spec = GuestSpec(name="fi", ip="169.254.20.91", mac="00:16:3e:00:00:91")
    p = protect.PROTECTORS["xen-remus-tcp"]
    try:
        # Nothing of ours: no command, no module with the checkout off the path, no venv,
        # no hotplug script, no state.
        got = on_both(hosts, install.CLEAN + "command -v xen-remus || echo no-command; "
                      "python3 -c 'import xen_remus' 2>/dev/null || echo no-module; "
                      "for f in /opt/xen-remus /etc/xen/scripts/block-remus /etc/xen-remus "
                      "/var/lib/xen-remus; do [ -e $f ] && echo has $f; done; true", 120)
        for name, (_, text) in got.items():
            assert text.split() == ["no-command", "no-module"], \
                f"host {name} is not fresh: {text}"
        wheel = install.build_wheel(lab.project, a.share / "dist")
        print(f"\n[install] built {wheel.name} ({wheel.stat().st_size} bytes) on this machine")

        follow_readme(hosts, install.install_steps((lab.project / "README.md").read_text()))

        got = on_both(hosts, install.CLEAN + "xen-remus check; echo rc=$?; "
                      "readlink -f \"$(command -v xen-remus)\"; "
                      f"{install.VENV}/bin/python -c 'import xen_remus; print(xen_remus.__file__)'",
                      STEP_TIMEOUT_S)
        for name, (_, text) in got.items():
            print(f"[install] host {name}: xen-remus check:\n{text}")
            assert "rc=0" in text, f"host {name}: xen-remus check still misses " \
                f"{install.missing(text)}"
            assert f"{install.VENV}/bin/xen-remus\n" in text, text
            assert re.search(rf"^{install.VENV}/lib/python3\.\d+/site-packages/xen_remus/",
                             text, re.M), f"host {name}: not the installed module:\n{text}"

        # The direct transport's key, the same file on both hosts (README).
        (a.share / "dist" / "key").write_bytes(secrets.token_bytes(32))
        for name, (rc, text) in on_both(hosts, f"install -m 600 /mnt/lab/dist/key {KEY}",
                                        60).items():
            assert rc == 0, f"host {name}: the key not installed at {KEY}: {text}"
        receiver = install.installed(p.receiver.replace(protect.DIRECT_KEY, KEY))
        sender = install.installed(p.sender.replace(protect.DIRECT_KEY, KEY))
        guest.create(a, spec)
        recv = b.spawn(receiver.format(port=PORT))
        recv.wait_output(r"listening on", 120, stderr=True)
        t0 = time.monotonic()
        send = a.spawn(sender.format(name=spec.name, bip=b.ip, port=PORT))
        protect.wait_copy(b, spec, recv, send, PORT)
        send.wait_output(r"protecting", 240, stderr=True)
        print(f"[install] installed xen-remus: initial copy committed on B after "
              f"{time.monotonic() - t0:.1f} s")
        client = b.spawn(f"exec python3 {protect.COUNTER_CLIENT} {spec.ip} 7000 300")
        client.wait_output(r'"counter"', 60)
        time.sleep(8)  # checkpoints flow
        assert not send.done(), f"protect ended early: {send.stderr()[-3000:]}"
        st = a.run(install.CLEAN + f"xen-remus status --json {spec.name}", timeout=120)
        assert st.ok and '"protecting"' in st.stdout, st.stdout + st.stderr
        protect.kill_and_check(a, b, spec, recv, client, "installed")
        print(f"[install] receiver log tail:\n{recv.stderr()[-600:]}")
    except BaseException:
        print(lab.logs())  # its own lab: the conftest's report shows the shared one's
        raise
    finally:
        for h in hosts:
            if h.alive():
                destroy(h, spec.name)
                destroy(h, f"{spec.name}--incoming")
