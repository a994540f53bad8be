#!/usr/bin/python3
"""OCF resource agent xen-remus:protected-guest: one Remus-protected Xen guest as a
Pacemaker promotable clone (two instances, one promoted), in the way of ocf:linbit:drbd.

  promoted    the guest runs on this node, and `xen-remus protect` checkpoints it to the
              other node ("protected"; "syncing" during the initial copy; "unprotected"
              while there is no backup)
  unpromoted  this node is ready to be the backup, and receives the checkpoints while a
              promoted instance protects to it ("receiving"; "lost" once the primary is
              declared dead and the copy waits for its promotion)

Design. The receiver is not a process of this agent: protect starts it itself, through
ssh, once per protection (as xl remus does; its stdin/stdout are the stream), so the
unpromoted instance's start only checks that the node can receive and clears what a
held copy left; a listener of our own would need a transport with mutual authentication,
which ssh already is. The promoted instance runs protect with `-s ''` and the whole
receiver command, `ssh PEER xen-remus migrate-receive -r --failover-on-promote`: that
receiver never fails over by itself. When its primary goes silent it holds its copy and
waits (`--promote-timeout`) for `xen-remus promote DOMAIN`, which only this agent's
promote action runs, and Pacemaker promotes only after the old primary was fenced (or
demoted). Without a promotion in time the copy stays held, as after a failed fence.

  start     checks; destroys a held copy left by an earlier receiver (it can never
            resume: stock xl stopped before its restore finished)
  promote   the guest runs here already: nothing; a receiver here: `xen-remus promote`,
            then wait for the guest to run; the guest halted here (paused by a failed
            protect): unpause it; else `xl create CONFIG` if `config` is set. Then
            protect to the peer.
  demote    protecting: `xen-remus handover` (protect takes a last checkpoint with the
            guest left suspended, has it ACKed, releases all output, closes the stream:
            the peer's receiver holds exactly the guest's last state, for its promotion),
            then destroy the suspended guest. Should the handover fail, the crash path:
            pause the guest, SIGKILL protect (the supervisor keeps the unacknowledged
            output held, so the peer's last committed epoch is all any client saw),
            destroy it. Not protecting: `xl shutdown -w` (bounded), then destroy.
  stop      kills a receiver here, destroys a held copy; demotes first if the guest
            runs here.
  monitor   from `xen-remus status --json` and `xl list`; sets the promotion score: 1000
            where the guest runs, 500 where a whole copy is received, 10 with `config`
            (a cold boot), none otherwise. A promoted instance whose protect ended is
            given a new one (at most once a minute), as the systemd unit restarts protect
            after exit 3: before a new protection's first checkpoint a failure leaves the
            guest running here, and the peer's copy of an older one is never resumed
            without a promotion.
  notify    post-start/post-promote: the promoted instance protects to a peer that just
            started.

Python (stdlib only, any python3), not sh: the state comes as JSON and the decisions are a
table best unit-tested (tests/unit/test_ocf_agent.py); OCF conventions otherwise: OCF_RESKEY_
parameters, OCF exit codes, messages on stderr (pacemaker-execd logs them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_PERM, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 4, 5, 6, 7
OCF_RUNNING_PROMOTED, OCF_FAILED_PROMOTED = 8, 9

SCORE_RUNNING, SCORE_COPY, SCORE_COLD = 1000, 500, 10
RELAUNCH_S = 60.0  # a promoted instance relaunches protect at most this often
PROMOTE_TIMEOUT_DEFAULT = 300
INCOMING = "--incoming"  # libxl's name for a domain being received
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")

PARAMS: dict[str, tuple[str, str, str]] = {  # name: (default, short, long)
    "domain": ("", "the guest's domain name", "The xl name of the protected guest."),
    "nodes": ("", "the two cluster nodes, NODE[=SSH-HOST]",
              "The two node names, each optionally with the host name ssh reaches it by "
              "(e.g. 'xen1=xen1-link xen2=xen2-link'); default: `crm_node -l`, by name."),
    "protect_options": ("-i 200", "more xen-remus protect options",
                        "Shell-quoted, e.g. '-i 100 -d -F --heartbeat-timeout 2000'."),
    "receive_options": ("", "more migrate-receive options for the backup",
                        "Shell-quoted, appended to `migrate-receive -r "
                        "--failover-on-promote` on the peer."),
    "key_file": ("", "pre-shared key file (--key-file), the same on both nodes", ""),
    "ssh": ("ssh -o BatchMode=yes", "how to reach the peer",
            "The command before the peer's host name that runs the receiver there."),
    "config": ("", "xl config to cold-boot the guest if no copy exists",
               "Used by promote only when the guest neither runs here nor is received "
               "here (the first start of the cluster): a cold boot, so only for a guest "
               "whose disks are shared or that keeps no state on disk."),
    "promote_timeout": (str(PROMOTE_TIMEOUT_DEFAULT), "how long a backup waits for its "
                        "promotion (s)",
                        "Give the cluster this long to fence the primary and promote the "
                        "backup; then the backup's copy is held (never resumed)."),
    "xen_remus": ("xen-remus", "the xen-remus command (on both nodes)", ""),
    "log_dir": ("/var/log/xen-remus", "where protect's output goes (DOMAIN.protect.log)", ""),
}
ACTIONS = (("start", 120), ("stop", 120), ("promote", 300), ("demote", 120),
           ("notify", 60), ("monitor", 60), ("meta-data", 5), ("validate-all", 30))


def meta_data() -> str:
    params = "".join(
        f'  <parameter name="{n}" unique="{int(n == "domain")}" '
        f'required="{int(n == "domain")}">\n'
        f'   <longdesc lang="en">{_x(ld or sd)}</longdesc>\n'
        f'   <shortdesc lang="en">{_x(sd)}</shortdesc>\n'
        f'   <content type="{"integer" if n == "promote_timeout" else "string"}" '
        f'default="{_x(d)}"/>\n  </parameter>\n' for n, (d, sd, ld) in PARAMS.items())
    acts = "".join(f'  <action name="{a}" timeout="{t}s"/>\n' for a, t in ACTIONS
                   if a != "monitor")
    acts += ('  <action name="monitor" depth="0" timeout="60s" interval="10s" '
             'role="Promoted"/>\n  <action name="monitor" depth="0" timeout="60s" '
             'interval="20s" role="Unpromoted"/>\n')
    return f"""<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="protected-guest" version="1.0">
 <version>1.1</version>
 <longdesc lang="en">{_x(__doc__ or "")}</longdesc>
 <shortdesc lang="en">A Xen guest protected by xen-remus (Remus), as a promotable clone</shortdesc>
 <parameters>
{params} </parameters>
 <actions>
{acts} </actions>
</resource-agent>
"""


def _x(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


class Agent:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.p = {n: self.env.get(f"OCF_RESKEY_{n}", d) for n, (d, _, _) in PARAMS.items()}
        self.domain = self.p["domain"]
        self.rsc = self.env.get("OCF_RESOURCE_INSTANCE", "protected-guest")
        self.run_dir = Path(self.env.get("XEN_REMUS_RUN_DIR", "/run/xen-remus"))
        self.own = self.run_dir / "ocf"
        self.marker = self.own / f"{self.domain}.started"
        self.launched = self.own / f"{self.domain}.protect"

    # --- plumbing ------------------------------------------------------------------------
    def log(self, level: str, msg: str) -> None:
        print(f"protected-guest({self.rsc})[{os.getpid()}]: {level}: {msg}", file=sys.stderr,
              flush=True)

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, env=self.env, check=False)
        except FileNotFoundError:
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found")
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout} s")

    def failed(self, r: subprocess.CompletedProcess[str], what: str,
               level: str = "ERROR") -> bool:
        if r.returncode:
            self.log(level, f"{what}: {r.stderr.strip() or r.returncode}")
        return r.returncode != 0

    @property
    def xr(self) -> list[str]:
        return shlex.split(self.p["xen_remus"])

    def budget(self, default: float) -> float:
        """The action's own timeout (from Pacemaker, ms) less a margin, in s."""
        try:
            ms = float(self.env["OCF_RESKEY_CRM_meta_timeout"])
        except (KeyError, ValueError):
            return default
        return max(ms / 1000 - 10, 5)

    def is_probe(self) -> bool:
        return self.env.get("OCF_RESKEY_CRM_meta_interval", "0") == "0"

    def score(self, value: int | None) -> None:
        argv = (["crm_attribute", "--promotion", "-D"] if value is None else
                ["crm_attribute", "--promotion", "-v", str(value)])
        self.failed(self.run(argv, 30), " ".join(argv), "WARNING")

    # --- what is here --------------------------------------------------------------------
    def domains(self) -> dict[str, str] | None:
        """`xl list`: name -> state letters; None if xl failed."""
        r = self.run(["xl", "list"], 30)
        if self.failed(r, "xl list"):
            return None
        out = {}
        for line in r.stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 5:
                out[f[0]] = f[4]
        return out

    def status(self) -> list[dict[str, Any]] | None:
        r = self.run([*self.xr, "status", "--json"], 60)
        if self.failed(r, "xen-remus status --json"):
            return None
        try:
            docs = json.loads(r.stdout)
        except ValueError as exc:
            self.log("ERROR", f"xen-remus status --json: not JSON ({exc})")
            return None
        return [d for d in docs if isinstance(d, dict) and d.get("domain") == self.domain]

    def observe(self) -> Obs | None:
        doms, docs = self.domains(), self.status()
        if doms is None or docs is None:
            return None
        alive = {d.get("role"): d for d in docs if d.get("alive")}
        return Obs(guest=doms.get(self.domain), incoming=self.domain + INCOMING in doms,
                   primary=alive.get("primary"), backup=alive.get("backup"),
                   started=self.marker.exists(), cold=bool(self.p["config"]))

    def validated(self) -> tuple[int, Obs | None]:
        """validate-all, then observe: (OCF_SUCCESS, obs), else (the error, None)."""
        rc = self.validate()
        if rc != OCF_SUCCESS:
            return rc, None
        obs = self.observe()
        return (OCF_SUCCESS if obs is not None else OCF_ERR_GENERIC), obs

    # --- peer and protect ----------------------------------------------------------------
    def node(self) -> str:
        name = self.env.get("OCF_RESKEY_CRM_meta_on_node")
        if name:
            return name
        r = self.run(["crm_node", "-n"], 30)
        return r.stdout.strip()

    def peer(self) -> str | None:
        """The other node's ssh host (`nodes`, else `crm_node -l`); None if not one."""
        me = self.node()
        if self.p["nodes"].strip():
            pairs = [n.partition("=") for n in self.p["nodes"].split()]
            hosts = [h or n for n, _, h in pairs if n != me]
        else:
            r = self.run(["crm_node", "-l"], 30)
            hosts = [f[1] for f in (ln.split() for ln in r.stdout.splitlines())
                     if len(f) >= 2 and f[1] != me]
        if len(hosts) != 1:
            self.log("WARNING", f"cannot tell the peer of node {me!r} (nodes: {hosts}): "
                     "not protecting")
            return None
        return hosts[0]

    def receiver_command(self, peer: str) -> str:
        xr = self.p["xen_remus"]
        cmd = (f"{xr} migrate-receive -r --failover-on-promote --promote-timeout "
               f"{self.p['promote_timeout']}")
        if self.p["key_file"]:
            cmd += f" --key-file {shlex.quote(self.p['key_file'])}"
        if self.p["receive_options"]:
            cmd += " " + self.p["receive_options"]
        # The local shell runs `exec SSH PEER CMD`; ssh hands CMD to the peer's shell.
        return f"exec {self.p['ssh']} {shlex.quote(peer)} {shlex.quote(cmd)}"

    def protect_argv(self, peer: str) -> list[str]:
        argv = [*self.xr, "protect", *shlex.split(self.p["protect_options"]), "--no-progress"]
        if self.p["key_file"]:
            argv += ["--key-file", self.p["key_file"]]
        return [*argv, "-s", "", self.domain, self.receiver_command(peer)]

    def launch_protect(self, why: str) -> None:
        peer = self.peer()
        if peer is None:
            return
        argv = self.protect_argv(peer)
        log_dir = Path(self.p["log_dir"])
        log_dir.mkdir(parents=True, exist_ok=True)
        self.own.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{self.domain}.protect.log", "ab") as out:
            out.write(f"--- {time.strftime('%FT%T')} {shlex.join(argv)}\n".encode())
            out.flush()
            # Its own session: Pacemaker ends this action, not the protection.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=self.env, start_new_session=True)
        self.launched.write_text(json.dumps({"pid": proc.pid, "at": time.time(),
                                             "peer": peer}))
        self.log("INFO", f"{why}: protecting {self.domain} to {peer} (protect pid "
                 f"{proc.pid}, log {log_dir / (self.domain + '.protect.log')})")

    def launch_runs(self) -> bool:
        """The protect this agent launched last still runs: it may not have written its
        status yet (an action right after a promote must not start a second one)."""
        try:
            pid = int(json.loads(self.launched.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return b"protect" in cmdline and not _zombie(pid)

    def last_launch(self) -> float:
        try:
            return float(json.loads(self.launched.read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    # --- actions -------------------------------------------------------------------------
    def validate(self) -> int:
        if not self.domain or not NAME_RE.fullmatch(self.domain):
            self.log("ERROR", f"domain={self.domain!r}: a domain name is required")
            return OCF_ERR_CONFIGURED
        try:
            if int(self.p["promote_timeout"]) <= 0:
                raise ValueError
            for k in ("protect_options", "receive_options", "ssh", "xen_remus"):
                shlex.split(self.p[k])
        except ValueError:
            self.log("ERROR", "promote_timeout must be a positive integer and the options "
                     "valid shell words")
            return OCF_ERR_CONFIGURED
        if self.p["config"] and not Path(self.p["config"]).is_file():
            self.log("ERROR", f"config={self.p['config']}: no such file")
            return OCF_ERR_CONFIGURED
        if not self.xr or shutil.which(self.xr[0], path=self.env.get("PATH")) is None:
            self.log("ERROR", f"{self.p['xen_remus']}: not found")
            return OCF_ERR_INSTALLED
        if shutil.which("xl", path=self.env.get("PATH")) is None:
            self.log("ERROR", "xl: not found (xen-utils)")
            return OCF_ERR_INSTALLED
        if "OCF_RESKEY_CRM_meta_clone_max" in self.env and not (
                self.env.get("OCF_RESKEY_CRM_meta_promoted_max")
                or self.env.get("OCF_RESKEY_CRM_meta_master_max")):
            self.log("ERROR", "this agent must run as a promotable clone")
            return OCF_ERR_CONFIGURED
        return OCF_SUCCESS

    def monitor(self) -> int:
        rc = self.validate()
        if rc != OCF_SUCCESS:
            return OCF_NOT_RUNNING if self.is_probe() and rc != OCF_ERR_CONFIGURED else rc
        obs = self.observe()
        if obs is None:
            return OCF_ERR_GENERIC
        v = assess(obs)
        self.log("WARNING" if v.code in (OCF_ERR_GENERIC, OCF_FAILED_PROMOTED) else "DEBUG",
                 f"{self.domain}: {v.protection}: {v.detail}")
        if v.code != OCF_NOT_RUNNING or not self.is_probe():
            self.score(v.score)
        if (v.code == OCF_RUNNING_PROMOTED and obs.primary is None and not self.is_probe()
                and time.time() - self.last_launch() >= RELAUNCH_S and not self.launch_runs()):
            self.launch_protect("no protect runs")
        return v.code

    def start(self) -> int:
        rc, obs = self.validated()
        if obs is None:
            return rc
        if obs.guest is not None:
            self.log("ERROR", f"{self.domain} runs on this node: not starting as its backup")
            return OCF_ERR_GENERIC
        if obs.incoming and obs.backup is None:
            self.destroy(self.domain + INCOMING, "a held copy, which can never resume")
        self.own.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        self.score(assess(obs).score if obs.backup else SCORE_COLD if obs.cold else None)
        return OCF_SUCCESS

    def stop(self) -> int:
        if shutil.which("xl", path=self.env.get("PATH")) is None:
            return OCF_SUCCESS  # no Xen here: nothing of it can run
        obs = self.observe()
        if obs is None:
            return OCF_ERR_GENERIC
        if obs.guest is not None and self.demote() != OCF_SUCCESS:
            return OCF_ERR_GENERIC
        if obs.backup is not None:
            self.kill(obs.backup.get("pid"), "migrate-receive", signal.SIGTERM)
        doms = self.domains()
        if doms is not None and self.domain + INCOMING in doms:
            self.destroy(self.domain + INCOMING, "the copy being received")
        self.marker.unlink(missing_ok=True)
        self.score(None)
        return OCF_SUCCESS

    def promote(self) -> int:
        rc, obs = self.validated()
        if obs is None:
            return rc
        budget = self.budget(290)
        deadline = time.monotonic() + budget
        if obs.guest is not None and "p" not in obs.guest:
            self.log("INFO", f"{self.domain} runs here already")
        elif obs.backup is not None:
            r = self.run([*self.xr, "promote", self.domain, "--wait", f"{budget / 2:.0f}"],
                         budget / 2 + 30)
            if self.failed(r, f"xen-remus promote {self.domain}"):
                return OCF_ERR_GENERIC
            self.log("INFO", r.stderr.strip())
            if not self.wait_running(deadline):
                return OCF_ERR_GENERIC
        elif obs.guest is not None:
            self.log("WARNING", f"{self.domain} is paused here (halted by a failed protect):"
                     " resuming it; its peer's copy was never promoted")
            r = self.run(["xl", "unpause", self.domain], 60)
            if r.returncode:
                self.log("ERROR", f"xl unpause {self.domain}: {r.stderr.strip()}")
                return OCF_ERR_GENERIC
        elif obs.cold:
            self.log("WARNING", f"no copy of {self.domain} here: cold boot from "
                     f"{self.p['config']}")
            r = self.run(["xl", "create", self.p["config"]], budget)
            if r.returncode or not self.wait_running(deadline):
                self.log("ERROR", f"xl create {self.p['config']}: {r.stderr.strip()}")
                return OCF_ERR_GENERIC
        else:
            self.log("ERROR", f"nothing to promote: {self.domain} neither runs nor is "
                     "received here, and no `config` to boot it")
            return OCF_ERR_GENERIC
        self.score(SCORE_RUNNING)
        if obs.primary is None:
            self.launch_protect("promoted")
        return OCF_SUCCESS

    def demote(self) -> int:
        obs = self.observe()
        if obs is None:
            return OCF_ERR_GENERIC
        if obs.guest is None:
            return OCF_SUCCESS
        prim = obs.primary
        if protecting(prim) and self.hand_over():
            self.destroy(self.domain, "handed over: suspended here at its last epoch, "
                         "which the peer holds whole and resumes when promoted")
        elif protecting(prim):
            # The crash path: a stopped protect would release the output of epochs the
            # peer has not acknowledged; killed, the supervisor keeps it held, and the
            # peer resumes from its last committed epoch when promoted.
            self.run(["xl", "pause", self.domain], 60)
            self.kill(prim.get("pid"), "protect", signal.SIGKILL)
            self.destroy(self.domain, f"demoted after epoch {prim.get('epoch')}: the peer "
                         "resumes from its last committed epoch when promoted")
        else:
            if prim is not None:  # before its first checkpoint: the peer has nothing
                self.kill(prim.get("pid"), "protect", signal.SIGTERM)
            self.log("WARNING", f"demoting {self.domain} while it is not protected: shutting "
                     "it down")
            self.run(["xl", "shutdown", "-w", self.domain], self.budget(110))
            doms = self.domains()
            if doms is not None and self.domain in doms:
                self.destroy(self.domain, "did not shut down in time")
        self.launched.unlink(missing_ok=True)
        self.score(None)
        return OCF_SUCCESS

    def hand_over(self) -> bool:
        """`xen-remus handover`: protect ends at an epoch boundary, every epoch committed
        and its output released, the guest suspended here for good; the peer's receiver
        then holds exactly that state for its promotion. False (logged) if it did not."""
        wait = self.budget(110) / 2
        r = self.run([*self.xr, "handover", self.domain, "--wait", f"{wait:.0f}"], wait + 30)
        if self.failed(r, f"xen-remus handover {self.domain} (the crash path instead)",
                       "WARNING"):
            return False
        self.log("INFO", r.stderr.strip())
        return True

    def notify(self) -> int:
        kind = self.env.get("OCF_RESKEY_CRM_meta_notify_type")
        op = self.env.get("OCF_RESKEY_CRM_meta_notify_operation")
        if kind != "post" or op not in ("start", "promote"):
            return OCF_SUCCESS
        obs = self.observe()
        if (obs is not None and assess(obs).code == OCF_RUNNING_PROMOTED
                and obs.primary is None and not self.launch_runs()):
            self.launch_protect(f"post-{op} notification")
        return OCF_SUCCESS

    # --- helpers -------------------------------------------------------------------------
    def wait_running(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            doms = self.domains() or {}
            state = doms.get(self.domain)
            if state is not None and "p" not in state:
                return True
            time.sleep(1)
        self.log("ERROR", f"{self.domain} does not run here after the promotion")
        return False

    def destroy(self, name: str, why: str) -> None:
        r = self.run(["xl", "destroy", name], 120)
        self.log("WARNING" if r.returncode == 0 else "ERROR",
                 f"xl destroy {name} ({why}): {'done' if r.returncode == 0 else r.stderr}")

    def kill(self, pid: Any, what: str, sig: signal.Signals) -> None:
        """Signal ``pid`` if it is a xen-remus ``what``, and wait (10 s) for it to end."""
        if not isinstance(pid, int) or pid <= 0:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if what.encode() not in cmdline:
            self.log("WARNING", f"pid {pid} is not a {what} any more: not signalled")
            return
        self.log("INFO", f"sending {sig.name} to {what} pid {pid}")
        for s in (sig, signal.SIGKILL):
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                return
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                    return
                time.sleep(0.1)


def protecting(prim: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """A live protect past its initial copy: the peer holds a whole copy of the guest."""
    return (prim is not None and prim.get("state") == "protecting"
            and prim.get("epoch") is not None)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Obs:
    """What is on this node: the guest's `xl list` state (None: absent), a copy being
    received, the live protect (primary) and receiver (backup) status documents."""

    guest: str | None
    incoming: bool
    primary: dict[str, Any] | None
    backup: dict[str, Any] | None
    started: bool
    cold: bool


@dataclass(frozen=True)
class Verdict:
    code: int
    protection: str  # protected, syncing, unprotected, halted, receiving, lost, held, ready
    score: int | None
    detail: str


def assess(o: Obs) -> Verdict:
    """The instance's role here and the promotion score it deserves."""
    if o.guest is not None:
        prim = o.primary
        if prim is None and "p" in o.guest:
            return Verdict(OCF_FAILED_PROMOTED, "halted", None,
                           "paused here and not protected (a failed protect paused it)")
        if prim is None:
            return Verdict(OCF_RUNNING_PROMOTED, "unprotected", SCORE_RUNNING,
                           "runs here, no protect")
        st = str(prim.get("state"))
        prot = ("protected" if st == "protecting" else
                "syncing" if st == "starting" else "unprotected")
        return Verdict(OCF_RUNNING_PROMOTED, prot, SCORE_RUNNING,
                       f"protect pid {prim.get('pid')} {st} to {prim.get('peer')}, epoch "
                       f"{prim.get('epoch')}")
    if o.backup is not None:
        whole = o.backup.get("committed") is not None
        score = SCORE_COPY if whole else (SCORE_COLD if o.cold else None)
        if o.backup.get("promote_wait"):
            return Verdict(OCF_SUCCESS, "lost", score, "primary declared dead; the copy of "
                           f"epoch {o.backup['promote_wait'].get('epoch')} waits for promotion")
        return Verdict(OCF_SUCCESS, "receiving", score,
                       f"receiver pid {o.backup.get('pid')}, committed "
                       f"{o.backup.get('committed')}")
    if o.incoming:
        return Verdict(OCF_ERR_GENERIC, "held", None, "a copy is held here with no receiver "
                       "(it was not promoted in time): a restart clears it")
    if o.started:
        return Verdict(OCF_SUCCESS, "ready", SCORE_COLD if o.cold else None,
                       "ready to receive")
    return Verdict(OCF_NOT_RUNNING, "stopped", None, "not started")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    action = args[0] if args else ""
    if action == "meta-data":
        sys.stdout.write(meta_data())
        return OCF_SUCCESS
    agent = Agent()
    acts = {"start": agent.start, "stop": agent.stop, "monitor": agent.monitor,
            "promote": agent.promote, "demote": agent.demote, "notify": agent.notify,
            "validate-all": agent.validate}
    if action not in acts:
        print(f"usage: protected-guest {{{'|'.join(a for a, _ in ACTIONS)}}}",
              file=sys.stderr)
        return OCF_ERR_UNIMPLEMENTED if action else OCF_ERR_ARGS
    return acts[action]()


if __name__ == "__main__":
    sys.exit(main())
