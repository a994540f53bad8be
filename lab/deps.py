"""Host prerequisites of the lab, installed with apt-get (fresh Debian 12, as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Debian package -> a command it provides (to skip apt when all are present).
HOST_PACKAGES: dict[str, str] = {
    "qemu-system-x86": "qemu-system-x86_64",
    "debootstrap": "debootstrap",
    "cpio": "cpio",
    "zstd": "zstd",
    "busybox-static": "busybox",
    "socat": "socat",
}


def missing() -> list[str]:
    return [pkg for pkg, cmd in HOST_PACKAGES.items() if shutil.which(cmd) is None]


def install(force: bool = False) -> None:
    """apt-get update + install whatever host package is missing."""
    todo = list(HOST_PACKAGES) if force else missing()
    if not todo:
        print("lab deps: all host packages present")
        return
    if os.geteuid() != 0:
        sys.exit(f"lab deps: need root to apt-get install {' '.join(todo)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"lab deps: apt-get install {' '.join(todo)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdin=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *todo],
        check=True, env=env, stdin=subprocess.DEVNULL,
    )
