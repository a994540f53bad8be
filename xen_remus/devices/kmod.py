"""Kernel modules a device needs: present (loaded or built in), else loaded, else refused."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from xen_remus.devices.base import DeviceError


class MissingKernelModule(DeviceError):
    """A kernel module the device needs is neither built in nor loadable."""

    def __init__(self, device: str, missing: dict[str, str], needed: Iterable[str]) -> None:
        self.missing = missing
        what = "; ".join(f"{m} ({why})" for m, why in missing.items())
        super().__init__(
            f"{device}: kernel module{'s' if len(missing) > 1 else ''} missing: {what}. "
            f"{device} needs {', '.join(needed)}")


def _run_modprobe(flags: list[str], name: str, missing: str) -> str | None:
    """`modprobe FLAGS NAME`: None if it succeeded, else why not (``missing``: there is no
    modprobe)."""
    cmd = " ".join(["modprobe", *flags])
    try:
        r = subprocess.run(["modprobe", *flags, name], capture_output=True, text=True,
                           timeout=60, check=False)
    except FileNotFoundError:
        return missing
    except subprocess.TimeoutExpired:
        return f"{cmd} timed out"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or [f"{cmd} exited {r.returncode}"])[-1]
    return None


def _modprobe(name: str) -> str | None:
    """Load ``name``; None if it worked, else why not."""
    return _run_modprobe([], name, "no modprobe to load it")


def _modprobe_dry(name: str) -> str | None:
    """Could ``name`` be loaded (modprobe -n: nothing is loaded)? None if so, else why not."""
    return _run_modprobe(["-n"], name, "no modprobe (apt-get install kmod)")


class Modules:
    """The kernel's view of its modules (paths overridable for tests)."""

    def __init__(self, proc: Path = Path("/proc/modules"), sys_module: Path = Path("/sys/module"),
                 builtin: Path | None = None,
                 modprobe: Callable[[str], str | None] = _modprobe,
                 modprobe_dry: Callable[[str], str | None] = _modprobe_dry) -> None:
        self.proc, self.sys_module, self.modprobe = proc, sys_module, modprobe
        self.modprobe_dry = modprobe_dry
        self.builtin = builtin or Path("/lib/modules") / os.uname().release / "modules.builtin"

    def present(self) -> set[str] | None:
        """Loaded and built-in module names; None if this kernel has no module support."""
        try:
            text = self.proc.read_text()
        except FileNotFoundError:
            return None
        names = {line.split(" ", 1)[0] for line in text.splitlines() if line}
        try:
            names |= {Path(p).name.removesuffix(".ko").replace("-", "_")
                      for p in self.builtin.read_text().split()}
        except OSError:
            pass
        if self.sys_module.is_dir():
            names |= {p.name for p in self.sys_module.iterdir()}
        return names

    def require(self, device: str, needed: Iterable[str]) -> None:
        """Load what is missing; raise MissingKernelModule naming what still is."""
        needed = list(needed)
        present = self.present()
        if present is None:
            return  # a kernel without modules: each netlink step says what it lacks
        missing: dict[str, str] = {}
        for name in needed:
            if name not in present:
                why = self.modprobe(name)
                if why is not None:
                    missing[name] = why
        if missing:
            raise MissingKernelModule(device, missing, needed)
