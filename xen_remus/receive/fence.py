"""The fence: before a backup resumes its copy, make sure the primary is down.

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

from xen_remus.receive.limits import FENCE_TIMEOUT_S
from xen_remus.restore_continuous import ReceiveError

log = logging.getLogger("xen_remus.receive")


class FenceFailed(ReceiveError):
    """The fence did not succeed: the copy was not resumed (names the command, how it
    failed and the epoch held)."""


@dataclass(frozen=True)
class Fence:
    command: str
    timeout: float = FENCE_TIMEOUT_S

    def run(self, domain: str | None, epoch: int) -> str | None:
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
