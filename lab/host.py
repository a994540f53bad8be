"""One lab host: Xen + dom0 under QEMU (TCG), driven through a command agent on a 9p share."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from lab.build import Images, expected_banner
from lab.errors import LabError

# A host's RAM: dom0 takes DOM0_MEM, Xen and the guests share the rest (under 2 GiB): a
# 1 GiB guest fits, its incoming copy beside it on the same host does not
# (Lab(mem_mib=...) boots bigger hosts for that).
QEMU_MEM_MIB = 3072
DOM0_MEM = "1024M"
BOOT_TIMEOUT_S = 240.0  # two hosts on 2 cores boot in 40-110 s; leave room for a busy machine
AGENT_PICKUP_S = 30.0  # the agent polls every 0.2 s: 30 s without pickup means dom0 is stuck
# The virtio-serial port that links dom0 to a witness on this machine (Host.witness_sock).
WITNESS_PORT = "xen-remus.witness"
WITNESS_DEV = f"/dev/virtio-ports/{WITNESS_PORT}"
_job_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of a command run in a dom0."""

    host: str
    cmd: str
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> Result:
        """Return self if rc == 0, else raise LabError with the command's output."""
        if self.rc != 0:
            raise LabError(
                f"host {self.host}: `{self.cmd}` exited {self.rc} after {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-3000:]}--- stderr\n{self.stderr[-3000:]}"
            )
        return self


class Job:
    """A command running in a dom0 (from Host.spawn)."""

    def __init__(self, host: Host, cmd: str) -> None:
        self.host, self.cmd = host, cmd
        self.base = host.queue / f"{time.time_ns()}-{os.getpid()}-{next(_job_ids)}"
        self.started = time.monotonic()
        tmp = self.base.with_suffix(".tmp")
        tmp.write_text(f"{cmd}\n")
        tmp.rename(self.base.with_suffix(".sh"))  # the agent only picks up whole files

    def _read(self, suffix: str) -> str:
        try:
            return self.base.with_suffix(suffix).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def done(self) -> bool:
        return self.base.with_suffix(".rc").exists()

    def output(self) -> str:
        """stdout so far (the command may still be running)."""
        return self._read(".out")

    def stderr(self) -> str:
        """stderr so far."""
        return self._read(".err")

    def wait_output(self, pattern: str, timeout: float, stderr: bool = False) -> re.Match[str]:
        """Wait for a regex in the running command's stdout (or stderr)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.stderr() if stderr else self.output())
            if m:
                return m
            if self.done() or time.monotonic() > deadline or not self.host.alive():
                raise LabError(f"host {self.host.name}: `{self.cmd}` printed no /{pattern}/"
                               f" (done={self.done()})\n--- stdout\n{self.output()[-2000:]}"
                               f"--- stderr\n{self.stderr()[-2000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> Result:
        """Wait at most `timeout` s for the command; LabError if it or the host doesn't end."""
        deadline = time.monotonic() + timeout
        while not self.done():
            queued = time.monotonic() - self.started
            if queued > AGENT_PICKUP_S and self.base.with_suffix(".sh").exists():
                raise LabError(f"host {self.host.name}: the dom0 agent has not picked up "
                               f"`{self.cmd}` in {queued:.0f} s: dom0 is stuck or dead"
                               f"\n{self.host.serial_tail(15)}")
            if not self.host.alive():
                raise LabError(f"host {self.host.name} died while running `{self.cmd}`"
                               f" (serial log {self.host.serial_log})")
            if time.monotonic() > deadline:
                raise LabError(
                    f"host {self.host.name}: `{self.cmd}` did not finish within {timeout:.0f} s"
                    f"\n--- stdout so far\n{self.output()[-2000:]}"
                    f"--- stderr so far\n{self._read('.err')[-2000:]}")
            time.sleep(0.1)
        rc_text = self._read(".rc").strip()
        result = Result(self.host.name, self.cmd, int(rc_text) if rc_text else -1,
                        self.output(), self._read(".err"), time.monotonic() - self.started)
        # Keep the queue folder short: the agent lists it 5 times a second over 9p.
        done = self.host.queue / "done"
        done.mkdir(exist_ok=True)
        for suffix in (".run", ".out", ".err", ".rc"):
            with contextlib.suppress(FileNotFoundError):
                self.base.with_suffix(suffix).rename(done / (self.base.name + suffix))
        return result


