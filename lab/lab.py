"""A lab: one or two hosts, the global lock that serialises labs, run dirs, cleanup."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from lab.build import Images, build
from lab.errors import LabError
from lab.host import BOOT_TIMEOUT_S, QEMU_MEM_MIB, Host

# Shared by every checkout on the machine: one lab at a time on 2 cores.
STATE_DIR = Path(os.environ.get("XEN_REMUS_LAB_STATE", "/tmp/xen-remus-lab"))
LOCK_TIMEOUT_S = float(os.environ.get("XEN_REMUS_LAB_LOCK_TIMEOUT", "1800"))
HOST_IPS = {"A": "169.254.10.1", "B": "169.254.10.2"}
HOST_MACS = {"A": "52:54:00:00:00:0a", "B": "52:54:00:00:00:0b"}
# The end of the inter-host link (QEMU's socket netdev) that listens; the other connects.
# A listening end accepts a new peer once the old one died, a connecting end never
# reconnects: so B listens, and a killed A can come back (Lab.restart) while B runs.
LINK_LISTENER = "B"
_HELD_BY: str | None = None  # run dir of the lab this process runs, if any


def project_dir() -> Path:
    """The checkout each dom0 sees at /mnt/project (XEN_REMUS_PROJECT overrides)."""
    env = os.environ.get("XEN_REMUS_PROJECT")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_live_ticket(queue: Path) -> str | None:
    """Oldest ticket whose process still lives (dead waiters' tickets are removed)."""
    for t in sorted(queue.iterdir(), key=lambda p: int(p.name.split("-")[0])):
        if Path(f"/proc/{t.name.split('-')[-1]}").exists():
            return t.name
        t.unlink(missing_ok=True)
    return None


def kill_stale() -> None:
    """Kill QEMUs left by a crashed lab (we hold the lock, so none is anyone's live lab)."""
    for pidfile in (STATE_DIR / "pids").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"qemu-system" in cmdline and b"xenlab_host=" in cmdline:
                print(f"lab: killing stale QEMU pid {pid} ({pidfile.name})", flush=True)
                os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)


