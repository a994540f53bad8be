"""A witness on this machine and a two-host lab whose hosts reach it: `xen-remus witness`
runs here, each dom0 reaches it through its own virtio-serial port (Lab(witness=...),
lab/host.py), apart from the A-B link, with the key lab/protect.py's WITNESS_OPTS name."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lab import protect
from lab.errors import LabError
from lab.lab import Lab, project_dir


@dataclasses.dataclass(frozen=True)
class WitnessedLab:
    lab: Lab
    proc: subprocess.Popen[bytes]  # the witness
    log: Path  # its stderr (-v: every grant and refusal)

    def said(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def witnessed_lab() -> Iterator[WitnessedLab]:
    tmp = tempfile.mkdtemp(prefix="xr-witness-", dir="/tmp")  # short: a socket path
    key = secrets.token_hex(16)
    key_path = os.path.join(tmp, "key")
    with open(key_path, "w") as f:
        f.write(key)
    os.chmod(key_path, 0o600)
    sock = Path(tmp) / "w.sock"
    log = Path(tmp) / "witness.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "xen_remus", "-v", "witness",
                                 "--listen", f"unix:{sock}", "--key-file", key_path,
                                 "--state-dir", os.path.join(tmp, "state")],
                                env=dict(os.environ, PYTHONPATH=str(project_dir())),
                                stderr=err)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if proc.poll() is not None:
                    raise LabError(f"the witness exited: {log.read_text(errors='replace')}")
                if time.monotonic() > deadline:
                    raise LabError("the witness did not listen within 30 s")
                time.sleep(0.2)
            with Lab(2, witness=sock) as lab:
                for h in (lab.a, lab.b):
                    h.run(f"umask 077 && printf %s {key} > {protect.WITNESS_KEY} && "
                          "ls -l /dev/virtio-ports/", timeout=60, check=True)
                yield WitnessedLab(lab, proc, log)
        finally:
            proc.terminate()
            proc.wait(30)
            print(f"witness log: {log}")
