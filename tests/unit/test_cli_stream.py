"""`xen-remus stream verify|dump|stats`."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from tests.unit.test_stream_support import decode, small_stream
from xen_remus.migrate_hook import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["stream", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def stream_file(tmp_path: Path) -> Path:
    p = tmp_path / "s.xl"
    p.write_bytes(small_stream("xl", epochs=3))
    return p


def test_verify_valid(capsys: pytest.CaptureFixture[str], stream_file: Path) -> None:
    rc, out, err = _run(capsys, "verify", str(stream_file))
    assert rc == 0 and err == ""
    assert out.startswith("valid checkpointed xl stream (x86 HVM)")
    assert f"{stream_file.stat().st_size} bytes" in out and "2 checkpoints" in out
    assert len(out.splitlines()) == 1


def test_verify_invalid_names_record_field_offset(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    data = bytearray(small_stream("libxc", epochs=1))
    pd = next(e.offset for e in decode(bytes(data)) if getattr(e, "name", "") == "PAGE_DATA")
    data[pd + 12] = 1  # PAGE_DATA reserved
    p = tmp_path / "bad"
    p.write_bytes(data)
    rc, out, err = _run(capsys, "verify", str(p))
    assert rc == 1 and out == ""
    assert err.strip() == (f"xen-remus stream: PAGE_DATA.reserved: not zero (0x00000001) "
                           f"at offset {pd + 12} (epoch 0)")
    rc, _out, err = _run(capsys, "verify", "--plain", str(Path(__file__).parent / "x"))
    assert rc == 2 and "No such file" in err


def test_verify_modes_and_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "cut"
    p.write_bytes(small_stream("libxl", epochs=2, end=False))
    assert _run(capsys, "verify", str(p))[0] == 1
    rc, out, _ = _run(capsys, "verify", "--checkpointed", str(p))
    assert rc == 0 and "EOF after a complete epoch" in out
    assert _run(capsys, "verify", "--plain", str(p))[0] == 1
    assert _run(capsys, "verify", "-f", "libxc", str(p))[0] == 1
    assert _run(capsys, "verify", "-f", "libxl", str(p), "--checkpointed")[0] == 0
    with pytest.raises(SystemExit) as ei:
        main(["stream", "verify", "-f", "bogus", str(p)])
    assert ei.value.code == 2
    capsys.readouterr()


def test_verify_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                      ) -> None:
    data = small_stream("libxc", pv=True, epochs=1)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    rc, out, _ = _run(capsys, "verify", "-")
    assert rc == 0 and "valid plain libxc stream (x86 PV)" in out


def test_dump(capsys: pytest.CaptureFixture[str], stream_file: Path) -> None:
    events = decode(stream_file.read_bytes())
    rc, out, _ = _run(capsys, "dump", str(stream_file))
    lines = out.splitlines()
    assert rc == 0 and len(lines) == len(events)
    page = next(ln for ln in lines if " PAGE_DATA " in ln)
    assert "count=3 first_pfn=1 last_pfn=9 types=NOTAB:2,XTAB:1" in page
    rc, out, _ = _run(capsys, "dump", "--json", str(stream_file))
    objs = [json.loads(ln) for ln in out.splitlines()]
    assert [o["offset"] for o in objs] == [e.offset for e in events]
    hdr = objs[0]
    assert hdr["record"] == "XlHeader" and hdr["mandatory_flags"] == 3
    pd = [o for o in objs if o["record"] == "PAGE_DATA"]
    assert pd[0]["types"] == {"NOTAB": 2, "XTAB": 1} and pd[1]["epoch"] == 1
    assert objs[-1]["record"] == "-- end of stream"


def test_dump_pv_vcpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "pv"
    p.write_bytes(small_stream("libxc", pv=True, epochs=1))
    rc, out, _ = _run(capsys, "dump", "--json", str(p))
    vcpus = [json.loads(ln) for ln in out.splitlines() if "VCPU" in ln]
    assert rc == 0 and len(vcpus) == 4 and all(v["vcpu_id"] == 0 for v in vcpus)


def test_stats(capsys: pytest.CaptureFixture[str], stream_file: Path) -> None:
    rc, out, _ = _run(capsys, "stats", "--json", str(stream_file))
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert rc == 0 and [r["epoch"] for r in rows] == ["0", "1", "2", "total"]
    assert [r["pages"] for r in rows] == [3, 1, 1, 5]
    assert rows[-1]["bytes"] == stream_file.stat().st_size
    assert rows[-1]["records"] == sum(r["records"] for r in rows[:-1])
    rc, out, _ = _run(capsys, "stats", str(stream_file))
    assert rc == 0 and out.splitlines()[-1].split()[:3] == ["total", str(rows[-1]["records"]),
                                                           "5"]
