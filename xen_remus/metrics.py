"""The status documents (channel/stats.py) in Prometheus' text exposition format (0.0.4):
`xen-remus status --prometheus`, and the file `--metrics-file PATH` keeps for
node_exporter's textfile collector.

Every series has the labels domain and role ("primary" or "backup"); times are in
seconds, as Prometheus names them. A figure not known yet (no epoch, no ACK) has no
sample rather than a made-up value. No I/O here but MetricsFile's atomic write.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xen_remus.channel.stats import HANDED_OVER

log = logging.getLogger(__name__)
PREFIX = "xen_remus_"
METRICS_INTERVAL_S = 1.0  # the metrics file is rewritten at most this often
# The states each role goes through (channel/stats.py writers), one series each.
STATES = {"primary": ("starting", "protecting", "unprotected", "stopped", "failed",
                      "halted", HANDED_OVER),
          "backup": ("receiving", "complete", "failover", "held", "aborted")}


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


@dataclass
class Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    name: str  # as the samples are named (a counter's with _total)
    kind: str  # gauge, counter, histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: dict[str, str], value: float, suffix: str = "") -> None:
        self.samples.append((self.name + suffix, labels, value))

    def text(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}",
                 f"# TYPE {self.name} {self.kind}"]
        lines += [f"{n}{_labels(lb)} {number(v)}" for n, lb, v in self.samples]
        return "\n".join(lines) + "\n"


def _families() -> dict[str, Family]:
    fams = [
        Family("up", "gauge", "1 while the protect or migrate-receive that writes this "
               "domain's status runs"),
        Family("state", "gauge", "1 for the state the protection of this domain is in "
               "(label state), 0 for the others of its role"),
        Family("last_epoch", "gauge", "the last epoch committed by the backup"),
        Family("checkpoints_total", "counter", "checkpoints committed by the backup, the "
               "initial copy included"),
        Family("last_pause_seconds", "gauge", "how long the guest was paused for the last "
               "checkpoint"),
        Family("pause_seconds", "histogram", "how long the guest was paused for each "
               "checkpoint"),
        Family("last_dirty_pages", "gauge", "pages copied in the last checkpoint"),
        Family("dirty_pages_total", "counter", "pages copied in all checkpoints"),
        Family("raw_bytes_total", "counter", "bytes of the checkpoints as the standard "
               "migration stream"),
        Family("wire_bytes_total", "counter", "bytes of the checkpoints sent to the backup "
               "(after compression)"),
        Family("last_ack_seconds", "gauge", "from the end of the last checkpoint's send to "
               "the backup's acknowledgement"),
        Family("ack_seconds", "histogram", "from the end of each checkpoint's send to the "
               "backup's acknowledgement"),
        Family("failovers_total", "counter", "times the backup resumed its copy of the "
               "domain (this run of migrate-receive)"),
        Family("generation", "gauge", "the generation number of this protection (of the "
               "backup's own copy after a failover)"),
        Family("last_update_timestamp_seconds", "gauge", "when the status was last written "
               "(Unix time)"),
    ]
    for f in fams:
        f.name = PREFIX + f.name
    return {f.name.removeprefix(PREFIX): f for f in fams}


def _histogram(f: Family, labels: dict[str, str], hist: dict[str, Any]) -> None:
    bounds, counts = hist["bounds_ms"], hist["counts"]
    total = 0
    for bound, n in zip([*bounds, math.inf], counts, strict=True):
        total += n
        le = "+Inf" if math.isinf(bound) else repr(bound / 1000)
        f.add({**labels, "le": le}, total, "_bucket")
    f.add(labels, hist["sum_ms"] / 1000, "_sum")
    f.add(labels, total, "_count")


def render(docs: Iterable[dict[str, Any]]) -> str:
    """The exposition text of the status documents (read_all's, with ``alive``);
    unreadable ones are counted in xen_remus_status_unreadable."""
    fams = _families()
    unreadable = 0
    for doc in docs:
        if "error" in doc:
            unreadable += 1
            continue
        role = str(doc.get("role"))
        lb = {"domain": str(doc.get("domain")), "role": role}
        last = doc.get("last") or {}
        tot = doc.get("totals") or {}
        fams["up"].add(lb, 1 if doc.get("alive") else 0)
        state = str(doc.get("state"))
        for s in dict.fromkeys((*STATES.get(role, ()), state)):
            fams["state"].add({**lb, "state": s}, 1 if s == state else 0)
        # The backup knows its commits before the primary's figures of them arrive.
        epoch = doc.get("committed", doc.get("epoch"))
        if epoch is not None:
            fams["last_epoch"].add(lb, int(epoch))
        fams["checkpoints_total"].add(lb, int(tot.get("epochs", 0)))
        if last:
            fams["last_pause_seconds"].add(lb, float(last["pause_ms"]) / 1000)
            fams["last_dirty_pages"].add(lb, int(last["dirty_pages"]))
            if last.get("ack_ms") is not None:
                fams["last_ack_seconds"].add(lb, float(last["ack_ms"]) / 1000)
        for key in ("pause", "ack"):
            if doc.get(f"{key}_hist"):
                _histogram(fams[f"{key}_seconds"], lb, doc[f"{key}_hist"])
        fams["dirty_pages_total"].add(lb, int(tot.get("dirty_pages", 0)))
        fams["raw_bytes_total"].add(lb, int(tot.get("raw_bytes", 0)))
        fams["wire_bytes_total"].add(lb, int(tot.get("wire_bytes", 0)))
        fams["failovers_total"].add(lb, int(doc.get("failovers") or 0))
        if doc.get("generation") is not None:
            fams["generation"].add(lb, int(doc["generation"]))
        fams["last_update_timestamp_seconds"].add(lb, float(doc.get("updated") or 0))
    out = "".join(f.text() for f in fams.values() if f.samples)
    bad = Family(PREFIX + "status_unreadable", "gauge", "status files in the run "
                 "directory that could not be read")
    bad.add({}, unreadable)
    return out + bad.text()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in its directory and a rename, so
    a reader (node_exporter) sees the old file or the new one, never half of one. The
    temp file's name does not end in .prom: the textfile collector skips it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # node_exporter does not run as root
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsFile:
    """One domain's metrics file, rewritten at most every ``min_interval`` s (a forced
    update, for a change of state, at once)."""

    def __init__(self, path: Path, min_interval: float = METRICS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.min_interval, self.clock = path, min_interval, clock
        self.writes = 0
        self.failed = False
        self._written = -math.inf

    def update(self, doc: dict[str, Any], alive: bool, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._written < self.min_interval:
            return
        self._written = now
        try:
            write_atomic(self.path, render([{**doc, "alive": alive}]))
        except OSError as exc:  # monitoring must never end a protection
            if not self.failed:
                log.warning("cannot write the metrics file %s: %s (going on without)",
                            self.path, exc.strerror or exc)
            self.failed = True
            return
        self.failed = False
        self.writes += 1


def check_path(path: Path, option: str = "--metrics-file") -> None:
    """Refuse at start a metrics file that could never be written (UsageError)."""
    from xen_remus.errors import UsageError

    if path.is_dir():
        raise UsageError(f"{option} {path}: a directory; give a file name (for node_exporter's "
                         "textfile collector: DIR/NAME.prom)")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {parent} is not writable")
