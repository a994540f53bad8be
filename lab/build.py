"""Build the lab's images from Debian packages, cached outside the checkout.

Stages, each cached in ``<cache>/<stage>-<hash>/`` where the hash covers the stage's own
source code, its pinned inputs and the hashes of the stages it uses (so a warm run rebuilds
nothing and any recipe change rebuilds exactly what depends on it):

- ``debs``:   the pinned hypervisor (shadow paging, LAB-NOTES 3) and the Debian kernel,
              extracted with dpkg-deb (nothing is installed on the host);
- ``rootfs``: debootstrap of bookworm with the toolstack, trimmed kernel modules, packed as
              a zstd cpio (the large, slow part of dom0's initramfs);
- ``guest``:  the busybox guest initramfs with the counter workload;
- ``dom0``:   dom0's init and agent, as a second cpio appended to the rootfs archive (the
              kernel unpacks concatenated archives). Guest images reach dom0 over the share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lab.errors import LabError

HV_PACKAGE = "xen-hypervisor-4.17-amd64"
# Bookworm main build: has CONFIG_SHADOW_PAGING=y (the security build does not).
HV_VERSION = "4.17.5+72-g01140da4e8-1"
SUITE = "bookworm"
# python3-venv and openssh-client: what the README's install steps apt-get beside the
# toolstack (tests/lab/test_fresh_install.py follows them offline in a dom0).
# qemu-system-xen: the device model of HVM guests (/usr/libexec/xen-qemu-system-i386, as
# Debian's libxl looks for it); it brings seabios, whose bios-256k.bin hvmloader loads.
DOM0_PACKAGES = (
    "xen-utils-4.17 xenstore-utils python3 python3-pyxs python3-pyroute2 python3-lz4 "
    "python3-numpy kmod iproute2 procps busybox-static socat nbd-client nbd-server nbdkit "
    "python3-venv openssh-client qemu-system-xen"
).split()
DOM0_MODULES = (
    "xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback "
    "bridge ifb sch_plug act_mirred cls_u32 cls_matchall sch_ingress nbd tun loop "
    "virtio_pci virtio_net 9p 9pnet_virtio virtio_console"
).split()
# Only in the cluster lab's dom0s (Lab(cluster=True), lab/cluster.py): Pacemaker and
# corosync, and sshd, the transport `xen-remus protect` starts the receiver through.
CLUSTER_PACKAGES = "corosync pacemaker pacemaker-cli-utils openssh-server".split()
# ext4 and what it needs (modinfo depends/softdep), for the guests with an ext4 disk.
GUEST_MODULES = ("drivers/net/xen-netfront.ko", "drivers/block/xen-blkfront.ko",
                 "lib/crc16.ko", "fs/mbcache.ko", "crypto/crc32c_generic.ko",
                 "fs/jbd2/jbd2.ko", "fs/ext4/ext4.ko")
# Memory pattern written by the guest at boot (lab/guest/init), checked later over TCP:
# this many lines of 1 KiB unless the guest is told otherwise (GuestSpec.pattern_mib).
PATTERN_LINES = 4096

HERE = Path(__file__).resolve().parent
STAGES = ("debs", "rootfs", "guest", "dom0")


def expected_banner() -> str:
    """The Xen banner the pinned hypervisor prints (LAB-NOTES 15)."""
    return f"Xen version {HV_VERSION.split('+')[0]} (Debian {HV_VERSION})"


def pattern_sha256(lines: int = PATTERN_LINES) -> str:
    """sha256 of the guest's memory pattern, computed the way the guest's awk writes it."""
    h = hashlib.sha256()
    for i in range(lines):
        h.update(b"%08d %s\n" % (i, b"x" * 1014))
    return h.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xen-remus-lab"


def apt_mirror() -> str:
    """The machine's own Debian mirror (LAB-NOTES 13), from its apt sources."""
    srcs = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in srcs:
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in lists:
        if path.exists():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", path.read_text(), re.M)
            if m:
                return m.group(1)
    raise LabError(f"no apt source for {SUITE} in /etc/apt: cannot pick a debootstrap mirror")


@dataclasses.dataclass(frozen=True)
class Images:
    """What a host boots: paths in the cache."""

    xen: Path
    vmlinuz: Path
    vmlinux: Path  # the uncompressed kernel ELF, booted as dom0 and as guests
    rootfs: Path
    dom0_initrd: Path
    guest_initrd: Path
    kver: str
    recipe: str  # hash of the final stage, shown in logs


