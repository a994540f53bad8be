"""What we set up in the kernel, on disk in the run directory, so a crashed run is cleaned.

One JSON file per device (``netbuf/vif5.0.json``), written *before* anything is created and
removed only once everything is gone. A file whose owner process is dead is a leftover of a
crash; the next setup of that device (or ``recover``) tears down what it records. A lock file
serialises set-up and tear-down between concurrent xen-remus processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xen_remus.devices.base import DeviceError
from xen_remus.paths import run_dir


@dataclass(frozen=True)
class Owner:
    """A process, named by pid and start time (so a recycled pid is not mistaken for it)."""

    pid: int
    start: str

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), _start_time(os.getpid()) or "")

    def alive(self) -> bool:
        start = _start_time(self.pid)
        return start is not None and start == self.start


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so split after ")".
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


class StateDir:
    """Records of one kind of device (``kind`` is a subdirectory of the run directory)."""

    def __init__(self, kind: str, root: Path | None = None) -> None:
        root = root or run_dir()
        self.dir = root / kind
        self.lock_path = root / f"{kind}.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive between processes (flock); released when the process dies."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeviceError(f"cannot create {self.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Unreadable: treat as a leftover that names nothing (the caller cleans by name).
            return {"corrupt": str(exc)}
        return data if isinstance(data, dict) else {"corrupt": "not an object"}

    def write(self, key: str, record: dict[str, Any], owner: Owner) -> None:
        data = dict(record, pid=owner.pid, start=owner.start)
        tmp = self.path(key).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
            os.replace(tmp, self.path(key))
        except OSError as exc:
            raise DeviceError(f"cannot write {self.path(key)}: {exc.strerror}") from None

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def keys(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.dir.glob("*.json"))


def owner_of(record: dict[str, Any]) -> Owner | None:
    pid, start = record.get("pid"), record.get("start")
    if isinstance(pid, int) and isinstance(start, str):
        return Owner(pid, start)
    return None
