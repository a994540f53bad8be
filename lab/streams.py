"""Checks of migration streams in a lab dom0 with `xen-remus stream` (Debian's python3 and
numpy there): shared by the stock baselines and the stream tests."""

from __future__ import annotations

import json
from typing import Any

from lab.host import Host

STREAM = "python3 -m xen_remus stream"


def dump(host: Host, path: str, extra: str = "") -> list[dict[str, Any]]:
    r = host.run(f"{STREAM} dump --json {extra} {path}", timeout=600)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def pages(objs: list[dict[str, Any]]) -> int:
    return sum(o.get("count", 0) for o in objs if o["record"] == "PAGE_DATA")


def check_xl_save_file(host: Host, path: str, kind: str, memory_mib: int) -> None:
    """A file `xl save` wrote verifies clean and dumps as stock Xen 4.17 lays it out
    (test_save and test_stock_baselines save one)."""
    r = host.run(f"{STREAM} verify --plain {path}", timeout=600)
    print(f"xl save ({kind}): {r.stdout.strip()} [{r.seconds:.1f} s]{r.stderr}")
    assert r.rc == 0, r.stderr
    want = "x86 PV" if kind == "pv" else "x86 HVM"
    assert r.stdout.startswith(f"valid plain xl stream ({want})"), r.stdout
    objs = dump(host, path)
    names = [o["record"] for o in objs]
    xl = objs[0]
    assert xl["record"] == "XlHeader" and xl["mandatory_flags"] == 3 and xl["config_len"]
    assert names[1:5] == ["LibxlHeader", "LIBXC_CONTEXT", "ImageHeader", "DomainHeader"]
    assert objs[3]["version"] == 3 and objs[4]["xen_major"] == 4 and objs[4]["xen_minor"] == 17
    if kind == "hvm":  # libxc END, QEMU's state (physmap keys if any), libxl END
        tail = [n for n in names[-5:] if n != "EMULATOR_XENSTORE_DATA"]
        assert tail[-4:] == ["END", "EMULATOR_CONTEXT", "END", "-- end of stream"], names[-6:]
    else:
        assert names[-3:] == ["END", "END", "-- end of stream"]
    assert "STATIC_DATA_END" in names and "X86_TSC_INFO" in names
    # Every page of the guest's memory is sent at least once.
    assert pages(objs) >= memory_mib * 256 * 0.9, pages(objs)
    if kind == "pv":
        info = next(o for o in objs if o["record"] == "X86_PV_INFO")
        assert (info["guest_width"], info["pt_levels"]) == (8, 4)
        assert {o["vcpu_id"] for o in objs if o["record"] == "X86_PV_VCPU_BASIC"} == {0}
        assert names.index("X86_PV_P2M_FRAMES") < names.index("PAGE_DATA")
    else:
        assert "HVM_CONTEXT" in names and "HVM_PARAMS" in names
    s = host.run(f"{STREAM} stats {path}", timeout=600, check=True)
    print(s.stdout)
    assert s.stdout.splitlines()[-1].split()[0] == "total"
