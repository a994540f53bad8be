"""A two-node Pacemaker cluster in the lab (tests/lab/test_cluster.py and `make
cluster-demo` use it). Dom0s come from Lab(cluster=True) (build.CLUSTER_PACKAGES).

- FenceDesk: the machine's half of the lab fence agent (lab/dom0tools/fence_xenlab): it
  polls the run's share for request files and answers them, killing a host's QEMU for off.
- form(lab): corosync (two_node, knet over xenbr0), pacemakerd, sshd with one root key on
  both dom0s, `xen-remus` as a command, the OCF agent (`xen-remus service install`) and
  the fence agent in place; waits for both nodes online.
- configure(lab, *specs): fencing (a fence_xenlab device per host, banned from the host
  it fences, optionally with a delay: the two-node fence race's tie-break;
  stonith-action=off) and each guest as its own promotable clone of
  xen-remus:protected-guest (pg-NAME-clone), optionally booted by Pacemaker (`config`)
  where a location preference puts it; one cibadmin update (no crmsh or pcs in the
  image). Protect's log: the share's xen/xen-remus/NAME.protect.log.
- roles(host, spec), copies(hosts, names), status(host, name): what the cluster, xl and
  xen-remus say, read from this machine.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any

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
LOG_DIR = "/var/log/xen/xen-remus"  # the agent's log_dir: on the share, kept past a kill
PREFER_SCORE = 100  # a location preference for the promoted role: below the agent's scores


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
        sender = next((h for h, n in NODES.items() if n == req.get("from")), None)
        if sender in self.lab.hosts and not self.lab.hosts[sender].alive():
            # Written just before its host was killed: a node that is off fences nothing.
            return {"ok": False, "error": f"{req.get('from')} is off"}
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


def _nv(owner: str, kv: Mapping[str, str]) -> str:
    return "".join(f'<nvpair id="{owner}-{k}" name="{k}" value="{v}"/>' for k, v in kv.items())


def clone_id(spec: GuestSpec) -> str:
    return f"pg-{spec.name}-clone"


def backup_ready(name: str) -> str:
    """Shell: exit 0 once this dom0's receiver of ``name`` holds a whole copy."""
    return ("xen-remus status --json | python3 -c 'import json, sys; sys.exit(0 if any("
            f"d.get(\"domain\") == \"{name}\" and d.get(\"role\") == \"backup\" and "
            "d.get(\"alive\") and d.get(\"committed\") is not None for d in "
            "json.load(sys.stdin)) else 1)'")


def clone_xml(spec: GuestSpec, cold: bool = False) -> str:
    """The guest's promotable clone; ``cold``: the agent may boot it (`config`, the
    spec's file on the share) where Pacemaker promotes it while it runs nowhere."""
    rid = f"pg-{spec.name}"
    params = {"domain": spec.name, "nodes": " ".join(f"{n}=169.254.10.{i}" for i, n in
                                                     enumerate(NODES.values(), 1)),
              "protect_options": f"-d -F --heartbeat-timeout {HB_MS}",
              "receive_options": f"--heartbeat-timeout {HB_MS}", "ssh": SSH,
              "log_dir": LOG_DIR}
    if cold:
        params["config"] = f"/mnt/lab/guests/{spec.name}.cfg"
    ops = "".join(f'<op id="{rid}-{n}-{r or "any"}" name="{n}" interval="{i}" '
                  f'timeout="{OP_TIMEOUT_S}s"{f" role={chr(34)}{r}{chr(34)}" if r else ""}/>'
                  for n, i, r in (("monitor", "10s", "Promoted"),
                                  ("monitor", "20s", "Unpromoted"), ("start", "0", ""),
                                  ("stop", "0", ""), ("promote", "0", ""),
                                  ("demote", "0", ""), ("notify", "0", "")))
    return (f'<clone id="{rid}-clone">'
            f'<meta_attributes id="{rid}-clone-meta">{_nv(rid + "-c", CLONE_META)}'
            '</meta_attributes>'
            f'<primitive id="{rid}" class="ocf" provider="xen-remus" type="protected-guest">'
            f'<instance_attributes id="{rid}-ia">{_nv(rid, params)}</instance_attributes>'
            f'<operations>{ops}</operations></primitive></clone>')


def fence_xml(delay: Mapping[str, str] | None = None) -> str:
    """One fence_xenlab device per host, fence-A for A...; ``delay``: host -> a
    pcmk_delay_base for the device that fences it (that host wins a fence race)."""
    out = ""
    for host, node in NODES.items():
        ia = {"pcmk_host_map": f"{node}:{host}"}
        if delay and host in delay:
            ia["pcmk_delay_base"] = delay[host]
        out += (f'<primitive id="fence-{host}" class="stonith" type="fence_xenlab">'
                f'<instance_attributes id="fence-{host}-ia">{_nv("f" + host, ia)}'
                '</instance_attributes><operations>'
                f'<op id="fence-{host}-mon" name="monitor" interval="60s"/>'
                '</operations></primitive>')
    return out


def resources_xml(*specs: GuestSpec, cold: bool = False,
                  fence_delay: Mapping[str, str] | None = None) -> str:
    """The fence devices and each guest's promotable clone, as the CIB holds them."""
    return (f"<resources>{fence_xml(fence_delay)}"
            + "".join(clone_xml(s, cold) for s in specs) + "</resources>")


