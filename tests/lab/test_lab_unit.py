"""Host-side parts of the lab that need no QEMU: configs, parsing, recipe keys, the lock."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from lab import build, guest
from lab import lab as lab_mod
from lab.errors import LabError
from lab.host import Host, Job
from lab.lab import HOST_IPS, HOST_MACS, Lab


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
    assert 'extra = "console=hvc0 quiet xenlab_ip=169.254.20.9/16"' in lines
    assert any(ln.startswith("vif = ") and "type=vif" in ln for ln in lines)
    assert 'tsc_mode = "native"' in lines and "vnc = 0" in lines
    assert "qemu-system-xen" in build.DOM0_PACKAGES


def test_counter_reply_parsing() -> None:
    c = guest.parse_counter("counter=42 bootid=ab12cd34 up=17.5")
    assert c == guest.Counter(42, "ab12cd34")
    with pytest.raises(LabError, match="expected counter=N"):
        guest.parse_counter("garbage")


@pytest.mark.parametrize("lines", [build.PATTERN_LINES, 3000])
def test_pattern_hash_matches_the_guest_script(lines: int) -> None:
    """The guest writes its pattern with awk; the lab's expected hash must be the same bytes."""
    init = (Path(build.HERE) / "guest/init").read_text()
    start = init.index("awk -v n=\"$PLINES\" '")
    script = init[init.index("'", start) + 1: init.index("' > /tmp/pattern", start)]
    out = subprocess.run(["busybox", "awk", "-v", f"n={lines}", script], capture_output=True,
                         check=True).stdout
    assert hashlib.sha256(out).hexdigest() == build.pattern_sha256(lines)
    assert len(out) == lines * 1024


def test_guest_sizes_vcpus_and_pattern_reach_the_config() -> None:
    plain = guest.GuestSpec().config().splitlines()
    assert "vcpus = 1" in plain and not any(ln.startswith("maxmem") for ln in plain)
    assert not any("xenlab_work" in ln or "xenlab_pattern" in ln for ln in plain)
    for kind in ("pv", "pvh", "hvm"):
        spec = guest.GuestSpec(kind=kind, memory=1024, maxmem=2048, vcpus=2, pattern_mib=256)
        lines = spec.config().splitlines()
        assert {"memory = 1024", "maxmem = 2048", "vcpus = 2"} <= set(lines), lines
        extra = next(ln for ln in lines if ln.startswith("extra = "))
        assert "xenlab_work=1" in extra and "xenlab_pattern=262144" in extra
        assert extra.endswith(' quiet xenlab_ip=169.254.20.1/16 xenlab_pattern=262144 '
                              'xenlab_work=1"')


def test_cpu_work_reply_parsing() -> None:
    w = guest.parse_cpu_work("cpus online=0-1 work=17,23,")
    assert w == guest.CpuWork("0-1", (17, 23))
    assert guest.parse_cpu_work("cpus online=0 work=").counts == ()
    with pytest.raises(LabError, match="expected cpus online"):
        guest.parse_cpu_work("counter=3 bootid=x")


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
    assert plain[plain.index("-m") + 1] == "3072"
    big = Host("A", "169.254.10.1", tmp_path, tmp_path, mem_mib=4608)
    argv_big = big.qemu_argv(images, None, "52:54:00:00:00:0a")
    assert argv_big[argv_big.index("-m") + 1] == "4608"
    h.witness_sock = tmp_path / "w.sock"
    argv = " ".join(h.qemu_argv(images, None, "52:54:00:00:00:0a"))
    assert f"socket,id=witness,path={tmp_path / 'w.sock'},reconnect=1" in argv
    assert f"virtserialport,bus=vser0.0,chardev=witness,name={WITNESS_PORT}" in argv
    assert "xenlab_witness=1" in argv


def test_install_steps_are_the_readmes() -> None:
    """The steps test_fresh_install follows, read from the README as it is."""
    from lab import install

    steps = install.install_steps((Path(build.HERE).parent / "README.md").read_text())
    pkgs = install.apt_packages(steps[0])
    assert pkgs is not None and {"python3-venv", "python3-pyxs", "xen-utils-4.17"} <= set(pkgs)
    # Offline in the lab: apt installs nothing there, so the image must have them.
    assert set(pkgs) - {"xen-system-amd64"} <= set(build.DOM0_PACKAGES)
    assert "reboot" in steps and "xen-remus check" in steps
    pip = next(s for s in steps if "pip install " in s)
    assert "--no-index" in pip and install.WHERE in pip
    assert install.in_dom0(pip).endswith(pip.replace(install.WHERE, install.DIST))
    assert all("#" not in s and "\\" not in s for s in steps)


def test_install_steps_of_a_made_up_readme() -> None:
    from lab import install

    text = ("# x\n\n## Install on your Xen hosts\n\nprose\n\n```\napt-get install -y a \\\n"
            "    b   # two\nreboot  # now\n\nfoo --bar /path/to/w.whl\n```\n\n```\nnot this\n```\n")
    assert install.install_steps(text) == ["apt-get install -y a b", "reboot",
                                           "foo --bar /path/to/w.whl"]
    assert install.apt_packages("apt-get install -y a b") == ["a", "b"]
    assert install.apt_packages("reboot") is None
    with pytest.raises(LabError, match="no section"):
        install.install_steps("## Install\n```\nx\n```\n")


