"""Host-side parts of the lab that need no QEMU: configs, parsing, recipe keys, the lock."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from lab import build, guest
from lab.errors import LabError
from lab.host import Host, Job


def test_pv_config_has_workload_and_network() -> None:
    cfg = guest.GuestSpec(name="g7", ip="169.254.20.7", mac="00:16:3e:00:00:07").config()
    assert 'name = "g7"' in cfg and 'type = "pv"' in cfg
    assert "xenlab_ip=169.254.20.7/16" in cfg
    assert "bridge=xenbr0,mac=00:16:3e:00:00:07" in cfg
    assert "tsc_mode" not in cfg and "\ndisk =" not in cfg


def test_pvh_config_uses_native_tsc() -> None:
    cfg = guest.GuestSpec(kind="pvh", disk="phy:/dev/nbd0,xvda,w").config()
    assert 'tsc_mode = "native"' in cfg
    assert "disk = [ 'phy:/dev/nbd0,xvda,w' ]" in cfg


def test_hvm_config_boots_the_bzimage_with_qemu_xen_and_a_pv_console() -> None:
    cfg = guest.GuestSpec(name="h1", kind="hvm", ip="169.254.20.9").config("/g")
    lines = cfg.splitlines()
    assert 'type = "hvm"' in lines and 'device_model_version = "qemu-xen"' in lines
    assert 'kernel = "/g/vmlinuz"' in lines and 'ramdisk = "/g/initrd.gz"' in lines
    # hvc0 last: /dev/console, the one xenconsoled logs and the lab reads
    assert 'extra = "console=ttyS0 console=hvc0 quiet xenlab_ip=169.254.20.9/16"' in lines
    assert any(ln.startswith("vif = ") and "type=vif" in ln for ln in lines)
    assert 'tsc_mode = "native"' in lines and "vnc = 0" in lines
    assert "qemu-system-xen" in build.DOM0_PACKAGES


def test_counter_reply_parsing() -> None:
    c = guest.parse_counter("counter=42 bootid=ab12cd34 up=17.5")
    assert c == guest.Counter(42, "ab12cd34")
    with pytest.raises(LabError, match="expected counter=N"):
        guest.parse_counter("garbage")


def test_pattern_hash_matches_the_guest_script() -> None:
    """The guest writes its pattern with awk; the lab's expected hash must be the same bytes."""
    init = (Path(build.HERE) / "guest/init").read_text()
    start = init.index("awk '")
    script = init[start + 5: init.index("' > /tmp/pattern", start)]
    out = subprocess.run(["busybox", "awk", script], capture_output=True, check=True).stdout
    assert hashlib.sha256(out).hexdigest() == build.pattern_sha256()
    assert len(out) == 4096 * 1024


def test_banner_names_the_pinned_build() -> None:
    assert build.expected_banner() == "Xen version 4.17.5 (Debian 4.17.5+72-g01140da4e8-1)"


def test_recipe_key_depends_on_inputs() -> None:
    k = build.key_of(build.build_guest, "a")
    assert k == build.key_of(build.build_guest, "a")
    assert k != build.key_of(build.build_guest, "b")
    assert k != build.key_of(build.build_dom0, "a")


def test_job_round_trip_through_queue(tmp_path: Path) -> None:
    """What the dom0 agent does, done by hand: the host side sees rc and output."""
    host = Host("A", "169.254.10.1", tmp_path, tmp_path)
    host.queue.mkdir(parents=True)
    host.pid = subprocess.Popen(["sleep", "30"]).pid  # stands in for QEMU: alive
    try:
        job = Job(host, "echo hi")
        cmd = job.base.with_suffix(".sh")
        assert cmd.read_text() == "echo hi\n"
        job.base.with_suffix(".out").write_text("hi\n")
        job.base.with_suffix(".rc").write_text("3\n")
        r = job.wait(5)
        assert (r.rc, r.stdout, r.ok) == (3, "hi\n", False)
        with pytest.raises(LabError, match="exited 3"):
            r.check()
        with pytest.raises(LabError, match="did not finish within"):
            Job(host, "true").wait(0.3)
    finally:
        subprocess.run(["kill", str(host.pid)])


def test_dom0_fault_pattern_matches_what_corrupted_dom0s_printed() -> None:
    from tests.lab.conftest import DOM0_FAULT

    seen = [  # lines from serial logs of labs whose dom0 went bad (runs of 2026-11-25)
        "[  224.723628] traps: python3[350] general protection fault ip:509612 sp:7ffc7192c470",
        "[  101.2] mv[812]: segfault at 7f3c0000 ip 00007f3c1 sp 00007ffd error 4 in ld-linux",
        "SystemError: unknown slot ID",
    ]
    assert all(DOM0_FAULT.search(line) for line in seen)
    assert not DOM0_FAULT.search("[   80.11] xenbr0: port 1(eth0) entered forwarding state")


def test_a_host_with_a_witness_socket_gets_the_virtio_serial_port(tmp_path: Path) -> None:
    from lab.host import WITNESS_PORT

    h = Host("A", "169.254.10.1", tmp_path, tmp_path)
    p = tmp_path
    images = build.Images(p / "xen", p / "vmlinuz", p / "vmlinux", p / "rootfs",
                          p / "dom0.cpio", p / "guest.cpio", "6.1", "r")
    plain = h.qemu_argv(images, None, "52:54:00:00:00:0a")
    assert "virtserialport" not in " ".join(plain)
    h.witness_sock = tmp_path / "w.sock"
    argv = " ".join(h.qemu_argv(images, None, "52:54:00:00:00:0a"))
    assert f"socket,id=witness,path={tmp_path / 'w.sock'},reconnect=1" in argv
    assert f"virtserialport,bus=vser0.0,chardev=witness,name={WITNESS_PORT}" in argv
    assert "xenlab_witness=1" in argv
