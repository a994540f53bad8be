"""Watching protections on a host: the Prometheus text (checked with prometheus_client's
parser), the metrics file, `status --prometheus` and `--watch`, and the initial copy's
progress report."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeDomain, FakeGuest, RecordingEmitter
from tests.unit.test_protect_loop import PAGES, Devices, Sink, primary
from xen_remus.channel.ends import Config
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import BUCKETS_MS, EpochStats, StatusFile, read_all
from xen_remus.cli.progress import CopyReport
from xen_remus.cli.protect_run import watch_copy
from xen_remus.cli.status import Watch
from xen_remus.generation import GenerationStore
from xen_remus.metrics import MetricsFile, check_path, escape_label, render
from xen_remus.migrate_hook import main
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import Outcome
from xen_remus.save.engine import CopyProgress, SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import RemusLoop


def families(text: str) -> dict[str, Any]:
    """Parse with prometheus_client, after checking what its parser lets pass: each
    family's HELP then TYPE once, before its samples, and its samples together."""
    seen: list[str] = []
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen, f"{name} declared twice"
            seen.append(name)
            current = name
        elif line.startswith("# TYPE "):
            assert line.split()[2] == current, line
        else:
            sample = line.split("{")[0].split(" ")[0]
            assert current is not None and sample.startswith(current.removesuffix("_total")
                                                              ), (current, line)
    assert text.endswith("\n")
    return {f.name: f for f in text_string_to_metric_families(text)}


