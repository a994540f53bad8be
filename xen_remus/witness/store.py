"""The witness's records on disk: STATE_DIR/witness/GUEST.lease, one JSON object each,
written atomically and synced before the answer that depends on it goes out, so that a
witness that crashes and restarts never hands a lease it granted to someone else."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote, unquote

from xen_remus.errors import XenRemusError
from xen_remus.fdio import replace_durably
from xen_remus.paths import state_dir
from xen_remus.witness.core import Saved

SUFFIX = ".lease"


class WitnessStoreError(XenRemusError):
    """A record that cannot be read or written: names the file."""


class WitnessStore:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else state_dir() / "witness"

    def path(self, guest: str) -> Path:
        return self.directory / f"{quote(guest, safe='')}{SUFFIX}"

    def load(self) -> dict[str, Saved]:
        out: dict[str, Saved] = {}
        if not self.directory.exists():
            return out
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                doc = json.loads(path.read_text("utf-8"))
                out[unquote(path.name[:-len(SUFFIX)])] = Saved(
                    str(doc["holder"]), int(doc["generation"]), int(doc["duration_ms"]),
                    bool(doc.get("released", False)))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Refuse to start rather than forget a lease: the holder may be running.
                raise WitnessStoreError(f"witness record {path}: {exc}; fix or remove it "
                                        "(only if no host runs that guest)") from None
        return out

    def put(self, guest: str, saved: Saved) -> None:
        path = self.path(guest)
        doc = {"holder": saved.holder, "generation": saved.generation,
               "duration_ms": saved.duration_ms, "released": saved.released}
        try:
            replace_durably(path, (json.dumps(doc) + "\n").encode())
        except OSError as exc:
            raise WitnessStoreError(f"cannot write the witness record {path}: {exc}"
                                    ) from None
