"""Per-epoch figures: their record, the status file, `xen-remus status`; the timers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from xen_remus.channel.errors import ChannelError
from xen_remus.channel.heartbeat import FailureDetector, HeartbeatTimer
from xen_remus.channel.stats import EpochStats, StatusFile, read_all
from xen_remus.migrate_hook import main


def test_stats_record_round_trip() -> None:
    st = EpochStats(41, pause_ms=2.345, dirty_pages=512, raw_bytes=2_105_000,
                    wire_bytes=61_000, send_ms=9.5, ack_ms=None)
    back = EpochStats.unpack(st.pack(), "test")
    assert back == st
    st.ack_ms = 1.25
    assert EpochStats.unpack(st.pack(), "test").ack_ms == 1.25
    assert round(st.ratio, 1) == 34.5
    with pytest.raises(ChannelError, match="at offset 9: REMUS_EPOCH_STATS body of 3 bytes"):
        EpochStats.unpack(b"abc", "at offset 9")


def test_status_file_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sf = StatusFile("guest1", "primary", peer="hostB", directory=tmp_path, min_interval=10)
    sf.state("protected", extensions="version=1 ack")
    base = time.monotonic()
    for e in range(30):
        sf.epoch(EpochStats(e, 1.5, 100 + e, 500_000, 50_000, 3.0, 0.8), now=base + e + 0.5)
    doc = json.loads((tmp_path / "guest1.json").read_text())
    assert doc["epoch"] == 20  # written at most every 10 s (min_interval): epochs 10, 20
    sf.flush()
    doc = json.loads((tmp_path / "guest1.json").read_text())
    assert doc["state"] == "protected" and doc["epoch"] == 29 and doc["pid"] == os.getpid()
    assert doc["totals"]["epochs"] == 30 and doc["totals"]["dirty_pages"] == 30 * 100 + 435
    assert len(doc["recent"]) == 20 and doc["recent"][-1]["epoch"] == 29
    assert doc["last"]["ratio"] == 10.0
    backup = StatusFile("guest1", "backup", directory=tmp_path)
    backup.state("receiving")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest1.backup.json", "guest1.json"]

    assert main(["status", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["DOMAIN", "ROLE", "STATE", "EPOCH"]
    assert lines[1].split()[:4] == ["guest1", "backup", "receiving", "-"]
    assert lines[2].split()[:9] == ["guest1", "primary", "protected", "29", "1.50", "129",
                                    "10.0", "3.00", "0.80"]
    assert "guest1 (primary): 30 epochs" in out and "(x10.00)" in out

    assert main(["status", "--dir", str(tmp_path), "--json", "guest1"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert {d["role"] for d in docs} == {"primary", "backup"} and all(d["alive"] for d in docs)
    assert main(["status", "--dir", str(tmp_path), "nosuch"]) == 1
    assert "no status for domain 'nosuch'" in capsys.readouterr().err


def test_stale_and_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    sf = StatusFile("g2", "primary", directory=tmp_path)
    sf.doc["pid"] = dead.pid  # a writer that is gone
    sf.state("protected")
    (tmp_path / "junk.json").write_text("{not json")
    docs = read_all(tmp_path)
    assert [("error" in d, d.get("alive")) for d in docs] == [(False, False), (True, None)]
    assert main(["status", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"protected (stale: pid {dead.pid} gone)" in out and "unreadable" in out


def test_failure_detector_and_timer() -> None:
    d = FailureDetector(1.0, now=10.0)
    assert not d.dead(11.0) and d.dead(11.001) and d.deadline == 11.0
    d.seen(10.9)
    d.seen(10.5)  # late reports never move it back
    assert d.deadline == pytest.approx(11.9) and d.silence(11.4) == pytest.approx(0.5)
    assert not d.dead(11.85) and d.dead(11.95)
    h = HeartbeatTimer(0.25, now=0.0)
    assert not h.due(0.2) and h.due(0.25)
    h.sent(0.2)  # other bytes went out: no heartbeat needed yet
    assert not h.due(0.4) and h.next_due == pytest.approx(0.45)
    assert h.next_seq(0.5) == 1 and h.next_seq(0.8) == 2 and not h.due(0.9)
    with pytest.raises(ValueError):
        FailureDetector(0, 0)
