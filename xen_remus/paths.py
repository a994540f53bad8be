"""Where xen-remus keeps its run-time files: one directory for the domain locks, the
status files and the records of what was set up in the kernel."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = "/run/xen-remus"


def run_dir() -> Path:
    """RUN_DIR, or the directory XEN_REMUS_RUN_DIR names (tests, a second instance)."""
    return Path(os.environ.get("XEN_REMUS_RUN_DIR", RUN_DIR))
