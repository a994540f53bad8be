"""Failover gates: what must succeed before a backup resumes its copy (FailoverGate).
Two of them: the fence here (the primary is made to be down) and the witness
(witness/lease.py WitnessGate: a third party gives this host the next generation).

`migrate-receive -r --fence CMD` runs CMD (a shell command: IPMI, a PDU, `ssh A xl
destroy DOMAIN`...) once the primary is declared dead, bounded by `--fence-timeout`. The
copy is resumed only if CMD exits 0; otherwise it is held (the driver, XlSink.hold): a
primary that merely lost its link to this host may still be running the guest, and two
running copies are worse than none running until an operator decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from xen_remus.receive.limits import FENCE_TIMEOUT_S
from xen_remus.restore_continuous import ReceiveError

log = logging.getLogger("xen_remus.receive")


class FenceFailed(ReceiveError):
    """A failover gate (the fence, the witness) did not let the copy resume (names the
    gate, how it failed and the epoch held)."""


class FailoverGate(Protocol):
    """Asked once the primary is declared dead, before anything of the failover."""

    @property
    def what(self) -> str:
        """The gate, for messages ("the fence command `...`", "the witness ...")."""
        ...

    def run(self, domain: str | None, epoch: int, generation: int | None = None
            ) -> str | None:
        """None if ``domain``'s copy of ``epoch`` (of protection ``generation``) may
        resume, else why not."""
        ...


@dataclass(frozen=True)
class Fence:
    command: str
    timeout: float = FENCE_TIMEOUT_S

    @property
    def what(self) -> str:
        return f"the fence command `{self.command}`"

    def run(self, domain: str | None, epoch: int, generation: int | None = None
            ) -> str | None:
        """Run the command for ``domain`` (XEN_REMUS_DOMAIN) failing over from ``epoch``
        (XEN_REMUS_EPOCH): None once it exited 0, else what went wrong. Its output goes
        to our stderr: our stdout is the channel to the primary."""
        env = dict(os.environ, XEN_REMUS_DOMAIN=domain or "", XEN_REMUS_EPOCH=str(epoch))
        log.warning("failover: fencing the primary first: `%s` (at most %g s)",
                    self.command, self.timeout)
        t0 = time.monotonic()
        err = sys.stderr.fileno()
        try:
            # Own session: on a timeout the whole tree goes (an ssh under the shell too).
            proc = subprocess.Popen(self.command, shell=True, env=env,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True)
        except OSError as exc:
            return f"could not be started ({exc})"
        try:
            rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            return f"did not finish within {self.timeout:g} s (killed)"
        if rc < 0:
            return f"was killed by signal {-rc}"
        if rc:
            return f"exited with status {rc}"
        log.warning("failover: the primary is fenced (`%s` exited 0 in %.1f s)",
                    self.command, time.monotonic() - t0)
        return None
