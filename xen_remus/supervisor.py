"""The supervisor: a protected guest is paused if protect dies without a word.

protect starts it (``Supervisor.start``) with a pipe as its stdin and tells it, one line
each, what it would have to do:

    arm DOMID     the backup holds a checkpoint: if protect dies now, the backup resumes
                  its copy, and this one must not run on beside it
    disarm        protect itself decided what becomes of the guest (stopped, backup lost,
                  paused after a failure)

When the pipe ends (protect exited in any way, SIGKILL included: the kernel closes its
end) while armed, the supervisor runs ``xl pause DOMID``, then removes the dead protect's
network buffers (netbuf.recover), which DROPS the output they held (never released: the
backup lacks it), and marks the status file. Dropping matters beyond safety: the held
packets pin the guest's grant-mapped pages in netback, and while they are held the
domain cannot be destroyed nor a new vif be added. `xl` rather than our ctypes bindings:
this process must start fast and stay small, and the bindings pull in numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

PAUSE_TIMEOUT_S = 30.0


class Supervisor:
    """protect's handle on its supervisor process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.armed: int | None = None

    @classmethod
    def start(cls, status_path: Path, xl: str = "xl") -> Supervisor:
        # Own session: a Ctrl-C or SIGTERM meant for protect does not reach it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "xen_remus.supervisor", "--xl", xl,
             "--status", str(status_path)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        return cls(proc)

    def _say(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:  # it died: say so, protect goes on (it is the safety net)
            print(f"xen-remus protect: warning: the supervisor is gone ({exc}); a crash of "
                  "protect would leave the guest running here", file=sys.stderr)

    def arm(self, domid: int) -> None:
        if self.armed != domid:
            self._say(f"arm {domid}")
            self.armed = domid

    def disarm(self) -> None:
        if self.armed is not None:
            self._say("disarm")
            self.armed = None

    def close(self, timeout: float = 5.0) -> None:
        """End the pipe (an armed supervisor then pauses the guest) and reap it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # left to finish on its own (a slow xl pause); init reaps it


def watch(lines: IO[bytes], pause: list[str], status: Path | None) -> int | None:
    """Follow protect's lines until the pipe ends; then pause the armed domain. Returns
    the domid paused, or None."""
    armed: int | None = None
    for raw in lines:
        word, _, arg = raw.decode(errors="replace").strip().partition(" ")
        if word == "arm" and arg.isdigit():
            armed = int(arg)
        elif word == "disarm":
            armed = None
    if armed is None:
        return None
    t0 = time.monotonic()
    cmd = [*pause, str(armed)]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=PAUSE_TIMEOUT_S)
        failed = f"exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}" \
            if r.returncode else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        failed = str(exc)
    took = time.monotonic() - t0
    if failed:
        what = f"could NOT pause domain {armed} (`{' '.join(cmd)}` {failed})"
    else:
        what = (f"paused domain {armed} in {took:.1f} s: protect ended without a word "
                "while the backup held a checkpoint; the backup resumes its copy, so "
                "destroy this one (its held output was never released)")
    print(f"xen-remus supervisor: {what}", file=sys.stderr, flush=True)
    if status is not None:
        mark(status, "failed" if failed else "halted", what)
    if failed:
        return None
    drop_held_output()  # after the word: importing pyroute2 takes seconds in a slow dom0
    return armed


def drop_held_output() -> None:
    """Remove the network buffers of dead xen-remus runs (protect's, now): what they held
    is dropped, never released."""
    try:
        from xen_remus.devices.netbuf import recover

        cleaned = recover()
    except Exception as exc:  # the pause is done; this is cleanup, said and left
        print(f"xen-remus supervisor: could not remove the network buffers ({exc}); "
              "`xen-remus` recovers them at its next protect", file=sys.stderr, flush=True)
        return
    if cleaned:
        print(f"xen-remus supervisor: dropped the held output of {', '.join(cleaned)}",
              file=sys.stderr, flush=True)


def mark(path: Path, state: str, detail: str) -> None:
    """Set state/detail in protect's status file, if it is there (atomically)."""
    try:
        doc = json.loads(path.read_text())
        doc.update(state=state, detail=detail, updated=time.time())
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # the pause is what matters; the status is best effort


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xen_remus.supervisor",
                                description="internal: started by xen-remus protect")
    p.add_argument("--xl", default="xl")
    p.add_argument("--status", type=Path)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe's end counts
    watch(sys.stdin.buffer, [args.xl, "pause"], args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