def sh(cmd: str | list[str], **kw: object) -> None:
    """Run a build command; its failure is a LabError naming the command."""
    shell = isinstance(cmd, str)
    r = subprocess.run(cmd, shell=shell, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise LabError(f"build command failed (rc={r.returncode}): {cmd}")


def out(cmd: list[str]) -> str:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stderr.strip()}")
    return r.stdout


def files_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                h.update(str(p.relative_to(HERE)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def key_of(fn: Callable[..., object], *inputs: str) -> str:
    h = hashlib.sha256(inspect.getsource(fn).encode())
    for s in inputs:
        h.update(b"\0" + s.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached(stage: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return ``<cache>/<stage>-<key>``, building it first (atomically) if absent."""
    final = cache_root() / f"{stage}-{key}"
    if (final / ".done").exists():
        print(f"lab build: {stage} cached ({final})", flush=True)
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=cache_root()))
    print(f"lab build: building {stage} -> {final}", flush=True)
    t0 = time.monotonic()
    try:
        build(tmp)
        (tmp / ".done").write_text(time.strftime("%FT%TZ", time.gmtime()) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lab build: {stage} built in {time.monotonic() - t0:.1f} s", flush=True)
    return final


def kernel_package() -> str:
    deps = out(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends:\s*(linux-image-\d\S*)", deps)
    if not m:
        raise LabError("apt-cache depends linux-image-amd64: no linux-image-<version> found")
    return m.group(1)


def build_debs(dst: Path, kpkg: str) -> None:
    debs = dst / "debs"
    debs.mkdir()
    hv = f"{HV_PACKAGE}={HV_VERSION}"
    r = subprocess.run(["apt-get", "download", hv, kpkg], cwd=debs, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        policy = out(["apt-cache", "policy", HV_PACKAGE])
        raise LabError(f"apt-get download {hv} {kpkg} failed; apt-cache policy:\n{policy}")
    ext = dst / "ext"
    for deb in sorted(debs.glob("*.deb")):
        sh(["dpkg-deb", "-x", str(deb), str(ext)])
    config = next((ext / "boot").glob("xen-*.config")).read_text()
    if "CONFIG_SHADOW_PAGING=y" not in config:
        raise LabError(f"{hv} lacks CONFIG_SHADOW_PAGING=y: PV log-dirty would fail")
    with open(dst / "xen", "wb") as f:  # QEMU's multiboot loader wants the gunzipped ELF
        sh(["zcat", str(next((ext / "boot").glob("xen-*.gz")))], stdout=f)
    vmlinuz = next((ext / "boot").glob("vmlinuz-*"))
    shutil.copy(vmlinuz, dst / "vmlinuz")
    # The ELF inside the bzImage: Xen (dom0) and xl (guests) then load it without
    # decompressing it under TCG, which took 10-60 s per boot or xl create.
    data = vmlinuz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise LabError(f"{vmlinuz.name}: no xz payload (Debian's kernels are xz-compressed)")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"{vmlinuz.name}: xz payload at offset {at} is not an ELF image")
    (dst / "vmlinux").write_bytes(elf)
    kver = next((ext / "lib/modules").iterdir()).name
    (dst / "KVER").write_text(kver)
    shutil.move(ext / "lib/modules", dst / "modules")
    shutil.rmtree(ext)
    shutil.rmtree(debs)


def build_rootfs(dst: Path, debs: Path, mirror: str, extra: tuple[str, ...] = ()) -> None:
    root = dst / "root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.monotonic()
    sh(["debootstrap", "--variant=minbase", f"--include={','.join(DOM0_PACKAGES + list(extra))}",
        SUITE, str(root), mirror], env=env, stdout=subprocess.DEVNULL)
    print(f"lab build:   debootstrap {time.monotonic() - t0:.1f} s", flush=True)
    # Kernel modules: only what dom0 needs, with their dependencies.
    kver = (debs / "KVER").read_text()
    mods = root / "lib/modules"
    shutil.rmtree(mods, ignore_errors=True)
    mods.mkdir(parents=True)
    shutil.copytree(debs / "modules" / kver, mods / kver, symlinks=True)
    sh(["chroot", str(root), "depmod", kver])
    deps = out(["chroot", str(root), "modprobe", "-a", "-S", kver, "--show-depends", *DOM0_MODULES])
    keep = {line.split()[1] for line in deps.splitlines() if line.startswith("insmod ")}
    for ko in (mods / kver / "kernel").rglob("*.ko*"):
        if "/" + str(ko.relative_to(root)) not in keep:
            ko.unlink()
    sh(["chroot", str(root), "depmod", kver])
    for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                 "usr/share/locale", "usr/share/info"):
        shutil.rmtree(root / junk, ignore_errors=True)
    sh(["chroot", str(root), "passwd", "-d", "root"], stdout=subprocess.DEVNULL)
    versions = out(["chroot", str(root), "dpkg-query", "-W", "xen-utils-4.17", "python3",
                    "qemu-system-xen", "seabios"])
    (dst / "versions").write_text(versions)
    print(f"lab build:   dom0 packages: {' '.join(versions.split())}", flush=True)
    pack(root, dst / "rootfs.cpio.zst", "zstd -q -T0 -3")


def pack(src: Path, dst: Path, compress: str) -> None:
    sh(f"cd {src} && find . -xdev | LC_ALL=C sort | cpio -o -H newc --quiet | {compress} > {dst}")


def build_guest(dst: Path, debs: Path, rootfs: Path) -> None:
    d = dst / "root"
    for sub in ("bin", "proc", "sys", "dev", "tmp", "etc", "lib/modules"):
        (d / sub).mkdir(parents=True)
    shutil.copy(rootfs / "root/bin/busybox", d / "bin/busybox")
    for applet in out([str(d / "bin/busybox"), "--list"]).split():
        if applet != "busybox":
            (d / "bin" / applet).symlink_to("busybox")
    kmods = debs / "modules" / (debs / "KVER").read_text() / "kernel"
    for ko in GUEST_MODULES:
        shutil.copy(kmods / ko, d / "lib/modules")
    for f in (HERE / "guest").iterdir():
        shutil.copy(f, d / ("init" if f.name == "init" else f"bin/{f.name}"))
    pack(d, dst / "guest-initrd.cpio.gz", "gzip -9")
    shutil.rmtree(d)


def build_dom0(dst: Path, rootfs: Path) -> None:
    d = dst / "overlay"
    d.mkdir()
    shutil.copy(HERE / "dom0/init", d / "init")
    shutil.copy(HERE / "dom0/agent", d / "agent")
    pack(d, dst / "overlay.cpio.gz", "gzip -1")
    with open(dst / "dom0-initrd", "wb") as f:
        for part in (rootfs / "rootfs.cpio.zst", dst / "overlay.cpio.gz"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    shutil.rmtree(d)


def build(cluster: bool = False) -> Images:
    """Build (or find in the cache) everything a lab host boots; ``cluster``: with
    CLUSTER_PACKAGES in dom0 (a rootfs and dom0 stage of their own)."""
    extra = tuple(CLUSTER_PACKAGES) if cluster else ()
    t0 = time.monotonic()
    with cache_lock():
        mirror = apt_mirror()
        kpkg = kernel_package()
        debs = cached("debs", key_of(build_debs, HV_VERSION, kpkg),
                      lambda p: build_debs(p, kpkg))
        rootfs = cached("rootfs", key_of(build_rootfs, debs.name, mirror, *DOM0_PACKAGES,
                                         *DOM0_MODULES, SUITE, *extra),
                        lambda p: build_rootfs(p, debs, mirror, extra))
        guest = cached("guest", key_of(build_guest, debs.name, rootfs.name,
                                       files_digest(HERE / "guest"), *GUEST_MODULES),
                       lambda p: build_guest(p, debs, rootfs))
        dom0 = cached("dom0", key_of(build_dom0, rootfs.name,
                                     files_digest(HERE / "dom0/init", HERE / "dom0/agent")),
                      lambda p: build_dom0(p, rootfs))
    images = Images(xen=debs / "xen", vmlinuz=debs / "vmlinuz", vmlinux=debs / "vmlinux",
                    rootfs=rootfs, dom0_initrd=dom0 / "dom0-initrd",
                    guest_initrd=guest / "guest-initrd.cpio.gz", kver=(debs / "KVER").read_text(),
                    recipe=f"{dom0.name}+{guest.name}")
    (cache_root() / "latest.json").write_text(json.dumps(
        {k: str(v) for k, v in dataclasses.asdict(images).items()}, indent=1))
    print(f"lab build: ready ({images.recipe}) in {time.monotonic() - t0:.1f} s", flush=True)
    return images



def prune(keep: Images) -> None:
    """Delete cached stages that these images do not use (older recipes)."""
    used = {keep.xen.parent, keep.rootfs, keep.dom0_initrd.parent, keep.guest_initrd.parent}
    for d in cache_root().iterdir():
        if d.is_dir() and d.name.split("-")[0] in STAGES and d not in used:
            print(f"lab build: pruning {d}", flush=True)
            shutil.rmtree(d)