def one(fams: dict[str, Any], name: str, **labels: str) -> float:
    got = [s.value for f in fams.values() for s in f.samples
           if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (name, labels, got)
    return float(got[0])


def a_status(tmp_path: Path, domain: str = "guest1", metrics: Path | None = None,
             epochs: int = 5) -> StatusFile:
    sf = StatusFile(domain, "primary", peer="hostB", directory=tmp_path, metrics=metrics)
    sf.doc["generation"] = 7
    sf.state("protecting")
    for e in range(epochs):
        sf.epoch(EpochStats(e, pause_ms=[0.4, 3.0, 3.0, 150.0, 9000.0][e % 5],
                            dirty_pages=100 + e, raw_bytes=4096 * (100 + e),
                            wire_bytes=1000, send_ms=2.0,
                            ack_ms=None if e == 0 else 0.7))
    sf.flush()
    return sf


def test_render_parses_with_every_figure(tmp_path: Path) -> None:
    a_status(tmp_path)
    backup = StatusFile("guest1", "backup", directory=tmp_path)
    backup.doc.update(failovers=1, generation=8)
    backup.state("failover", "primary silent")
    fams = families(render(read_all(tmp_path)))
    p = {"domain": "guest1", "role": "primary"}
    b = {"domain": "guest1", "role": "backup"}
    assert fams["xen_remus_checkpoints"].type == "counter"
    assert one(fams, "xen_remus_checkpoints_total", **p) == 5
    assert one(fams, "xen_remus_last_epoch", **p) == 4
    assert one(fams, "xen_remus_up", **p) == 1  # this test's pid writes it
    assert one(fams, "xen_remus_state", state="protecting", **p) == 1
    assert one(fams, "xen_remus_state", state="unprotected", **p) == 0
    assert one(fams, "xen_remus_state", state="failover", **b) == 1
    assert one(fams, "xen_remus_failovers_total", **b) == 1
    assert one(fams, "xen_remus_failovers_total", **p) == 0
    assert one(fams, "xen_remus_generation", **p) == 7
    assert one(fams, "xen_remus_generation", **b) == 8
    assert one(fams, "xen_remus_last_pause_seconds", **p) == pytest.approx(9.0)
    assert one(fams, "xen_remus_last_ack_seconds", **p) == pytest.approx(0.0007)
    assert one(fams, "xen_remus_last_dirty_pages", **p) == 104
    assert one(fams, "xen_remus_dirty_pages_total", **p) == 510
    assert one(fams, "xen_remus_raw_bytes_total", **p) == 4096 * 510
    assert one(fams, "xen_remus_wire_bytes_total", **p) == 5000
    assert one(fams, "xen_remus_status_unreadable") == 0
    # the histogram: cumulative buckets, +Inf = count, sum in seconds
    assert fams["xen_remus_pause_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fams["xen_remus_pause_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["role"] == "primary"}
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 3 and buckets["0.2"] == 4
    assert buckets["5.0"] == 4 and buckets["+Inf"] == 5
    assert len(buckets) == len(BUCKETS_MS) + 1
    assert one(fams, "xen_remus_pause_seconds_count", **p) == 5
    assert one(fams, "xen_remus_pause_seconds_sum", **p) == pytest.approx(9.1564)
    assert one(fams, "xen_remus_ack_seconds_count", **p) == 4  # epoch 0 had no ACK time
    # the backup has no epoch yet: no made-up last epoch or pause
    assert not [s for f in fams.values() for s in f.samples
                if s.labels.get("role") == "backup" and s.name in (
                    "xen_remus_last_epoch", "xen_remus_last_pause_seconds")]


def test_a_guest_halted_by_the_supervisor_is_final_not_stale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """protect died; its supervisor paused the guest and marked the status: `status`
    and the metrics say halted (the writer is gone, as expected), not stale."""
    a_status(tmp_path, epochs=2)
    doc = json.loads((tmp_path / "guest1.json").read_text())
    doc.update(pid=2**22 + 12345, state="halted", detail="paused domain 3")  # no such pid
    (tmp_path / "guest1.json").write_text(json.dumps(doc))
    assert main(["status", "--dir", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert " halted " in row and "stale" not in row
    fams = families(render(read_all(tmp_path)))
    assert one(fams, "xen_remus_state", state="halted") == 1
    assert one(fams, "xen_remus_state", state="protecting") == 0
    assert one(fams, "xen_remus_up") == 0


def test_label_values_and_help_are_escaped(tmp_path: Path) -> None:
    name = 'we"ird\\dom\nain'
    a_status(tmp_path, domain="x", epochs=1)
    (tmp_path / "junk.json").write_text("{")
    docs = read_all(tmp_path)
    for d in docs:
        if d.get("domain") == "x":
            d["domain"] = name
    text = render(docs)
    assert 'domain="we\\"ird\\\\dom\\nain"' in text
    assert escape_label('a\\"\n') == 'a\\\\\\"\\n'
    fams = families(text)
    assert one(fams, "xen_remus_checkpoints_total", domain=name) == 1
    assert one(fams, "xen_remus_status_unreadable") == 1


def test_metrics_file_is_atomic_rate_limited_and_never_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    mf = MetricsFile(tmp_path / "g.prom", clock=lambda: now[0])
    doc = a_status(tmp_path / "run", epochs=2).doc
    mf.update(doc, alive=True)
    mf.update(doc, alive=True)  # the same second: skipped
    now[0] += 0.5
    mf.update(doc, alive=True)
    assert mf.writes == 1
    mf.update(doc, alive=False, force=True)  # a change of state: at once
    now[0] += 1.0
    mf.update(doc, alive=False)
    assert mf.writes == 3
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["g.prom"]  # no temp left
    assert os.stat(tmp_path / "g.prom").st_mode & 0o777 == 0o644
    fams = families((tmp_path / "g.prom").read_text())
    assert one(fams, "xen_remus_up") == 0
    # a metrics file that cannot be written is logged once, protection goes on
    (tmp_path / "afile").write_text("")
    mf.path = tmp_path / "afile" / "g.prom"
    for _ in range(2):
        now[0] += 2
        mf.update(doc, alive=True)
    assert mf.failed and caplog.text.count("cannot write the metrics file") == 1


def test_unwritable_metrics_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no directory"):
        check_path(tmp_path / "nosuch" / "g.prom")
    with pytest.raises(Exception, match="a directory"):
        check_path(tmp_path)
    assert main(["protect", "-d", "-F", "--metrics-file", str(tmp_path / "no" / "x.prom"),
                 "g1", "hostb"]) == 2
    assert main(["migrate-receive", "--metrics-file", str(tmp_path / "x.prom")]) == 2


def test_status_file_keeps_metrics_file_current(tmp_path: Path) -> None:
    prom = tmp_path / "m" / "guest1.prom"
    prom.parent.mkdir()
    sf = a_status(tmp_path, metrics=prom, epochs=3)
    assert sf.metrics is not None
    # written when protecting began; the epochs in the same second are not
    assert one(families(prom.read_text()), "xen_remus_checkpoints_total") == 0
    sf.metrics.clock = lambda: time.monotonic() + 1.5  # a second and a half later
    sf.epoch(EpochStats(3, 1.0, 10, 100, 100, 1.0, 0.5), now=time.monotonic() + 1.5)
    assert one(families(prom.read_text()), "xen_remus_checkpoints_total") == 4
    sf.state("unprotected", "the backup is silent")  # a new state: written at once
    fams = families(prom.read_text())
    assert one(fams, "xen_remus_checkpoints_total") == 4
    assert one(fams, "xen_remus_state", state="unprotected") == 1
    assert one(fams, "xen_remus_up") == 0


def test_status_prometheus_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_status(tmp_path)
    assert main(["status", "--dir", str(tmp_path), "--prometheus"]) == 0
    fams = families(capsys.readouterr().out)
    assert one(fams, "xen_remus_checkpoints_total", domain="guest1") == 5
    out = tmp_path / "out" / "all.prom"
    out.parent.mkdir()
    assert main(["status", "--dir", str(tmp_path), "--prometheus", "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert one(families(out.read_text()), "xen_remus_last_epoch") == 4
    assert main(["status", "--output", str(out)]) == 2
    assert "--output goes with --prometheus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not both
        main(["status", "--json", "--prometheus"])


def test_backup_status_counts_failover_and_generation(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The real receiver fails over (the primary's stream closes): its status and its
    metrics file say failover, once, and the backup's new generation."""
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path / "run"))
    prom = tmp_path / "backup.prom"
    dom, sink, result = FakeDomain(PAGES), Sink(), list[Outcome]()
    a, b = socket.socketpair()
    up = Upstream(b.fileno(), b.fileno(), idle_timeout=20.0, io_timeout=20.0)
    chan = ReceiverChannel(Config(mac=True), time.monotonic())
    th = threading.Thread(target=lambda: result.append(receive(
        up, cast(Any, sink), True, chan=chan, generations=GenerationStore(tmp_path / "g"),
        metrics_file=prom)), daemon=True)
    th.start()
    engine, out, link = primary(a, dom, Config(mac=True, generation=3), 5.0)

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 2:
            loop.stop()
        dom.write(st.epoch % PAGES, st.epoch + 1)

    loop = RemusLoop(engine, out, link, Devices(dom, sink), 0.005, on_epoch=on_epoch)
    loop.run()
    a.close()
    th.join(20)
    assert result and result[0].kind == "failover"
    doc = json.loads((tmp_path / "run" / "g.backup.json").read_text())
    assert (doc["state"], doc["failovers"], doc["generation"]) == ("failover", 1, 4)
    fams = families(prom.read_text())
    assert one(fams, "xen_remus_failovers_total", role="backup") == 1
    assert one(fams, "xen_remus_generation", role="backup") == 4
    assert one(fams, "xen_remus_last_epoch", role="backup") == 2
    assert one(fams, "xen_remus_up", role="backup") == 0
    a.close()
    b.close()


# -- status --watch ------------------------------------------------------------------------

class Ticks:
    """A clock and a sleep for Watch: each sleep moves time on; a KeyboardInterrupt
    after ``stop_after`` sleeps (Ctrl-C)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.now, self.sleeps, self.stop_after = 1000.0, 0, stop_after

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps += 1
        if self.stop_after is not None and self.sleeps > self.stop_after:
            raise KeyboardInterrupt
        self.now += s


def test_watch_on_a_terminal_redraws_in_place(tmp_path: Path) -> None:
    sf = a_status(tmp_path, epochs=2)
    buf, t = io.StringIO(), Ticks()

    def sleep(s: float) -> None:
        t.sleep(s)
        for e in range(2, 7):  # 5 more checkpoints in the 2 s
            sf.epoch(EpochStats(e, 1.0, 10, 100, 100, 1.0, 0.5))
        sf.flush()

    w = Watch(tmp_path, None, 2.0, 2, out=buf, tty=True, clock=t.clock, sleep=sleep)
    assert w.run() == 0
    frames = buf.getvalue().split("\x1b[H")[1:]
    assert len(frames) == 2 and all(f.endswith("\x1b[J") for f in frames)
    lines = frames[1].removesuffix("\x1b[J").split("\n")[:-1]
    assert all(ln.endswith("\x1b[K") for ln in lines)
    assert "every 2 s" in lines[0] and lines[2].startswith("DOMAIN")
    cols = lines[2].split()
    row = dict(zip(cols, lines[3].removesuffix("\x1b[K").split(), strict=False))
    assert row["EPOCH"] == "6" and row["CKPT/S"] == "2.5"  # 5 checkpoints in 2 s
    assert "CKPT/S" in frames[0] and frames[0].split("\n")[3].split()[9] == "-"


def test_watch_plain_lines_count_and_ctrl_c(tmp_path: Path) -> None:
    a_status(tmp_path, epochs=2)
    StatusFile("guest2", "backup", directory=tmp_path).state("receiving")
    buf, t = io.StringIO(), Ticks(stop_after=2)
    w = Watch(tmp_path, None, 0.5, None, out=buf, tty=False, clock=t.clock, sleep=t.sleep)
    assert w.run() == 0  # Ctrl-C on the third sleep: quiet, status 0
    text = buf.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3 * 3  # header + 2 guests, 3 refreshes
    assert all(ln[:4].isdigit() and ln[10] == " " for ln in lines)
    assert [ln.split()[2] for ln in lines[:3]] == ["DOMAIN", "guest1", "guest2"]
    buf2 = io.StringIO()
    Watch(tmp_path, "guest2", 0.5, 1, out=buf2, tty=False, clock=t.clock,
          sleep=t.sleep).run()
    assert len(buf2.getvalue().splitlines()) == 2


def test_watch_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "-n", "2"]) == 2
    assert "-n and --count go with --watch" in capsys.readouterr().err
    assert main(["status", "--watch", "-n", "0.01"]) == 2
    assert main(["status", "--watch", "--count", "0"]) == 2
    assert main(["status", "--dir", str(tmp_path), "--watch", "-n", "0.1", "--count",
                 "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("no protected domains" in ln for ln in out)


# -- the initial copy's progress -----------------------------------------------------------

def test_engine_reports_each_batch_and_round() -> None:
    dom = FakeDomain(3000)
    eng = SaveEngine(dom, FakeGuest(dom), RecordingEmitter(), PrecopyPolicy(3, 10))
    seen: list[CopyProgress] = []
    eng.progress = seen.append
    stats = eng.run()
    ends = [p for p in seen if p.round_done]
    assert [p.round for p in ends] == list(range(len(stats.rounds)))
    assert [p.live for p in ends] == [r.live for r in stats.rounds]
    assert ends[-1].pages_sent == stats.pages and not ends[-1].live
    first = [p for p in seen if p.round == 0 and not p.round_done]
    assert [p.pfns_done for p in first] == [1024, 2048, 3000]
    assert all(p.pfns_todo == 3000 and p.nr_pfns == 3000 for p in first)
    assert all(b.pages_sent >= a.pages_sent for a, b in zip(seen, seen[1:], strict=False))


def progress(rnd: int, done: int, todo: int, sent: int, live: bool = True,
             end: bool = False) -> CopyProgress:
    return CopyProgress(rnd, live, done, todo, sent, 262144, end)


def test_copy_report_on_a_terminal() -> None:
    buf, now = io.StringIO(), [0.0]
    r = CopyReport(buf, tty=True, clock=lambda: now[0])
    for i in range(1, 257):  # 256 batches in 2.56 s: at most 4 redraws a second
        now[0] = i * 0.01
        r.update(progress(0, i * 1024, 262144, i * 1024))
    r.update(progress(0, 262144, 262144, 262144, end=True))  # a round's end: drawn
    r.update(progress(1, 800, 800, 263000, live=False, end=True))
    assert r.done
    r.update(progress(2, 5, 5, 263005, live=False, end=True))  # a checkpoint: not shown
    out = buf.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    draws = out.split("\r")[1:]
    assert 10 <= len(draws) <= 13 and all("\x1b[K" in d for d in draws)
    assert "round 1 (all pages): 262144/262144 pages (100%), 1024 MiB sent" in draws[-2]
    assert draws[-1].startswith("initial copy: 263000 pages (1027 MiB) in 2 round(s), 2.6 s,")
    assert "the last 800 pages with the guest paused" in draws[-1]
    mbps = float(draws[-2].split(", ")[-1].split()[0])
    assert mbps == pytest.approx(262144 * 4096 / 1e6 / 2.56, rel=0.01)


def test_copy_report_in_a_log_and_interrupted() -> None:
    buf, now = io.StringIO(), [0.0]
    r = CopyReport(buf, tty=False, clock=lambda: now[0])
    for i in range(1, 1001):  # 10 s of batches
        now[0] = i * 0.01
        r.update(progress(i // 200, i, 1000, i, end=i % 200 == 0))
    lines = buf.getvalue().splitlines()
    assert 5 <= len(lines) <= 6  # every 2 s, round ends included
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
    r.close()
    assert len(buf.getvalue().splitlines()) == len(lines)  # nothing to end in a log
    tty = io.StringIO()
    t = CopyReport(tty, tty=True, clock=lambda: 1.0)
    t.update(progress(0, 10, 100, 10))
    t.close()  # Ctrl-C mid-copy: the line is ended for the next message
    assert tty.getvalue().endswith("\x1b[K\n")


def test_protect_stops_reporting_after_the_initial_copy() -> None:
    dom = FakeDomain(2000)
    eng = SaveEngine(dom, FakeGuest(dom), RecordingEmitter(), PrecopyPolicy(2, 4))
    buf = io.StringIO()
    report = watch_copy(eng, buf)
    pending = eng.precopy()
    assert eng.progress is not None and not report.done
    eng.suspend()
    eng.send_final(pending)  # epoch 0's last pages: the copy is over
    assert report.done and eng.progress is None
    eng.resume()
    eng.send_pages(np.arange(10, dtype=np.uint64), live=False)  # epoch 1
    assert buf.getvalue().count("initial copy: ") >= 1
    assert "with the guest paused" in buf.getvalue().splitlines()[-1]
    assert not math.isnan(report.interval)
