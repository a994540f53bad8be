"""Lab guests: configs, creation, and reading what the guest's workload shows."""

from __future__ import annotations

import dataclasses
import re
import time

from lab.build import PATTERN_LINES
from lab.errors import LabError
from lab.host import Host

COUNTER_PORT = 7000


# MiB. Debian's kernel does not fit a 64 MiB PV guest (xc_dom_chk_alloc_pages: segment
# kernel too large); keep them small all the same, the inter-host link is slow (LAB-NOTES
# 17). HVM: 96 MiB ran out of memory at boot (the bzImage decompresses itself in the
# guest, and video memory comes out of it).
DEFAULT_MEMORY = {"pv": 96, "pvh": 96, "hvm": 192}


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """A busybox guest running the counter workload (lab/guest/init)."""

    name: str = "g1"
    kind: str = "pv"  # "pv", "pvh" or "hvm" (qemu-xen in dom0, the same kernel and workload)
    memory: int = 0  # MiB; 0: the kind's (DEFAULT_MEMORY)
    ip: str = "169.254.20.1"
    mac: str = "00:16:3e:00:00:01"
    disk: str | None = None  # an xl disk spec, e.g. "phy:/dev/nbd0,xvda,w"
    cmdline: str = ""  # more kernel arguments for the workload, e.g. "xenlab_disk=ext4"
    # More than one: the guest runs a worker pinned to each (lab/guest/init, cpu_work).
    vcpus: int = 1
    maxmem: int | None = None  # MiB; above ``memory``: started ballooned down to it
    pattern_mib: int = 4  # the memory pattern the guest writes at boot (pattern_sha)

    def __post_init__(self) -> None:
        if not self.memory:
            object.__setattr__(self, "memory", DEFAULT_MEMORY[self.kind])

    @property
    def pattern_lines(self) -> int:
        return self.pattern_mib * 1024

    def extra(self, console: str) -> str:
        """The kernel command line: the console(s), then what the workload reads."""
        args = [console, "quiet", f"xenlab_ip={self.ip}/16"]
        if self.pattern_lines != PATTERN_LINES:
            args.append(f"xenlab_pattern={self.pattern_lines}")
        if self.vcpus > 1:
            args.append("xenlab_work=1")
        if self.cmdline:
            args.append(self.cmdline)
        return " ".join(args)

    def sizes(self) -> list[str]:
        lines = [f"memory = {self.memory}", f"vcpus = {self.vcpus}"]
        if self.maxmem is not None:
            lines.append(f"maxmem = {self.maxmem}")
        return lines

    def config(self, images: str = "/guest") -> str:
        if self.kind == "hvm":
            return self.hvm_config(images)
        lines = [
            f'name = "{self.name}"',
            f'type = "{self.kind}"',
            *self.sizes(),
            f'kernel = "{images}/vmlinux"',  # uncompressed: no xz in xl under TCG
            f'ramdisk = "{images}/initrd.gz"',
            f'extra = "{self.extra("console=hvc0")}"',
            f"vif = [ 'bridge=xenbr0,mac={self.mac}' ]",
            'on_crash = "preserve"',
        ]
        if self.kind == "pvh":
            lines.append('tsc_mode = "native"')  # TCG: RDTSCP emulation kills PVH (LAB-NOTES 4)
        if self.disk:
            lines.append(f"disk = [ '{self.disk}' ]")
        return "\n".join(lines) + "\n"

    def hvm_config(self, images: str) -> str:
        """HVM with qemu-xen, booting the guest kernel directly (QEMU loads it, SeaBIOS
        starts it: it must be the bzImage, which decompresses itself in the guest). The
        kernel's built-in xen-platform-pci and xenbus are the PV drivers xen-remus needs;
        the vif is PV only (type=vif: no emulated NIC beside it); the console the workload
        writes to is hvc0, the PV console xenconsoled logs. Not ttyS0 as well: every byte
        on QEMU's emulated UART is a trip through Xen and dom0's QEMU, slow under TCG."""
        lines = [
            f'name = "{self.name}"',
            'type = "hvm"',
            'device_model_version = "qemu-xen"',
            *self.sizes(),
            f'kernel = "{images}/vmlinuz"',
            f'ramdisk = "{images}/initrd.gz"',
            f'extra = "{self.extra("console=hvc0")}"',
            f"vif = [ 'bridge=xenbr0,mac={self.mac},type=vif' ]",
            "serial = 'pty'",
            "vnc = 0",
            "sdl = 0",
            'tsc_mode = "native"',  # as PVH under TCG (LAB-NOTES 4)
            'on_crash = "preserve"',
        ]
        if self.disk:
            lines.append(f"disk = [ '{self.disk}' ]")
        return "\n".join(lines) + "\n"

    def write(self, host: Host) -> str:
        """Write the config to the lab share; return its path as every dom0 sees it."""
        # Guest images: Lab.start puts them in the share, dom0's init copies them to /guest.
        (host.share / "guests" / f"{self.name}.cfg").write_text(self.config())
        return f"/mnt/lab/guests/{self.name}.cfg"