class Lab:
    """One or two Xen hosts (A, and B linked to A). Use as a context manager.

    Holds the machine-wide lab lock from start() to stop(); a second lab waits for it.
    """

    def __init__(self, nhosts: int = 1, project: Path | None = None,
                 shared: bool = False, witness: Path | None = None,
                 cluster: bool = False, mem_mib: int = QEMU_MEM_MIB) -> None:
        if nhosts not in (1, 2):
            raise LabError(f"a lab has 1 or 2 hosts, not {nhosts}")
        if mem_mib < QEMU_MEM_MIB:
            raise LabError(f"a lab host needs at least {QEMU_MEM_MIB} MiB, not {mem_mib}")
        self.nhosts = nhosts
        self.mem_mib = mem_mib  # each host's RAM: more for guests too big for two copies
        self.shared = shared  # may other processes attach()? (`python -m lab up`: yes)
        self.witness = witness  # a Unix socket each host reaches as host.WITNESS_DEV
        self.cluster = cluster  # dom0s with Pacemaker (build.CLUSTER_PACKAGES)
        self.project = project or project_dir()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.rundir = STATE_DIR / "runs" / f"{stamp}-{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.images: Images | None = None
        self._lock: IO[str] | None = None
        self._link_port = 0
        self.lives: dict[str, int] = {}  # hosts booted again by restart(), how often

    # --- lock ----------------------------------------------------------------------------
    def _acquire(self) -> None:
        global _HELD_BY
        if _HELD_BY is not None:  # flock would make us wait for ourselves
            raise LabError(f"this process already runs a lab ({_HELD_BY}); share it (the "
                           "lab_one/lab_two fixtures do) instead of starting a second one")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        # First come, first served: waiters queue by ticket, only the oldest live one tries
        # the flock (plain polling let late comers overtake for ever).
        queue = STATE_DIR / "queue"
        queue.mkdir(exist_ok=True)
        ticket = queue / f"{time.time_ns()}-{os.getpid()}"
        ticket.touch()
        f = open(STATE_DIR / "lab.lock", "a+")
        t0 = time.monotonic()
        told = False
        try:
            while True:
                if first_live_ticket(queue) == ticket.name:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        pass
                if not told:
                    f.seek(0)
                    print(f"lab: another lab is running ({f.read().strip() or 'unknown'});"
                          f" waiting up to {LOCK_TIMEOUT_S:.0f} s for it", flush=True)
                    told = True
                if time.monotonic() - t0 > LOCK_TIMEOUT_S:
                    f.close()
                    raise LabError(f"lab lock {STATE_DIR / 'lab.lock'} still held after "
                                   f"{LOCK_TIMEOUT_S:.0f} s: another lab is running")
                time.sleep(1)
        finally:
            ticket.unlink(missing_ok=True)
        if told:
            print(f"lab: got the lab lock after {time.monotonic() - t0:.0f} s", flush=True)
        f.truncate(0)
        f.write(f"pid {os.getpid()} run {self.rundir} since "
                f"{time.strftime('%H:%M:%S')}: {' '.join(sys.argv)[:200]}\n")
        f.flush()
        self._lock = f
        _HELD_BY = str(self.rundir)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> Lab:
        self._acquire()
        atexit.register(self.stop)
        try:
            # Under the lock: a build never competes with a running lab for the 2 cores, and
            # the images are the current ones when we boot (not pruned while we queued).
            self.images = build(self.cluster)
            self._boot()
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self) -> None:
        assert self.images is not None
        kill_stale()
        (STATE_DIR / "pids").mkdir(parents=True, exist_ok=True)
        (self.rundir / "share" / "guests").mkdir(parents=True)
        (self.rundir / "share" / "guest").mkdir()
        shutil.copy(self.images.vmlinux, self.rundir / "share/guest/vmlinux")
        shutil.copy(self.images.vmlinuz, self.rundir / "share/guest/vmlinuz")  # HVM guests
        shutil.copy(self.images.guest_initrd, self.rundir / "share/guest/initrd.gz")
        latest = STATE_DIR / "runs" / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(self.rundir.name)
        self._link_port = free_port()
        names = ["A", "B"][: self.nhosts]
        t0 = time.monotonic()
        print(f"lab: booting host(s) {' '.join(names)} (run dir {self.rundir})", flush=True)
        for name in sorted(names, key=lambda n: n != LINK_LISTENER):  # the listener first
            self._start_host(name)
            if name == LINK_LISTENER and self.nhosts == 2:
                time.sleep(1)  # let it listen before the other connects (LAB-NOTES 16)
        self.hosts = {n: self.hosts[n] for n in names}
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        for host in self.hosts.values():
            host.wait_ready(deadline)
            print(f"lab: host {host.name} ready after {time.monotonic() - t0:.1f} s "
                  f"(qemu pid {host.pid}, dom0 {host.ip})", flush=True)
        self._write_state()

    def _start_host(self, name: str) -> Host:
        assert self.images is not None
        host = Host(name, HOST_IPS[name], self.rundir, self.project, self.mem_mib)
        host.witness_sock = self.witness
        netdev = None
        if self.nhosts == 2:
            mode = "listen" if name == LINK_LISTENER else "connect"
            netdev = f"socket,{mode}=127.0.0.1:{self._link_port}"
        host.start(self.images, netdev, HOST_MACS[name])
        self.hosts[name] = host
        (STATE_DIR / "pids" / f"{self.rundir.name}-{name}.pid").write_text(f"{host.pid}\n")
        return host

    def _write_state(self) -> None:
        (self.rundir / "state.json").write_text(json.dumps(
            {"project": str(self.project), "lock_pid": os.getpid(), "shared": self.shared,
             "hosts": {n: {"pid": h.pid, "ip": h.ip} for n, h in self.hosts.items()}}))

    def restart(self, name: str) -> Host:
        """Boot a fresh host ``name`` in place of a killed one, as a repaired machine
        comes back: nothing of the old dom0 is left (its root lives in RAM); same name,
        address and link. The old life's serial log, command line and Xen logs are kept
        as ``serial-NAME.N.log``, ``qemu-NAME.N.cmdline``, ``share/hosts/NAME.N``.
        Only a connecting end of the link can come back, while the listener runs
        (LINK_LISTENER). Returns the new host, ready (lab.a / lab.b name it from now)."""
        old = self.hosts.get(name)
        if old is None or self.images is None:
            raise LabError(f"host {name} was never booted in this lab ({self.rundir})")
        if old.alive():
            raise LabError(f"host {name} still runs (qemu pid {old.pid}): kill it first")
        if self.nhosts == 2:
            listener = self.hosts[LINK_LISTENER]
            if name == LINK_LISTENER or not listener.alive():
                raise LabError(f"cannot boot host {name} again: the link's listening end "
                               f"({LINK_LISTENER}) must run for a new host to connect to "
                               "it, and a connecting end never reconnects")
        life = self.lives[name] = self.lives.get(name, 0) + 1
        for path in (old.serial_log, self.rundir / f"qemu-{name}.cmdline"):
            if path.exists():
                path.rename(path.with_name(path.name.replace(f"-{name}.", f"-{name}.{life}.")))
        xen = self.rundir / "share" / "hosts" / name
        if xen.exists():
            xen.rename(xen.with_name(f"{name}.{life}"))
        for stale in old.queue.glob("*.sh"):  # queued for the dead dom0: never to be run
            stale.unlink(missing_ok=True)
        t0 = time.monotonic()
        print(f"lab: booting host {name} again (life {life + 1})", flush=True)
        host = self._start_host(name)
        host.wait_ready(time.monotonic() + BOOT_TIMEOUT_S)
        print(f"lab: host {name} ready again after {time.monotonic() - t0:.1f} s "
              f"(qemu pid {host.pid})", flush=True)
        self._write_state()
        return host

    def stop(self) -> None:
        for name, host in self.hosts.items():
            if host.alive():
                host.kill()
            (STATE_DIR / "pids" / f"{self.rundir.name}-{name}.pid").unlink(missing_ok=True)
        if self._lock is not None:
            global _HELD_BY
            self._lock.close()  # releases the flock
            self._lock = None
            _HELD_BY = None

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def a(self) -> Host:
        return self.hosts["A"]

    @property
    def b(self) -> Host:
        return self.hosts["B"]

    def logs(self) -> str:
        """Serial and xl log tails of every host: what a failing test prints."""
        return "\n".join(h.serial_tail(40) + "\n" + h.xl_logs(30) for h in self.hosts.values())


def attach(rundir: Path | None = None) -> dict[str, Host]:
    """Hosts of a running lab (default: the latest), to drive it from another process."""
    rundir = rundir or (STATE_DIR / "runs" / "latest").resolve()
    try:
        state = json.loads((rundir / "state.json").read_text())
    except FileNotFoundError:
        raise LabError(f"no running lab in {rundir} (start one with `python -m lab up`)") from None
    if not state.get("shared"):
        raise LabError(f"the lab in {rundir} belongs to pid {state['lock_pid']} (a test run): "
                       "attach only to labs started with `python -m lab up`")
    hosts = {}
    for name, h in state["hosts"].items():
        host = Host(name, h["ip"], rundir, Path(state["project"]))
        host.pid = h["pid"]
        if not host.alive():
            raise LabError(f"host {name} of {rundir} is not running")
        hosts[name] = host
    return hosts