def constraints_xml(prefer: Mapping[str, str] | None = None) -> str:
    """No host fences itself; ``prefer``: guest name -> lab host where Pacemaker should
    promote it (a preference the agent's scores outweigh once it runs somewhere)."""
    bans = "".join(f'<rsc_location id="fence-{h}-not-on-{h}" rsc="fence-{h}" node="{n}" '
                   'score="-INFINITY"/>' for h, n in NODES.items())
    pref = "".join(f'<rsc_location id="prefer-{g}" rsc="pg-{g}-clone" role="Promoted" '
                   f'node="{NODES[h]}" score="{PREFER_SCORE}"/>'
                   for g, h in (prefer or {}).items())
    return f"<constraints>{bans}{pref}</constraints>"


def configure(lab: Lab, *specs: GuestSpec, cold: bool = False,
              prefer: Mapping[str, str] | None = None,
              fence_delay: Mapping[str, str] | None = None,
              stonith_timeout: str = "120s") -> None:
    """Fencing on, and each guest's clone with its constraints in one CIB update (so
    that Pacemaker never places a guest before its preference is known). A guest that
    runs already is found by the probes (promoted where it runs); with ``cold`` the
    agent boots a guest that runs nowhere where it is promoted (its config on the share:
    ``spec.write``)."""
    for spec in specs if cold else ():
        spec.write(lab.a)
    path = lab.rundir / "share" / "cluster" / "configuration.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(configuration_xml(*specs, cold=cold, prefer=prefer,
                                      fence_delay=fence_delay))
    for cmd in cib_commands("/mnt/lab/cluster/configuration.xml", stonith_timeout):
        lab.a.run(cmd, timeout=120).check()


def configuration_xml(*specs: GuestSpec, cold: bool = False,
                      prefer: Mapping[str, str] | None = None,
                      fence_delay: Mapping[str, str] | None = None) -> str:
    """What configure() adds to the CIB's configuration section."""
    return (f"<configuration>{resources_xml(*specs, cold=cold, fence_delay=fence_delay)}"
            f"{constraints_xml(prefer)}</configuration>")


def cib_commands(xml_file: str, stonith_timeout: str = "120s") -> list[str]:
    """The shell commands of configure(), ``xml_file`` holding configuration_xml()
    (tests/unit/test_lab_cluster.py runs them against a CIB file)."""
    props = [f"crm_attribute --type crm_config --name {p} --update {v}" for p, v in
             (("stonith-enabled", "true"), ("stonith-action", "off"),
              ("stonith-timeout", stonith_timeout))]
    return [*props, f"cibadmin --modify --scope configuration --xml-file {xml_file}"]


def roles(host: Host, spec: GuestSpec) -> dict[str, str]:
    """Node -> role (Promoted, Unpromoted, ...) of the guest's clone instances, as
    crm_mon on ``host`` reports them."""
    r = host.run("crm_mon -1 --output-as=xml", timeout=120)
    try:
        return roles_of(r.stdout, spec)
    except ET.ParseError as exc:
        raise LabError(f"host {host.name}: crm_mon --output-as=xml: {exc}: "
                       f"{r.stdout[:500]}{r.stderr[-500:]}") from None


def roles_of(crm_mon_xml: str, spec: GuestSpec) -> dict[str, str]:
    root = ET.fromstring(crm_mon_xml)
    out: dict[str, str] = {}
    for res in root.findall(f".//clone[@id='{clone_id(spec)}']/resource"):
        for node in res.findall("node"):
            out[str(node.get("name"))] = str(res.get("role"))
    return out


def wait_role(host: Host, spec: GuestSpec, want: Mapping[str, str], timeout: float,
              every: float = 5) -> None:
    """Until ``roles`` includes ``want`` (e.g. {"dom0B": "Promoted"})."""
    deadline = time.monotonic() + timeout
    while True:
        got = roles(host, spec)
        if all(got.get(n) == r for n, r in want.items()):
            return
        if time.monotonic() > deadline:
            raise LabError(f"{clone_id(spec)}: roles {got}, not {dict(want)}, after "
                           f"{timeout:.0f} s\n{diagnose(host, spec.name)}")
        time.sleep(every)


def runs(state: str | None) -> bool:
    """An `xl list` state of a domain that runs: not paused, suspended, crashed, dying."""
    return state is not None and not set(state) & set("pscd")


def copies(hosts: Iterable[Host], names: Iterable[str]) -> dict[str, list[str]]:
    """Guest name -> the live hosts on which it runs (one `xl list` per host)."""
    from lab.guest import domain_states

    states = {h.name: domain_states(h) for h in hosts if h.alive()}
    return {n: [h for h, st in states.items() if runs(st.get(n))] for n in names}


def status(host: Host, name: str) -> dict[str, dict[str, Any]]:
    """``name``'s xen-remus status documents on ``host`` by role (alive or final)."""
    r = host.run("xen-remus status --json", timeout=120)
    if not r.ok:
        raise LabError(f"host {host.name}: xen-remus status --json: {r.stderr}")
    return {str(d.get("role")): d for d in json.loads(r.stdout) if d.get("domain") == name}


def diagnose(host: Host, name: str | None = None) -> str:
    """crm_mon with fail counts, what the agents and fencing said (Pacemaker's log), and
    the tail of protect's log of ``name`` (on the share), for errors."""
    out = host.run("crm_mon -1 -r -f 2>&1 | tail -40; echo '--- pacemaker.log (agents, "
                   "fencing)'; grep -hE 'protected-guest|fence' /var/log/pacemaker/pacemaker"
                   ".log | tail -40", timeout=120).stdout if host.alive() \
        else f"(host {host.name} is off)\n"
    if name:
        log = host.xenlog / "xen-remus" / f"{name}.protect.log"
        if log.exists():
            out += f"--- {log} (tail)\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-30:])
    return out


def promoted_on(host: Host) -> str | None:
    """The node where crm_mon shows the (only) clone promoted, if any."""
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
