"""Where xen-remus keeps its files: the run directory (lost at reboot: domain locks,
status files, records of what was set up in the kernel) and the state directory (kept
across reboots: each domain's generation)."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = "/run/xen-remus"
STATE_DIR = "/var/lib/xen-remus"
XEN_SCRIPTS_DIR = "/etc/xen/scripts"  # libxl runs the hotplug scripts from here


def run_dir() -> Path:
    """RUN_DIR, or the directory XEN_REMUS_RUN_DIR names (tests, a second instance)."""
    return Path(os.environ.get("XEN_REMUS_RUN_DIR", RUN_DIR))


def state_dir() -> Path:
    """STATE_DIR, or the directory XEN_REMUS_STATE_DIR names (tests, a second instance)."""
    return Path(os.environ.get("XEN_REMUS_STATE_DIR", STATE_DIR))
