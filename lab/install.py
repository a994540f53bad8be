"""The README's install steps on a lab host, offline: the steps read from the README
itself (section "Install on your Xen hosts"), the wheel built on this machine and handed
to dom0 over the run's share (lab VMs have no network), the installed `xen-remus` run
with the checkout out of Python's path."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.errors import LabError

SECTION = "## Install on your Xen hosts"
VENV = "/opt/xen-remus"
# The README's stand-in for where the wheel is, and where dom0 finds the one we build.
WHERE = "/path/to/"
DIST = "/mnt/lab/dist/"
# The lab's agent runs every command with PYTHONPATH=/mnt/project (the checkout): the
# installed command must work without it, from a directory with nothing of ours.
CLEAN = "unset PYTHONPATH; cd /root; "
# What the wheel is built from (pyproject.toml's package data and readme included).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "xen_remus")
WHEEL_TIMEOUT_S = 600


def install_steps(readme: str) -> list[str]:
    """The commands of the first code block of the README's install section, one a
    line: continuations joined, comments dropped."""
    at = readme.find(SECTION + "\n")
    if at < 0:
        raise LabError(f"the README has no section {SECTION!r}")
    block = re.search(r"^```[^\n]*\n(.*?)^```", readme[at:], re.S | re.M)
    if block is None:
        raise LabError(f"no code block in the README's {SECTION!r}")
    steps = []
    for line in block[1].replace("\\\n", " ").splitlines():
        cmd = re.sub(r"(^|\s)#.*$", "", line).strip()
        if cmd:
            steps.append(" ".join(cmd.split()))
    return steps


def apt_packages(step: str) -> list[str] | None:
    """The packages of an `apt-get install` step (None: another step)."""
    words = step.split()
    if words[:2] != ["apt-get", "install"]:
        return None
    return [w for w in words[2:] if not w.startswith("-")]


def build_wheel(project: Path, dest: Path) -> Path:
    """``pip wheel`` of the checkout ``project`` into ``dest`` (from a copy of its
    sources: the checkout keeps no build/ litter, and no stale build/ gets in)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("xen_remus-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="xen-remus-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            path = project / name
            if path.is_dir():
                shutil.copytree(path, src / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(path, src / name)
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                                "-w", str(dest), str(src)], capture_output=True, text=True,
                               timeout=WHEEL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"pip wheel of {project} took over {WHEEL_TIMEOUT_S} s") from None
    wheels = sorted(dest.glob("xen_remus-*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        raise LabError(f"pip wheel of {project} exited {r.returncode}, made {wheels}:\n"
                       f"{r.stderr[-3000:]}")
    return wheels[0]


def in_dom0(step: str) -> str:
    """A README step as the lab runs it in dom0: the wheel from the share, no checkout."""
    return CLEAN + step.replace(WHERE, DIST)


def installed(cmd: str) -> str:
    """A lab command that runs the checkout (`python3 -m xen_remus`, lab/protect.py) as
    the installed `xen-remus` instead."""
    if "python3 -m xen_remus" not in cmd:
        raise LabError(f"not a command of the checkout's xen_remus: {cmd!r}")
    return CLEAN + cmd.replace("python3 -m xen_remus", "xen-remus")


def missing(check_output: str) -> list[str]:
    """The names `xen-remus check` says are MISSING."""
    return re.findall(r"^MISSING\s+(.+?): ", check_output, re.M)
