"""Per-epoch figures, their record (REMUS_EPOCH_STATS) and the status file.

The primary measures an epoch; it knows its ACK latency only once the ACK is in, so the
figures of epoch N travel in-band early in epoch N+1 (or at exit), and the backup's status
shows the same numbers as the primary's.

Status file: <domain>.json in the run directory (xen_remus.paths), rewritten atomically
(temp file + rename) at most every ``min_interval`` seconds and at every change of
state. Fields:
  format 1; domain; role "primary"|"backup"; pid; peer; state (e.g. "pre-copy",
  "protected", "unprotected", "handed-over", "failed-over", "exited"); detail; started /
  updated (Unix time); extensions (the agreed tokens, or null with a stock peer); epoch (last
  committed/acknowledged); last (the last epoch's figures); totals {epochs, dirty_pages,
  raw_bytes, wire_bytes, pause_ms, send_ms}; recent (up to 20 last epochs' figures);
  pause_hist / ack_hist (every epoch's pause and ACK time counted in buckets: bounds_ms,
  counts with one more slot for larger ones, sum_ms); generation (of the protection,
  null until known); failovers (the backup: 1 once it resumed its copy).
A ``metrics`` path also keeps a Prometheus text file (xen_remus/metrics.py) of the same
figures, at most once a second and at every change of state.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xen_remus.channel.errors import ChannelError
from xen_remus.paths import run_dir

if TYPE_CHECKING:  # `xen-remus status` imports this: the stream package pulls in numpy
    from xen_remus.metrics import MetricsFile
    from xen_remus.stream.events import Buffer

FORMAT = 1
RECENT = 20
# The states after which the writer is gone (its own last word); any other state with
# its writer gone is stale.
HANDED_OVER = "handed-over"  # the primary's guest went to the backup at an epoch boundary
FINAL_STATES = frozenset({"stopped", "failed", "halted", "unprotected", "complete",
                          "failover", "aborted", "held", HANDED_OVER})
# Histogram buckets (ms) of the pause and of the ACK time: a checkpoint pause is a few ms
# on a quiet guest, hundreds on a busy one; an ACK over a LAN is below a ms.
BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
_STATS = struct.Struct("<QIIQQII")
_UNKNOWN = 0xFFFFFFFF


@dataclass
class EpochStats:
    """One epoch, as the primary saw it. Times in ms; ``ack_ms`` None when unknown (no
    ACK negotiated, or not yet in)."""

    epoch: int
    pause_ms: float = 0.0  # suspend -> resume
    dirty_pages: int = 0
    raw_bytes: int = 0  # the standard stream's bytes for this epoch
    wire_bytes: int = 0  # what went on the wire (after compression)
    send_ms: float = 0.0
    ack_ms: float | None = None  # end of send -> ACK in

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0

    def pack(self) -> bytes:
        def us(ms: float | None) -> int:
            return _UNKNOWN if ms is None else min(int(round(ms * 1000)), _UNKNOWN - 1)

        return _STATS.pack(self.epoch, us(self.pause_ms), min(self.dirty_pages, _UNKNOWN),
                           self.raw_bytes, self.wire_bytes, us(self.send_ms), us(self.ack_ms))

    @classmethod
    def unpack(cls, body: Buffer, where: str) -> EpochStats:
        if len(body) != _STATS.size:
            raise ChannelError(f"{where}: REMUS_EPOCH_STATS body of {len(body)} bytes, "
                               f"expected {_STATS.size}")
        epoch, pause, dirty, raw, wire, send, ack = _STATS.unpack_from(body)
        return cls(epoch, pause / 1000, dirty, raw, wire, send / 1000,
                   None if ack == _UNKNOWN else ack / 1000)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 3)
        return d


def new_histogram() -> dict[str, Any]:
    return {"bounds_ms": list(BUCKETS_MS), "counts": [0] * (len(BUCKETS_MS) + 1),
            "sum_ms": 0.0}


def observe(hist: dict[str, Any], ms: float) -> None:
    """Count ``ms`` in the first bucket whose bound is >= it (the last slot: above all)."""
    bounds = hist["bounds_ms"]
    i = next((i for i, b in enumerate(bounds) if ms <= b), len(bounds))
    hist["counts"][i] += 1
    hist["sum_ms"] = round(hist["sum_ms"] + ms, 3)


class StatusFile:
    """Keeps one domain's status file current; one writer per domain and role. Epochs
    are written at most every ``min_interval``; ``flush()`` writes what is pending (call
    it when idle), ``state()`` always writes (call it at the end, e.g. "exited")."""

    def __init__(self, domain: str, role: str, peer: str = "", directory: Path | None = None,
                 min_interval: float = 0.2, metrics: Path | None = None) -> None:
        self.path = (directory or run_dir()) / f"{domain}.json"
        if role == "backup":  # both ends may run on one host (tests, localhost Remus)
            self.path = self.path.with_name(f"{domain}.backup.json")
        self.min_interval = min_interval
        self.doc: dict[str, Any] = {
            "format": FORMAT, "domain": domain, "role": role, "pid": os.getpid(),
            "peer": peer, "state": "starting", "detail": "", "started": time.time(),
            "updated": 0.0, "extensions": None, "epoch": None, "last": None,
            "totals": {"epochs": 0, "dirty_pages": 0, "raw_bytes": 0, "wire_bytes": 0,
                       "pause_ms": 0.0, "send_ms": 0.0},
            "pause_hist": new_histogram(), "ack_hist": new_histogram(),
            "generation": None, "failovers": 0, "recent": []}
        self.metrics: MetricsFile | None = None
        if metrics is not None:
            from xen_remus.metrics import MetricsFile  # only with --metrics-file

            self.metrics = MetricsFile(metrics)
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._written = -1e9
        self._dirty = False
        self._last_state: tuple[str, str] | None = None

    def state(self, state: str, detail: str = "", **extra: Any) -> None:
        self.doc.update(state=state, detail=detail, **extra)
        self.write(force=True)

    def epoch(self, st: EpochStats, now: float | None = None) -> None:
        d = st.to_dict()
        self.doc["epoch"], self.doc["last"] = st.epoch, d
        tot = self.doc["totals"]
        tot["epochs"] += 1
        tot["dirty_pages"] += st.dirty_pages
        tot["raw_bytes"] += st.raw_bytes
        tot["wire_bytes"] += st.wire_bytes
        tot["pause_ms"] = round(tot["pause_ms"] + st.pause_ms, 3)
        tot["send_ms"] = round(tot["send_ms"] + st.send_ms, 3)
        observe(self.doc["pause_hist"], st.pause_ms)
        if st.ack_ms is not None:
            observe(self.doc["ack_hist"], st.ack_ms)
        self._recent.append(d)
        self._dirty = True
        self.write(now=now)

    def flush(self) -> None:
        if self._dirty:
            self.write(force=True)

    def write(self, force: bool = False, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        if not force and t - self._written < self.min_interval:
            return
        self._written, self._dirty = t, False
        self.doc["updated"] = time.time()
        self.doc["recent"] = list(self._recent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.doc, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.metrics is not None:
            self.metrics.update(self.doc, alive=self.doc["state"] not in FINAL_STATES,
                                force=force and self._state_changed())

    def _state_changed(self) -> bool:
        """A forced write for a new state (not a flush of epochs) also rewrites the
        metrics file at once."""
        key = (self.doc["state"], self.doc["detail"])
        changed, self._last_state = key != self._last_state, key
        return changed

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_all(directory: Path | None = None) -> list[dict[str, Any]]:
    """Every status file in the directory, with ``alive`` (its writer still runs) and
    ``path``; unreadable files come back as {"path", "error"}."""
    d = directory or run_dir()
    out: list[dict[str, Any]] = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            doc = json.loads(p.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not a format {FORMAT} status document")
        except (OSError, ValueError) as exc:
            out.append({"path": str(p), "error": str(exc)})
            continue
        doc["path"] = str(p)
        doc["alive"] = _alive(doc.get("pid"))
        out.append(doc)
    return out


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
