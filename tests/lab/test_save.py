"""End to end on real Xen: `xen-remus save` and `xen-remus migrate` (our engine) with stock
`xl restore` and stock `xl migrate-receive` as the other end, for a PV, a PVH and an HVM
guest (qemu-xen: its device state travels in the libxl stream's EMULATOR_CONTEXT).

After each, the guest must go on where it was: same boot id, counter not reset, the memory
pattern it wrote at boot intact, its network answering. Our files must pass `xen-remus
stream verify`; so must `xl save`'s file of the same guest, which then dumps as stock lays
it out (lab/streams.py). Timings are printed (run with -s to see them).
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from lab.streams import check_xl_save_file

pytestmark = pytest.mark.lab

XR = "cd /mnt/project && python3 -m xen_remus"
SPECS = {
    "pv": dict(name="spv", kind="pv", ip="169.254.20.41", mac="00:16:3e:00:02:01"),
    "pvh": dict(name="spvh", kind="pvh", ip="169.254.20.42", mac="00:16:3e:00:02:02"),
    "hvm": dict(name="shvm", kind="hvm", ip="169.254.20.43", mac="00:16:3e:00:02:03"),
}
KINDS = ["pv", "pvh", "hvm"]


def spec_of(kind: str) -> Any:
    from lab import guest

    return guest.GuestSpec(**SPECS[kind])  # type: ignore[arg-type]


def fresh_guest(host: Any, spec: Any) -> Any:
    """Create the guest and return its counter (value and boot id) as seen over TCP."""
    from lab import guest
    from lab.build import pattern_sha256

    host.run(f"xl destroy {spec.name} 2>/dev/null; true", timeout=60)
    guest.create(host, spec, timeout=240)
    assert guest.pattern_sha(host, spec) == pattern_sha256()
    return guest.counter(host, spec)


def check_goes_on(host: Any, spec: Any, before: Any) -> Any:
    """Same boot, counter not reset and moving, pattern intact, network answering."""
    from lab import guest
    from lab.build import pattern_sha256

    deadline = time.monotonic() + 60
    while True:
        try:
            after = guest.counter(host, spec)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert after.bootid == before.bootid, f"{spec.name} rebooted: {before} -> {after}"
    assert after.value >= before.value, f"{spec.name} counter went back: {before} -> {after}"
    time.sleep(3)
    later = guest.counter(host, spec)
    assert later.value > after.value, f"{spec.name} counter stuck at {after.value}"
    assert guest.pattern_sha(host, spec) == pattern_sha256(), "memory pattern changed"
    return later


def timed(host: Any, cmd: str, timeout: float) -> tuple[Any, float]:
    t = time.monotonic()
    r = host.run(cmd, timeout=timeout)
    return r, time.monotonic() - t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.lab(timeout=900)
def test_save_then_stock_restore(lab_one: Any, kind: str) -> None:
    host, spec = lab_one, spec_of(kind)
    before = fresh_guest(host, spec)
    path = f"/tmp/{spec.name}.save"
    r, ours = timed(host, f"{XR} -v save {spec.name} {path}", 600)
    assert r.rc == 0, f"xen-remus save failed:\n{r.stdout}\n{r.stderr}"
    print(f"\n{kind}: xen-remus save {ours:.1f} s: {r.stderr.strip().splitlines()[-1]}")
    assert host.run(f"xl list {spec.name}", timeout=30).rc != 0, "guest not destroyed"
    v = host.run(f"{XR} stream verify {path}", timeout=300)
    assert v.rc == 0, f"stream verify:\n{v.stdout}\n{v.stderr}"
    print(f"{kind}: verify: {v.stdout.strip()}")
    if kind == "hvm":  # QEMU's state after libxc's END, as xl save lays it out
        check_xl_save_file(host, path, kind, spec.memory)
    r, secs = timed(host, f"xl restore {path}", 300)
    assert r.rc == 0, f"xl restore failed:\n{r.stdout}\n{r.stderr}"
    print(f"{kind}: xl restore {secs:.1f} s")
    after = check_goes_on(host, spec, before)
    # /tmp is dom0's memory: two saved images of a 192 MiB HVM guest in it starve dom0.
    host.run(f"rm -f {path}", timeout=60, check=True)
    # The baseline, same guest, same run: stock xl save (bench figure: ours / stock).
    r, stock = timed(host, f"xl save {spec.name} {path}.xl", 600)
    assert r.rc == 0, f"xl save failed:\n{r.stderr}"
    print(f"{kind}: xl save {stock:.1f} s; ours/stock = {ours / stock:.2f}")
    # Stock's file, read by our codec (as test_stock_baselines does; CI runs this one).
    check_xl_save_file(host, f"{path}.xl", kind, spec.memory)
    r = host.run(f"xl restore {path}.xl", timeout=300)
    assert r.rc == 0, f"xl restore of the stock file failed:\n{r.stderr}"
    check_goes_on(host, spec, after)
    host.run(f"xl destroy {spec.name}; rm -f {path} {path}.xl", timeout=60)


@pytest.mark.lab(timeout=300)
def test_save_refuses_bad_input(lab_one: Any) -> None:
    r = lab_one.run(f"{XR} save no-such-guest /tmp/x.save", timeout=120)
    assert r.rc == 1 and "no domain named or numbered 'no-such-guest'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.lab(timeout=900)
def test_migrate_to_stock_receiver_same_host(lab_one: Any, kind: str) -> None:
    """-s '' runs the HOST argument as the transport: stock `xl migrate-receive -e` here."""
    host, spec = lab_one, spec_of(kind)
    before = fresh_guest(host, spec)
    r, secs = timed(host, f"{XR} -v migrate -s '' {spec.name} 'xl migrate-receive -e'", 600)
    assert r.rc == 0, f"xen-remus migrate failed:\n{r.stdout}\n{r.stderr}"
    print(f"\n{kind}: xen-remus migrate (localhost) {secs:.1f} s: "
          f"{[ln for ln in r.stderr.splitlines() if 'stream sent' in ln]}")
    names = re.findall(rf"^{spec.name}(\S*)\s", host.run("xl list", timeout=30).stdout, re.M)
    assert names == [""], f"expected one domain named {spec.name}, found {names}"
    after = check_goes_on(host, spec, before)
    # The baseline, same guest, same run: stock xl migrate to the same receiver.
    r, stock = timed(host, f"xl migrate -s '' {spec.name} 'xl migrate-receive -e'", 600)
    assert r.rc == 0, f"xl migrate failed:\n{r.stderr}"
    print(f"{kind}: xl migrate (localhost) {stock:.1f} s; ours/stock = {secs / stock:.2f}")
    check_goes_on(host, spec, after)
    host.run(f"xl destroy {spec.name}", timeout=60)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.lab(timeout=1200)
def test_migrate_to_stock_receiver_on_host_b(lab_two: Any, kind: str) -> None:
    """A -> B over the lab link: on B, socat hands the connection to `xl migrate-receive`;
    on A, our migrate uses `socat - TCP:B` as its -s '' transport."""
    a, b, spec = lab_two.a, lab_two.b, spec_of(kind)
    b.run(f"xl destroy {spec.name} 2>/dev/null; true", timeout=60)
    before = fresh_guest(a, spec)
    port = 7801
    listener = b.spawn(f"socat TCP-LISTEN:{port},reuseaddr EXEC:'xl migrate-receive -e'")
    time.sleep(2)
    r, secs = timed(a, f"{XR} -v migrate -s '' {spec.name} "
                       f"'socat - TCP:{b.ip}:{port}'", 1000)
    assert r.rc == 0, f"xen-remus migrate failed:\n{r.stdout}\n{r.stderr}"
    print(f"\n{kind}: xen-remus migrate A->B {secs:.1f} s")
    listener.wait(60)
    assert a.run(f"xl list {spec.name}", timeout=30).rc != 0, "source domain still on A"
    check_goes_on(b, spec, before)
    b.run(f"xl destroy {spec.name}", timeout=60)
