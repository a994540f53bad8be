"""`xen-remus check`: what this host needs to protect guests or keep their backups, one
line each: ok, or missing and how to fix it (a Debian 12 package, modprobe). Looks only:
nothing is loaded, installed or changed."""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xen_remus.cli.disk import SCRIPT, packaged_script
from xen_remus.devices.kmod import Modules
from xen_remus.devices.netbuf import MODULES as NETBUF_MODULES
from xen_remus.host import SONAMES
from xen_remus.paths import XEN_SCRIPTS_DIR as SCRIPTS_DIR

DESCRIPTION = """Check that this host has what xen-remus needs: a Xen dom0 with xl and the
Xen 4.17 libraries, the Python modules, the kernel modules of network buffering (ifb,
sch_plug, sch_ingress, act_mirred, cls_matchall) and of replicated disks (nbd), nbd-client,
ssh, and the block-remus hotplug script. One line each: ok, or MISSING with how to fix it
on Debian 12. Nothing is changed."""
EPILOG = "Exit status: 0 when everything is there, 1 when something is missing."

# Debian 12 packages (Xen 4.17): each library's, each Python module's.
LIB_PACKAGES = {"xenctrl": "libxenmisc4.17", "xenguest": "libxenmisc4.17",
                "xenforeignmemory": "libxenforeignmemory1", "xenevtchn": "libxenevtchn1",
                "xentoollog": "libxentoollog1"}
PY_PACKAGES = {"numpy": "python3-numpy", "lz4": "python3-lz4", "pyroute2": "python3-pyroute2",
               "pyxs": "python3-pyxs"}
# The kernel option of each module, for a kernel that is not Debian's.
KCONFIG = {"ifb": "CONFIG_IFB", "sch_plug": "CONFIG_NET_SCH_PLUG",
           "sch_ingress": "CONFIG_NET_SCH_INGRESS", "act_mirred": "CONFIG_NET_ACT_MIRRED",
           "cls_matchall": "CONFIG_NET_CLS_MATCHALL", "nbd": "CONFIG_BLK_DEV_NBD"}
KERNEL_MODULES = (*NETBUF_MODULES, "nbd")
CAPABILITIES = Path("/proc/xen/capabilities")


@dataclass(frozen=True)
class Item:
    name: str
    ok: bool
    detail: str  # what was found, or what is wrong
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.name}: {self.detail}"
        return f"MISSING  {self.name}: {self.detail}. Fix: {self.fix}"


def _load_library(soname: str) -> str | None:
    try:
        ctypes.CDLL(soname)
    except OSError as exc:
        return str(exc)
    return None


def _which(name: str) -> str | None:
    # root's sbin directories even when the caller's PATH lacks them (xl is in /usr/sbin)
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclass
class Host:
    """What the check looks at; tests replace the parts."""

    which: Callable[[str], str | None] = _which
    load_library: Callable[[str], str | None] = _load_library
    has_python_module: Callable[[str], bool] = (
        lambda name: importlib.util.find_spec(name) is not None)
    modules: Modules | None = None
    capabilities: Path = CAPABILITIES
    scripts_dir: Path = Path(SCRIPTS_DIR)


def checks(host: Host) -> list[Item]:
    items = [dom0(host)]
    items.append(program(host, "xl", "the Xen toolstack", "apt-get install xen-utils-4.17"))
    for key, soname in SONAMES.items():
        why = host.load_library(soname)
        items.append(Item(soname, why is None, "loads" if why is None else why,
                          f"apt-get install {LIB_PACKAGES[key]} (xen-utils-4.17 "
                          "depends on it)"))
    for mod, pkg in PY_PACKAGES.items():
        there = host.has_python_module(mod)
        items.append(Item(f"python module {mod}", there,
                          "importable" if there else "not importable by this Python",
                          f"apt-get install {pkg} (in a venv: --system-site-packages, or "
                          f"pip install {mod})"))
    items += kernel_modules(host.modules or Modules())
    items.append(program(host, "nbd-client", "attaches replicated disks (block-remus)",
                         "apt-get install nbd-client"))
    items.append(program(host, "ssh", "protect starts the backup's receiver through it",
                         "apt-get install openssh-client"))
    items.append(program(host, "xen-remus", "ssh from the primary and block-remus run it "
                         "by this name", "put it on root's PATH, e.g. ln -s "
                         "/opt/xen-remus/bin/xen-remus /usr/local/bin/ (README: Install)"))
    items.append(hotplug_script(host.scripts_dir))
    return items


def dom0(host: Host) -> Item:
    try:
        caps = host.capabilities.read_text().split()
    except OSError as exc:
        caps, why = [], f"no {host.capabilities} ({exc.strerror or exc}): not running on Xen"
    else:
        why = f"{host.capabilities} says {' '.join(caps) or 'nothing'}: a guest, not dom0"
    return Item("Xen dom0", "control_d" in caps,
                f"{host.capabilities}: control_d" if "control_d" in caps else why,
                "apt-get install xen-system-amd64 and reboot into the Xen entry of GRUB")


def program(host: Host, name: str, what: str, fix: str) -> Item:
    path = host.which(name)
    return Item(name, path is not None, f"{path} ({what})" if path else
                f"not on the PATH ({what})", fix)


def kernel_modules(mods: Modules) -> list[Item]:
    present = mods.present()
    out = []
    for name in KERNEL_MODULES:
        used = "replicated disks" if name == "nbd" else "network buffering"
        label = f"kernel module {name}"
        if present is None:
            out.append(Item(label, True, "this kernel has no loadable modules: built in or "
                            "not, only its use will tell"))
        elif name in present:
            out.append(Item(label, True, f"loaded or built in ({used})"))
        elif (why := mods.modprobe_dry(name)) is None:
            out.append(Item(label, True, f"not loaded, loadable: xen-remus loads it when "
                            f"needed ({used})"))
        else:
            out.append(Item(label, False, f"cannot be loaded: {why}",
                            f"Debian's kernel (apt-get install linux-image-amd64) has it; "
                            f"another kernel needs {KCONFIG[name]}=m; then modprobe {name}"))
    return out


def hotplug_script(scripts_dir: Path) -> Item:
    path = scripts_dir / SCRIPT
    fix = "xen-remus service install (or xen-remus disk install-script)"
    try:
        have = path.read_bytes()
    except FileNotFoundError:
        return Item(SCRIPT, False, f"no {path} (replicated disks need it)", fix)
    except OSError as exc:
        return Item(SCRIPT, False, f"{path}: {exc.strerror or exc}", fix)
    if have != packaged_script():
        return Item(SCRIPT, False, f"{path} is not this version's", fix)
    if not path.stat().st_mode & 0o100:
        return Item(SCRIPT, False, f"{path} is not executable", f"chmod 755 {path}")
    return Item(SCRIPT, True, f"{path}, this version's")


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check that this host has what xen-remus needs",
                       description=DESCRIPTION, epilog=EPILOG)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, host: Host | None = None) -> int:
    items = checks(host or Host())
    for item in items:
        print(item.line())
    missing = [i.name for i in items if not i.ok]
    print(f"{len(items) - len(missing)} of {len(items)} ok"
          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0