@dataclasses.dataclass(frozen=True)
class Counter:
    value: int
    bootid: str


def create(host: Host, spec: GuestSpec, timeout: float = 180.0) -> float:
    """xl create the guest and wait until its workload runs; returns seconds taken."""
    t0 = time.monotonic()
    host.run(f"xl create {spec.write(host)}", timeout=timeout, check=True)
    wait_console(host, spec.name, r"XRGUEST ready", timeout - (time.monotonic() - t0))
    # "ready" comes just before the first tick; callers read ticks at once (a test has
    # failed reading the console in between)
    wait_console(host, spec.name, r"XRGUEST tick \d+", max(30.0, timeout - (time.monotonic() - t0)))
    return time.monotonic() - t0


def wait_console(host: Host, name: str, pattern: str, timeout: float) -> re.Match[str]:
    """Wait for a regex in the guest's console log on `host`."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, host.guest_console(name))
        if m:
            return m
        if time.monotonic() > deadline:
            tail = "\n".join(host.guest_console(name).splitlines()[-15:])
            raise LabError(f"host {host.name}: guest {name} console shows no /{pattern}/ within "
                           f"{timeout:.0f} s; console tail:\n{tail}")
        time.sleep(0.3)


def ticks(host: Host, name: str) -> list[tuple[int, str]]:
    """(counter, bootid) of every tick the guest printed on its console on `host`."""
    found = re.findall(r"XRGUEST tick (\d+) bootid=(\w+)", host.guest_console(name))
    return [(int(n), b) for n, b in found]


def last_tick(host: Host, name: str) -> Counter:
    """The newest counter the guest printed on its console on `host`: needs no network, so
    it works while a checkpointing sender keeps the guest paused most of the time."""
    found = ticks(host, name)
    if not found:
        raise LabError(f"host {host.name}: no tick on {name}'s console yet")
    return Counter(*found[-1])


def mem_free(host: Host, name: str) -> list[tuple[int, int]]:
    """(tick, MemFree kB) of every memory line the guest printed on `host`, by tick."""
    found = re.findall(r"XRGUEST tick (\d+)[^\n]*\nXRGUEST mem [^\n]*MemFree:(\d+)",
                       host.guest_console(name))
    return sorted({(int(t), int(f)) for t, f in found})


def parse_counter(line: str) -> Counter:
    m = re.search(r"counter=(\d+) bootid=(\w+)", line)
    if not m:
        raise LabError(f"guest counter service replied {line!r}, expected counter=N bootid=X")
    return Counter(int(m.group(1)), m.group(2))


def counter(host: Host, spec: GuestSpec, timeout: float = 20.0) -> Counter:
    """Ask the guest's TCP counter service, from `host`'s dom0."""
    # Retried a few times: right after a restore or failover the guest's ARP/TCP may lag.
    # A reply counts even if nc then times out waiting for the close (slow TCG guests).
    cmd = (f"for i in 1 2 3 4 5; do r=$(echo | timeout 10 busybox nc {spec.ip} "
           f"{COUNTER_PORT}); [ -n \"$r\" ] && {{ echo \"$r\"; break; }}; sleep 1; done")
    r = host.run(cmd, timeout=timeout + 30)
    if not r.stdout.strip():
        raise LabError(f"host {host.name}: no reply from {spec.name} at {spec.ip}:"
                       f"{COUNTER_PORT} (rc {r.rc}, stderr {r.stderr.strip()!r})")
    return parse_counter(r.stdout.splitlines()[0])


def pattern_sha(host: Host, spec: GuestSpec, timeout: float = 30.0) -> str:
    """The guest re-hashes its boot-time memory pattern (tmpfs) and replies with the sha256
    (compare with lab.build.pattern_sha256(spec.pattern_lines))."""
    # A bigger pattern takes longer to hash: a second more per 2 MiB (generous, unmeasured).
    wait = 20 + spec.pattern_mib // 2
    r = host.run(f"echo check | timeout {wait} busybox nc {spec.ip} {COUNTER_PORT}",
                 timeout=max(timeout, wait + 10))
    m = re.search(r"pattern sha256=([0-9a-f]{64})", r.stdout)
    if not m:
        raise LabError(f"host {host.name}: {spec.name} gave no pattern hash: {r.stdout!r}")
    return m.group(1)


@dataclasses.dataclass(frozen=True)
class CpuWork:
    online: str  # the guest's /sys/devices/system/cpu/online, e.g. "0-1"
    counts: tuple[int, ...]  # each CPU's worker count, by CPU


def parse_cpu_work(line: str) -> CpuWork:
    m = re.search(r"cpus online=(\S+) work=([\d,]*)", line)
    if not m:
        raise LabError(f"guest counter service replied {line!r}, expected cpus online=... "
                       "work=N,...")
    return CpuWork(m.group(1), tuple(int(n) for n in m.group(2).split(",") if n))


def cpu_work(host: Host, spec: GuestSpec, timeout: float = 30.0) -> CpuWork:
    """The guest's online CPUs and the count of the worker pinned to each (spec.vcpus > 1),
    asked from ``host``'s dom0."""
    r = host.run(f"echo cpus | timeout 20 busybox nc {spec.ip} {COUNTER_PORT}", timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("cpus ")), r.stdout)
    return parse_cpu_work(line)