class Host:
    """A Xen host: its QEMU process, serial log and agent queue.

    Either booted by this process (start) or attached to by pid (another process runs it).
    """

    def __init__(self, name: str, ip: str, rundir: Path, project: Path,
                 mem_mib: int = QEMU_MEM_MIB) -> None:
        self.name, self.ip = name, ip
        self.mem_mib = mem_mib  # the machine's RAM (QEMU -m)
        self.rundir, self.project = rundir, project
        self.share = rundir / "share"
        self.queue = self.share / "q" / name
        self.xenlog = self.share / "hosts" / name / "xen"
        self.serial_log = rundir / f"serial-{name}.log"
        self.pidfile = rundir / f"qemu-{name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self._reader: threading.Thread | None = None
        # A Unix socket on this machine (a witness listening on it, `xen-remus witness
        # --listen unix:PATH`): QEMU connects to it (and reconnects, so the witness may
        # start later or restart) and carries it to dom0 as a virtio-serial port,
        # WITNESS_DEV. Apart from the inter-host link: cutting that leaves it.
        self.witness_sock: Path | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def qemu_argv(self, images: Images, netdev: str | None, mac: str) -> list[str]:
        # spec-ctrl=eager-fpu: with Xen's lazy FPU switching (its default on this AMD-like
        # TCG CPU) QEMU 7.2 corrupts processes in every domain as soon as a domU runs
        # beside dom0 (lab/README.md, "dom0 corruption"); eager switching never sets CR0.TS.
        # bootscrub=false: scrubbing the host's 2 GiB of free memory on idle CPUs takes CPU
        # time from dom0's boot under TCG; a lab host holds no one else's data.
        xen_args = (f"console=com1 com1=115200,8n1 dom0_mem={DOM0_MEM},max:{DOM0_MEM} "
                    "dom0_max_vcpus=2 loglvl=all guest_loglvl=all spec-ctrl=eager-fpu "
                    "bootscrub=false "
                    + os.environ.get("XEN_REMUS_LAB_XEN_ARGS", "")).strip()
        # Knobs for experiments (lab/README.md): XEN_REMUS_LAB_XEN_ARGS (appended),
        # XEN_REMUS_LAB_CPU, XEN_REMUS_LAB_ACCEL.
        cpu = os.environ.get("XEN_REMUS_LAB_CPU", "max,-smap,-smep")
        dom0_args = (f"console=hvc0 earlyprintk=xen xenlab_host={self.name} "
                     f"xenlab_ip={self.ip}/16"
                     + (" xenlab_witness=1" if self.witness_sock is not None else ""))
        argv = [
            "qemu-system-x86_64", "-name", f"xenlab-{self.name}",
            # TCG: /dev/kvm here cannot run Xen; -smap,-smep or dom0 faults (LAB-NOTES 1-2).
            "-accel", os.environ.get("XEN_REMUS_LAB_ACCEL", "tcg,thread=multi"), "-cpu", cpu,
            "-machine", "q35", "-m", str(self.mem_mib), "-smp", "2",
            "-display", "none", "-vga", "none", "-no-reboot", "-monitor", "none", "-nic", "none",
            "-serial", "stdio", "-pidfile", str(self.pidfile),
            "-fsdev", f"local,id=project,path={self.project},security_model=none",
            "-device", "virtio-9p-pci,fsdev=project,mount_tag=project",
            "-fsdev", f"local,id=lab,path={self.share},security_model=none",
            "-device", "virtio-9p-pci,fsdev=lab,mount_tag=lab",
            "-kernel", str(images.xen), "-append", xen_args,
            "-initrd", f"{images.vmlinux} {dom0_args},{images.dom0_initrd}",
        ]
        if netdev:
            argv += ["-netdev", f"{netdev},id=n0",
                     "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        if self.witness_sock is not None:
            argv += ["-chardev", f"socket,id=witness,path={self.witness_sock},reconnect=1",
                     "-device", "virtio-serial-pci,id=vser0",
                     "-device", f"virtserialport,bus=vser0.0,chardev=witness,"
                     f"name={WITNESS_PORT}"]
        return argv

    def start(self, images: Images, netdev: str | None, mac: str) -> None:
        self.queue.mkdir(parents=True, exist_ok=True)
        (self.xenlog / "console").mkdir(parents=True, exist_ok=True)
        argv = self.qemu_argv(images, netdev, mac)
        (self.rundir / f"qemu-{self.name}.cmdline").write_text(shlex.join(argv) + "\n")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._log_serial, daemon=True,
                                         name=f"serial-{self.name}")
        self._reader.start()

    def _log_serial(self) -> None:
        """Copy QEMU's serial output to the log, each line stamped (UTC, seconds since start)."""
        assert self.proc is not None and self.proc.stdout is not None
        t0 = time.monotonic()
        with open(self.serial_log, "a", buffering=1, errors="replace") as log:
            log.write(f"XENLAB-HOST: {self.name} qemu pid {self.pid} started "
                      f"{time.strftime('%FT%TZ', time.gmtime())}\n")
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                now = time.time()
                stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}"
                log.write(f"[{stamp} {time.monotonic() - t0:7.2f}] {line}\n")
            rc = self.proc.wait()
            log.write(f"XENLAB-HOST: {self.name} qemu exited rc={rc} "
                      f"after {time.monotonic() - t0:.1f} s\n")

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_ready(self, deadline: float) -> float:
        """Wait for the agent; check the Xen banner on the way. Returns seconds waited."""
        t0 = time.monotonic()
        banner_checked = False
        while True:
            text = self.serial()
            if not banner_checked:
                m = re.search(r"Xen version \S+ \([^)]*\)", text)
                if m:
                    if m.group(0) != expected_banner():
                        raise LabError(f"host {self.name}: booted `{m.group(0)}`, expected "
                                       f"`{expected_banner()}` (serial log {self.serial_log})")
                    banner_checked = True
            if "XENLAB-AGENT: ready" in text:
                if not banner_checked:
                    raise LabError(f"host {self.name}: no Xen banner in {self.serial_log}")
                if not re.search(r"Support for PV VMs:.* EAGER_FPU", text):
                    raise LabError(f"host {self.name}: Xen does not switch FPU state eagerly "
                                   "(no EAGER_FPU for PV VMs in its boot log): under TCG lazy "
                                   "switching corrupts every domain (lab/README.md); keep "
                                   f"spec-ctrl=eager-fpu (serial log {self.serial_log})")
                return time.monotonic() - t0
            if not self.alive():
                raise LabError(f"host {self.name}: QEMU exited during boot\n"
                               f"{self.serial_tail(30)}")
            if time.monotonic() > deadline:
                raise LabError(f"host {self.name}: dom0 agent not up after "
                               f"{time.monotonic() - t0:.0f} s\n{self.serial_tail(30)}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the host's QEMU: a real fail-stop (no shutdown, no goodbye on the link)."""
        if self.pid is not None and self.alive():
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.pidfile.unlink(missing_ok=True)

    stop = kill  # dom0 holds nothing worth a clean shutdown

    # --- control -------------------------------------------------------------------------
    def spawn(self, cmd: str) -> Job:
        """Start a bash command in dom0 (cwd /root, PYTHONPATH=/mnt/project); don't wait."""
        if not self.alive():
            raise LabError(f"host {self.name} is not running (serial log {self.serial_log})")
        return Job(self, cmd)

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> Result:
        """Run a bash command in dom0 and wait at most `timeout` s for its Result."""
        r = self.spawn(cmd).wait(timeout)
        return r.check() if check else r

    # --- logs ----------------------------------------------------------------------------
    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_tail(self, n: int = 40) -> str:
        return f"--- {self.serial_log} (last {n} lines)\n" + "\n".join(
            self.serial().splitlines()[-n:])

    def guest_console(self, name: str) -> str:
        """The guest's console as xenconsoled logged it in this dom0 (incoming log first)."""
        parts = []
        for fname in (f"guest-{name}--incoming.log", f"guest-{name}.log"):
            p = self.xenlog / "console" / fname
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "".join(parts)

    def xl_logs(self, n: int = 40) -> str:
        """Tails of this dom0's /var/log/xen/*.log (xl, libxl, qemu), for failure reports."""
        out = []
        for p in sorted(self.xenlog.glob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {p} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)