def test_installed_runs_the_command_not_the_checkout() -> None:
    from lab import install, protect

    cmd = install.installed(protect.PROTECTORS["xen-remus-tcp"].sender)
    assert cmd.startswith("unset PYTHONPATH; cd /root; exec xen-remus -v protect ")
    assert "python3 -m" not in cmd
    with pytest.raises(LabError, match="not a command"):
        install.installed("exec xl remus g1 b")
    out = ("ok       xl: /usr/sbin/xl (the Xen toolstack)\n"
           "MISSING  block-remus: no /etc/xen/scripts/block-remus (x). Fix: xen-remus ...\n"
           "MISSING  kernel module nbd: cannot be loaded: y. Fix: z\n")
    assert install.missing(out) == ["block-remus", "kernel module nbd"]


def _lab_with(tmp_path: Path, alive: set[str]) -> tuple[Lab, list[subprocess.Popen[bytes]]]:
    """A two-host Lab whose hosts are stand-ins: those in ``alive`` run `sleep`."""
    lab = Lab(2)
    lab.rundir = tmp_path
    p = tmp_path
    lab.images = build.Images(p / "xen", p / "vmlinuz", p / "vmlinux", p / "rootfs",
                              p / "dom0.cpio", p / "guest.cpio", "6.1", "r")
    procs = []
    for name in ("A", "B"):
        h = Host(name, HOST_IPS[name], tmp_path, tmp_path)
        h.queue.mkdir(parents=True)
        proc = subprocess.Popen(["sleep", "30"])
        procs.append(proc)
        if name not in alive:
            proc.kill()
            proc.wait()
        h.pid = proc.pid
        lab.hosts[name] = h
    return lab, procs


def test_restart_refuses_what_cannot_come_back(tmp_path: Path) -> None:
    for alive, name, why in ((set(), "A", "listening end"), ({"A"}, "B", "listening end"),
                             ({"A", "B"}, "A", "still runs")):
        lab, procs = _lab_with(tmp_path / f"{name}{len(alive)}", alive)
        try:
            with pytest.raises(LabError, match=why):
                lab.restart(name)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


def test_restart_boots_a_fresh_host_that_connects(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed A comes back: connecting to B's end of the link, its old logs kept aside,
    the jobs queued for the dead dom0 dropped."""
    monkeypatch.setattr(lab_mod, "STATE_DIR", tmp_path / "state")
    (tmp_path / "state" / "pids").mkdir(parents=True)
    lab, procs = _lab_with(tmp_path, {"B"})
    lab._link_port = 4242
    old = lab.hosts["A"]
    old.serial_log.write_text("XENLAB-AGENT: ready\n")
    (tmp_path / "qemu-A.cmdline").write_text("qemu ...\n")
    (old.xenlog / "console").mkdir(parents=True)
    (old.queue / "1-2-3.sh").write_text("xl list\n")
    (old.queue / "1-2-2.out").write_text("done before the kill\n")
    started: list[tuple[str | None, str]] = []

    def start(self: Host, images: build.Images, netdev: str | None, mac: str) -> None:
        started.append((netdev, mac))
        self.pid = procs[1].pid

    monkeypatch.setattr(Host, "start", start)
    monkeypatch.setattr(Host, "wait_ready", lambda self, deadline: 0.0)
    try:
        new = lab.restart("A")
        assert new is lab.a and new is not old
        assert started == [("socket,connect=127.0.0.1:4242", HOST_MACS["A"])]
        assert (tmp_path / "serial-A.1.log").read_text() == "XENLAB-AGENT: ready\n"
        assert not (tmp_path / "serial-A.log").exists()  # wait_ready reads a new one
        assert (tmp_path / "qemu-A.1.cmdline").exists()
        assert (tmp_path / "share" / "hosts" / "A.1" / "xen" / "console").is_dir()
        assert not (old.queue / "1-2-3.sh").exists() and (old.queue / "1-2-2.out").exists()
        assert lab.lives == {"A": 1}
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["hosts"]["A"]["pid"] == procs[1].pid
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_wait_all_running_times_each_domain_and_names_the_late(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab import failover

    polls = iter([{"g1": "--p---", "g2": "-b----"}, {"g1": "r-----", "g2": "-b----"}])
    monkeypatch.setattr(guest, "domain_states", lambda host: next(polls))
    monkeypatch.setattr("time.sleep", lambda s: None)

    class Said:
        def __init__(self, text: str) -> None:
            self.text = text

        def stderr(self) -> str:
            return self.text

    host = Host("B", "169.254.10.2", tmp_path, tmp_path)
    jobs = {"g1": Said("g1's receiver"), "g2": Said("g2's receiver")}
    took = failover.wait_all_running(host, jobs, 60)  # type: ignore[arg-type]
    assert set(took) == {"g1", "g2"} and took["g2"] <= took["g1"]
    monkeypatch.setattr(guest, "domain_states", lambda host: {"g1": "r-----"})
    with pytest.raises(failover.FailoverHang, match=r"g2 not running after 0 s \(states g2 "
                                                    r"None\)\n--- g2\ng2's receiver"):
        failover.wait_all_running(host, jobs, 0)  # type: ignore[arg-type]


def test_lab_hosts_may_be_bigger_never_smaller() -> None:
    assert Lab(1, mem_mib=4608).mem_mib == 4608
    with pytest.raises(LabError, match="at least 3072 MiB"):
        Lab(1, mem_mib=2048)