def cpus_working(host: Host, spec: GuestSpec, after: CpuWork | None = None,
                 timeout: float = 60.0) -> CpuWork:
    """Every one of the guest's ``spec.vcpus`` CPUs online, each worker counting (past
    ``after``'s counts, if given); LabError naming the CPUs that are not."""
    first = after or cpu_work(host, spec)
    deadline = time.monotonic() + timeout
    while True:
        now = cpu_work(host, spec)
        moving = [i for i, n in enumerate(now.counts)
                  if i < len(first.counts) and n > first.counts[i]]
        want = "0" if spec.vcpus == 1 else f"0-{spec.vcpus - 1}"
        if now.online == want and moving == list(range(spec.vcpus)):
            return now
        if time.monotonic() > deadline:
            raise LabError(f"{spec.name}: CPUs online {now.online!r}, worker counts "
                           f"{first.counts} then {now.counts} after {timeout:.0f} s: CPUs "
                           f"{sorted(set(range(spec.vcpus)) - set(moving))} not working")
        time.sleep(1)


def advancing(host: Host, spec: GuestSpec, after: Counter, timeout: float = 60.0) -> Counter:
    """The guest's counter, once it has moved past `after` (same boot: not a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        c = counter(host, spec)
        if c.bootid != after.bootid:
            raise LabError(f"{spec.name} rebooted: boot id {after.bootid} -> {c}")
        if c.value > after.value:
            return c
        if time.monotonic() > deadline:
            raise LabError(f"{spec.name} counter stuck at {c.value} for {timeout:.0f} s")
        time.sleep(1)


def destroy(host: Host, name: str) -> None:
    """`xl destroy` if the domain exists; never fails (clean-up)."""
    host.run(f"xl destroy {name} 2>/dev/null; true", timeout=60)


def domain_state(host: Host, name: str) -> str | None:
    """The xl list state column (e.g. 'r-----', '-b----', '--p---'), None if absent."""
    r = host.run(f"xl list {name} 2>/dev/null | tail -n +2", timeout=30)
    fields = r.stdout.split()
    return fields[4] if r.ok and len(fields) >= 5 else None


def domain_states(host: Host) -> dict[str, str]:
    """The xl list state of every domain on ``host``, by name (one `xl list`)."""
    r = host.run("xl list 2>/dev/null | tail -n +2", timeout=30)
    rows = (line.split() for line in r.stdout.splitlines())
    return {f[0]: f[4] for f in rows if len(f) >= 5}
