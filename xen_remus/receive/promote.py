"""The third failover gate: a cluster manager's promotion (`migrate-receive -r
--failover-on-promote`; the fence and the witness are the others, receive/fence.py).

Under Pacemaker the backup must not fail over by itself: the cluster fences the primary
and only then promotes the backup's clone instance (the OCF agent, xen_remus/ocf/). So
once the primary is declared dead the receiver writes a wait file, DOMAIN.promote-wait in
the run directory (JSON: pid, epoch, generation, token, since), and resumes its copy only
when DOMAIN.promote appears holding that token: `xen-remus promote DOMAIN` (what the
agent's promote action runs) writes it. A file, not a signal: it names the failover it
releases (a token fresh per wait, so a release left over from an earlier failover, or
written for a receiver that already gave up, releases nothing), it survives the releasing
process, and an operator can see and write it. Without a release within
``--promote-timeout`` the copy is held, as after a failed fence.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xen_remus.errors import XenRemusError
from xen_remus.paths import run_dir
from xen_remus.receive.limits import PROMOTE_TIMEOUT_S

log = logging.getLogger("xen_remus.receive")

POLL_S = 0.2
WAIT_SUFFIX = ".promote-wait"  # not .json: `xen-remus status` reads *.json as status files
RELEASE_SUFFIX = ".promote"


def wait_path(domain: str, directory: Path | None = None) -> Path:
    return (directory or run_dir()) / f"{domain}{WAIT_SUFFIX}"


def release_path(domain: str, directory: Path | None = None) -> Path:
    return (directory or run_dir()) / f"{domain}{RELEASE_SUFFIX}"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_wait(domain: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The wait file of ``domain``'s receiver, with ``alive`` (its pid runs); None if
    there is none (or it is unreadable: being replaced)."""
    try:
        doc = json.loads(wait_path(domain, directory).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
        return None
    pid = doc.get("pid")
    doc["alive"] = isinstance(pid, int) and pid > 0 and Path(f"/proc/{pid}").exists()
    return doc


@dataclass
class PromoteGate:
    """FailoverGate: wait, at most ``timeout`` s, for the cluster to promote this host."""

    timeout: float = PROMOTE_TIMEOUT_S
    directory: Path | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll: float = POLL_S
    _release: Path | None = field(default=None, init=False)

    @property
    def what(self) -> str:
        where = self._release or release_path("DOMAIN", self.directory)
        return f"the cluster's promotion (`xen-remus promote`, {where})"

    def run(self, domain: str | None, epoch: int, generation: int | None = None
            ) -> str | None:
        if not domain:
            return "cannot be asked: the stream named no domain"
        wait, release = wait_path(domain, self.directory), release_path(domain, self.directory)
        self._release = release
        token = secrets.token_hex(16)
        write_atomic(wait, json.dumps({"pid": os.getpid(), "epoch": epoch,
                                       "generation": generation, "token": token,
                                       "since": time.time()}))
        log.warning("failover: holding the copy of %s (epoch %d) until the cluster promotes "
                    "this host (`xen-remus promote %s`), at most %g s", domain, epoch,
                    domain, self.timeout)
        t0 = self.clock()
        stale = False
        try:
            while True:
                try:
                    got = release.read_text().strip()
                except FileNotFoundError:
                    got = None
                if got == token:
                    release.unlink(missing_ok=True)
                    log.warning("failover: promoted by the cluster after %.1f s",
                                self.clock() - t0)
                    return None
                if got is not None and not stale:
                    stale = True
                    log.warning("failover: ignoring %s: not this failover's token (left "
                                "from an earlier one?)", release)
                if self.clock() - t0 >= self.timeout:
                    return (f"did not come within {self.timeout:g} s (no {release} with "
                            "this failover's token)")
                self.sleep(self.poll)
        finally:
            wait.unlink(missing_ok=True)


def promote(domain: str, wait: float, directory: Path | None = None,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> int:
    """Release ``domain``'s receiver held by --failover-on-promote: wait up to ``wait``
    s for it to reach its gate (a promotion may come before it declared the primary
    dead), write its token, wait for it to take it. Returns the epoch it resumes from;
    a XenRemusError names what was missing."""
    deadline = clock() + wait
    doc = read_wait(domain, directory)
    while doc is None or not doc["alive"]:
        if clock() >= deadline:
            raise XenRemusError(
                f"no receiver of {domain} waits for a promotion (no live "
                f"{wait_path(domain, directory)} within {wait:g} s): nothing to resume")
        sleep(POLL_S)
        doc = read_wait(domain, directory)
    release = release_path(domain, directory)
    write_atomic(release, doc["token"] + "\n")
    while release.exists():  # the gate removes it once it took the token
        if not wait_path(domain, directory).exists() and release.exists():
            release.unlink(missing_ok=True)  # the gate removes the release before the wait
            raise XenRemusError(f"the receiver of {domain} (pid {doc['pid']}) gave up "
                                "waiting before it took the promotion: its copy is held")
        if clock() >= deadline:
            release.unlink(missing_ok=True)
            raise XenRemusError(f"the receiver of {domain} (pid {doc['pid']}) did not take "
                                f"the promotion in {release} within {wait:g} s")
        sleep(POLL_S)
    return int(doc.get("epoch", -1))
