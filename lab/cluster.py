"""A two-node Pacemaker cluster in the lab (UNPROVEN: not yet run; tests/lab/test_cluster.py
and `make cluster-demo` use it). Dom0s come from Lab(cluster=True) (build.CLUSTER_PACKAGES).

- FenceDesk: the machine's half of the lab fence agent (lab/dom0tools/fence_xenlab): it
  polls the run's share for request files and answers them, killing a host's QEMU for off.
- form(lab): corosync (two_node, knet over xenbr0), pacemakerd, sshd with one root key on
  both dom0s, `xen-remus` as a command, the OCF agent (`xen-remus service install`) and
  the fence agent in place; waits for both nodes online.
- configure(lab, spec): fencing (fence_xenlab, stonith-action=off) and the guest as a
  promotable clone of xen-remus:protected-guest, through cibadmin (no crmsh or pcs in
  the image).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time

from lab.errors import LabError
from lab.guest import GuestSpec
from lab.host import Host
from lab.lab import Lab

NODES = {"A": "dom0A", "B": "dom0B"}  # uname -n of each dom0 (lab/dom0/init)
XEN_REMUS = "#!/bin/sh\nPYTHONPATH=/mnt/project exec python3 -m xen_remus \"$@\"\n"
SSH = "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=10"
# TCG: every Python start costs seconds, an action of the agent runs several.
OP_TIMEOUT_S = 240
HB_MS = 6000  # as lab/protect.py: a dom0 busy with an epoch stalls for over a second
CLONE_META = {"promotable": "true", "promoted-max": "1", "promoted-node-max": "1",
              "clone-max": "2", "clone-node-max": "1", "notify": "true"}


class FenceDesk:
    """Answers fence_xenlab's requests in ``lab``'s share/fence: off kills the host's
    QEMU (a real power-off), status says whether it runs, list names the hosts, on is
    refused (the lab cannot boot a killed host again). Every request is kept in
    ``done``."""

    def __init__(self, lab: Lab, poll: float = 0.2) -> None:
        self.lab, self.poll = lab, poll
        self.dir = lab.rundir / "share" / "fence"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fence-desk")

    def __enter__(self) -> FenceDesk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def answer(self, req: dict[str, str]) -> dict[str, object]:
        action, plug = req.get("action"), req.get("plug", "")
        if action == "list" or (action == "monitor" and not plug):
            # monitor without a plug: is the device (this desk) there? It answered.
            return {"ok": True, "hosts": sorted(self.lab.hosts)}
        host = self.lab.hosts.get(plug)
        if host is None:
            return {"ok": False, "error": f"no lab host {plug!r}"}
        if action == "off":
            if host.alive():
                host.kill()
            return {"ok": not host.alive(), "status": "off"}
        if action in ("status", "monitor"):
            return {"ok": True, "status": "on" if host.alive() else "off"}
        return {"ok": False, "error": f"{action}: the lab cannot do that to a host"}

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            for req in sorted(self.dir.glob("req-*.json")):
                try:
                    doc = json.loads(req.read_text())
                except (OSError, ValueError):
                    continue  # being written (renamed into place, so rarely)
                ans = self.answer(doc)
                print(f"lab fence: {doc} -> {ans}", flush=True)
                self.done.append(doc)
                resp = req.with_name(req.name.replace("req-", "resp-", 1))
                tmp = resp.with_suffix(".tmp")
                tmp.write_text(json.dumps(ans))
                tmp.replace(resp)
                req.unlink(missing_ok=True)


def _corosync_conf() -> str:
    nodes = "".join(f"    node {{\n        ring0_addr: 169.254.10.{i}\n        name: {n}\n"
                    f"        nodeid: {i}\n    }}\n" for i, n in enumerate(NODES.values(), 1))
    return ("totem {\n    version: 2\n    cluster_name: xenlab\n    transport: knet\n"
            "    crypto_cipher: aes256\n    crypto_hash: sha256\n"
            # TCG: a dom0 busy with an epoch must not look dead to corosync.
            "    token: 10000\n}\n"
            f"nodelist {{\n{nodes}}}\n"
            "quorum {\n    provider: corosync_votequorum\n    two_node: 1\n}\n"
            "logging {\n    to_syslog: no\n    to_logfile: yes\n"
            "    logfile: /var/log/xen/corosync.log\n}\n")


def form(lab: Lab, timeout: float = 600) -> None:
    """Both dom0s as one cluster, ready for configure()."""
    share = lab.rundir / "share" / "cluster"
    share.mkdir(parents=True, exist_ok=True)
    (share / "authkey").write_bytes(secrets.token_bytes(128))
    (share / "corosync.conf").write_text(_corosync_conf())
    (share / "xen-remus").write_text(XEN_REMUS)
    key = share / "id_ed25519"
    key.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True)
    setup = (
        "set -e; S=/mnt/lab/cluster; "
        "install -m 755 $S/xen-remus /usr/local/bin/xen-remus; "
        "install -D -m 755 /mnt/project/lab/dom0tools/fence_xenlab /usr/sbin/fence_xenlab; "
        "mkdir -p /tmp/units && xen-remus service install --unit-dir /tmp/units "
        "--no-script --no-reload; "
        "install -D -m 400 $S/authkey /etc/corosync/authkey; "
        "install -m 644 $S/corosync.conf /etc/corosync/corosync.conf; "
        "install -D -m 600 $S/id_ed25519 /root/.ssh/id_ed25519; "
        "install -m 600 $S/id_ed25519.pub /root/.ssh/authorized_keys; "
        "ssh-keygen -A; mkdir -p /run/sshd; /usr/sbin/sshd; "
        "mkdir -p /var/log/cluster /var/lib/pacemaker/cores; corosync")
    for host in lab.hosts.values():
        host.run(setup, timeout=300).check()
    for host in lab.hosts.values():
        host.spawn("exec pacemakerd > /var/log/xen/pacemakerd.log 2>&1")
    wait_for(lab.a, "crm_mon -1 | grep -q 'Online: \\[ dom0A dom0B \\]'", timeout,
             "both nodes online")


def wait_for(host: Host, cond: str, timeout: float, what: str, every: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not host.run(cond, timeout=120).ok:
        if time.monotonic() > deadline:
            mon = host.run("crm_mon -1 -r 2>&1 | tail -30", timeout=120).stdout
            raise LabError(f"host {host.name}: not {what} after {timeout:.0f} s:\n{mon}")
        time.sleep(every)


def _nv(owner: str, kv: dict[str, str]) -> str:
    return "".join(f'<nvpair id="{owner}-{k}" name="{k}" value="{v}"/>' for k, v in kv.items())


def resources_xml(spec: GuestSpec) -> str:
    """The fence device and the promotable clone, as the CIB holds them."""
    params = {"domain": spec.name, "nodes": " ".join(f"{n}=169.254.10.{i}" for i, n in
                                                     enumerate(NODES.values(), 1)),
              "protect_options": f"-d -F --heartbeat-timeout {HB_MS}",
              "receive_options": f"--heartbeat-timeout {HB_MS}", "ssh": SSH}
    inst = "".join(f'<nvpair id="pg-{k}" name="{k}" value="{v}"/>' for k, v in params.items())
    ops = "".join(f'<op id="pg-{n}-{r or "any"}" name="{n}" interval="{i}" '
                  f'timeout="{OP_TIMEOUT_S}s"{f" role={chr(34)}{r}{chr(34)}" if r else ""}/>'
                  for n, i, r in (("monitor", "10s", "Promoted"),
                                  ("monitor", "20s", "Unpromoted"), ("start", "0", ""),
                                  ("stop", "0", ""), ("promote", "0", ""),
                                  ("demote", "0", ""), ("notify", "0", "")))
    hostmap = ";".join(f"{n}:{h}" for h, n in NODES.items())
    return (
        '<resources>'
        '<primitive id="fence-lab" class="stonith" type="fence_xenlab">'
        f'<instance_attributes id="fence-lab-ia">{_nv("fl", {"pcmk_host_map": hostmap})}'
        '</instance_attributes>'
        '<operations><op id="fence-lab-mon" name="monitor" interval="60s"/></operations>'
        '</primitive>'
        '<clone id="pg-clone">'
        f'<meta_attributes id="pg-clone-meta">{_nv("pgc", CLONE_META)}'
        '</meta_attributes>'
        '<primitive id="pg" class="ocf" provider="xen-remus" type="protected-guest">'
        f'<instance_attributes id="pg-ia">{inst}</instance_attributes>'
        f'<operations>{ops}</operations></primitive></clone></resources>')


def configure(lab: Lab, spec: GuestSpec) -> None:
    """Fencing on, and the guest's clone (it runs on A already: A's probe finds it
    promoted, B's instance starts as its backup)."""
    a = lab.a
    for prop, val in (("stonith-enabled", "true"), ("stonith-action", "off"),
                      ("stonith-timeout", "120s")):
        a.run(f"crm_attribute --type crm_config --name {prop} --update {val}",
              timeout=120).check()
    xml = resources_xml(spec).replace("'", "'\\''")
    a.run(f"cibadmin --replace --scope resources --xml-text '{xml}'", timeout=120).check()


def promoted_on(host: Host) -> str | None:
    """The node where crm_mon shows the clone promoted, if any."""
    r = host.run("crm_mon -1 -r 2>&1", timeout=120)
    for line in r.stdout.splitlines():
        if "Promoted:" in line or "Masters:" in line:
            for n in NODES.values():
                if n in line:
                    return n
    return None


def main() -> int:
    """`make cluster-demo`: tests/lab/test_cluster.py's scenario, narrated."""
    import tests.lab.test_cluster as t

    with Lab(2, cluster=True) as lab, FenceDesk(lab) as desk:
        t.scenario(lab, desk, say=lambda m: print(f"cluster-demo: {m}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
