"""Running on real hosts: `xen-remus check`, `service run` (NAME.conf -> protect), `service
install`, and the systemd units' restart policy."""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from xen_remus.cli import check, service
from xen_remus.cli.disk import packaged_script
from xen_remus.cli.protect import EXIT_UNPROTECTED
from xen_remus.devices.kmod import Modules
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.host import SONAMES
from xen_remus.migrate_hook import main

# -- check ---------------------------------------------------------------------------------


def a_host(tmp_path: Path, *, missing: Sequence[str] = (), loaded: Sequence[str] = (),
           unloadable: Sequence[str] = (), caps: str = "control_d\n") -> check.Host:
    """A host with everything except the names in ``missing`` (programs, sonames,
    Python modules); kernel modules in ``loaded`` are loaded, those in ``unloadable``
    cannot be loaded, the rest can."""
    (tmp_path / "modules").write_text("".join(f"{m} 16384 0 - Live 0x0\n" for m in loaded))
    (tmp_path / "caps").write_text(caps)
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    mods = Modules(proc=tmp_path / "modules", sys_module=tmp_path / "nosys",
                   builtin=tmp_path / "nobuiltin",
                   modprobe=lambda m: pytest.fail("check must not load modules"),
                   modprobe_dry=lambda m: "FATAL: Module x not found" if m in unloadable
                   else None)
    return check.Host(which=lambda n: None if n in missing else f"/usr/bin/{n}",
                      load_library=lambda s: f"{s}: cannot open" if s in missing else None,
                      has_python_module=lambda m: m not in missing, modules=mods,
                      capabilities=tmp_path / "caps", scripts_dir=scripts)


def run_check(host: check.Host, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = check.run(argparse.Namespace(), host)
    return rc, capsys.readouterr().out.splitlines()


def test_check_all_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = a_host(tmp_path, loaded=["ifb", "sch_plug"])
    script = host.scripts_dir / "block-remus"
    script.write_bytes(packaged_script())
    script.chmod(0o755)
    rc, lines = run_check(host, capsys)
    assert rc == 0, lines
    assert all(ln.startswith("ok ") for ln in lines[:-1])
    assert lines[-1] == f"{len(lines) - 1} of {len(lines) - 1} ok"
    text = "\n".join(lines)
    for name in ("Xen dom0", "xl", *SONAMES.values(), "python module pyroute2",
                 "kernel module cls_matchall", "kernel module nbd", "nbd-client", "ssh",
                 "xen-remus", "block-remus"):
        assert f" {name}: " in text, name
    assert "kernel module ifb: loaded or built in" in text
    assert "kernel module nbd: not loaded, loadable" in text


def test_check_names_each_missing_piece_and_its_fix(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    host = a_host(tmp_path, missing=["xl", "libxenctrl.so.4.17", "lz4", "nbd-client"],
                  unloadable=["sch_plug"], caps="\n")
    (host.scripts_dir / "block-remus").write_text("#!/bin/sh\n# an old one\n")
    rc, lines = run_check(host, capsys)
    assert rc == 1
    bad = {ln.split(":")[0].removeprefix("MISSING  "): ln for ln in lines
           if ln.startswith("MISSING")}
    assert set(bad) == {"Xen dom0", "xl", "libxenctrl.so.4.17", "python module lz4",
                        "kernel module sch_plug", "nbd-client", "block-remus"}
    assert "a guest, not dom0" in bad["Xen dom0"]
    assert bad["xl"].endswith("Fix: apt-get install xen-utils-4.17")
    assert "apt-get install libxenmisc4.17" in bad["libxenctrl.so.4.17"]
    assert "apt-get install python3-lz4" in bad["python module lz4"]
    assert "CONFIG_NET_SCH_PLUG=m; then modprobe sch_plug" in bad["kernel module sch_plug"]
    assert "Module x not found" in bad["kernel module sch_plug"]
    assert "not this version's" in bad["block-remus"]
    assert "service install" in bad["block-remus"]
    assert lines[-1].startswith(f"{len(lines) - 1 - 7} of {len(lines) - 1} ok; missing: ")


def test_check_script_and_dom0_edge_cases(tmp_path: Path) -> None:
    host = a_host(tmp_path)
    host.capabilities = tmp_path / "nosuch"
    assert "not running on Xen" in check.dom0(host).detail
    assert "no " in check.hotplug_script(host.scripts_dir).detail
    script = host.scripts_dir / "block-remus"
    script.write_bytes(packaged_script())
    script.chmod(0o644)
    item = check.hotplug_script(host.scripts_dir)
    assert not item.ok and item.fix == f"chmod 755 {script}"
    no_modules = Modules(proc=tmp_path / "nosuch", modprobe_dry=lambda m: "unused")
    assert all(i.ok for i in check.kernel_modules(no_modules))


def test_check_runs_without_the_heavy_modules() -> None:
    """check must work (and say so) on a host where numpy or pyroute2 is missing."""
    code = ("import sys\nfrom xen_remus.migrate_hook import build_parser\n"
            "build_parser('check')\nprint('numpy' in sys.modules, 'pyroute2' in sys.modules)")
    out = subprocess.run([shutil.which("python3") or "python3", "-c", code],
                         capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).parents[2])}).stdout.split()
    assert out == ["False", "False"]


# -- service run -------------------------------------------------------------------------

CONF = """# guest1 at boot
backup = hostb
interval = 100
key_file = /etc/xen-remus/key
metrics-file = "/var/lib/prometheus/node-exporter/guest1.prom"
options = -d -F --heartbeat-timeout 2000 -s 'ssh -p 2222'
wait = 5
"""


def run_args(conf_dir: Path, name: str = "guest1", dry: bool = False,
             verbose: int = 0) -> argparse.Namespace:
    return argparse.Namespace(name=name, conf_dir=str(conf_dir), dry_run=dry,
                              verbose=verbose)


def test_config_to_protect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "guest1.conf").write_text(CONF)
    cfg = service.load_config("guest1", tmp_path)
    assert cfg.protect_argv() == [
        "protect", "-i", "100", "--key-file", "/etc/xen-remus/key", "--metrics-file",
        "/var/lib/prometheus/node-exporter/guest1.prom", "-d", "-F", "--heartbeat-timeout",
        "2000", "-s", "ssh -p 2222", "guest1", "hostb"]
    assert cfg.wait == 5
    assert service.cmd_run(run_args(tmp_path, dry=True)) == 0
    assert capsys.readouterr().out.strip() == (
        "xen-remus protect -i 100 --key-file /etc/xen-remus/key --metrics-file "
        "/var/lib/prometheus/node-exporter/guest1.prom -d -F --heartbeat-timeout 2000 -s "
        "'ssh -p 2222' guest1 hostb")


def test_service_run_waits_for_the_domain_then_becomes_protect(tmp_path: Path) -> None:
    (tmp_path / "g2.conf").write_text("backup = hostb\ndomain = guest-two\nwait = 0\n")
    execs: list[tuple[str, list[str]]] = []
    asked: list[str] = []

    def exists(domain: str) -> bool:
        asked.append(domain)
        return True

    rc = service.cmd_run(run_args(tmp_path, "g2", verbose=1),
                         execv=lambda p, a: execs.append((p, list(a))), exists=exists)
    assert rc == 0 and not asked  # wait = 0: no look
    (path, argv), = execs
    assert argv[1:] == ["-m", "xen_remus", "-v", "protect", "guest-two", "hostb"]
    assert argv[0] == path
    seen = iter([False, False, True])
    sleeps: list[float] = []
    service.wait_for_domain("g", 10, lambda d: next(seen), clock=lambda: float(len(sleeps)),
                            sleep=sleeps.append)
    assert sleeps == [2.0, 2.0]
    with pytest.raises(XenRemusError, match=r"domain 'g' does not exist \(waited 3 s\)"):
        t = [0.0]
        service.wait_for_domain("g", 3, lambda d: False, clock=lambda: t[0],
                                sleep=lambda s: t.__setitem__(0, t[0] + s))


@pytest.mark.parametrize("text,msg", [
    ("interval = 100\n", "no `backup = HOST`"),
    ("backup = b\nbackup = c\n", "line 2: backup given twice"),
    ("backup = b\n# note\ncolour = red\n", "line 3: unknown key 'colour'"),
    ("backup = b\njust words\n", "line 2: expected `key = value`"),
    ("backup = b\ninterval = fast\n", "interval = 'fast' is not a number"),
    ("backup = b\nwait = -1\n", "must not be negative"),
    ("backup = b\noptions = -s 'unclosed\n", "options: No closing quotation"),
    ("backup = b\noptions = --no-such-flag\n", "protect options above are refused"),
])
def test_bad_config_files_are_named(tmp_path: Path, text: str, msg: str) -> None:
    (tmp_path / "g.conf").write_text(text)
    with pytest.raises(UsageError, match=msg) as info:
        service.cmd_run(run_args(tmp_path, "g", dry=True))
    assert str(tmp_path / "g.conf") in str(info.value)


def test_bad_service_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("../etc/passwd", "-x", "a/b", ""):
        with pytest.raises(UsageError, match="service name"):
            service.config_path(name, tmp_path)
    assert main(["service", "run", "--conf-dir", str(tmp_path), "nosuch"]) == 2
    assert "nosuch.conf: no such file" in capsys.readouterr().err


# -- service install and the units ----------------------------------------------------------

def test_install_puts_units_and_script_in_place(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    units, scripts, conf = tmp_path / "units", tmp_path / "scripts", tmp_path / "etc" / "xr"
    units.mkdir()
    scripts.mkdir()
    ran: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda n, path=None: f"/usr/bin/{n}")
    ocf = tmp_path / "ocf" / "xen-remus"
    args = argparse.Namespace(unit_dir=str(units), scripts_dir=str(scripts),
                              conf_dir=str(conf), no_script=False, no_reload=False,
                              ocf_dir=str(ocf), no_ocf=False)
    assert service.cmd_install(args, run=ran.append) == 0
    agent = ocf / "protected-guest"
    assert agent.read_bytes() == (Path(service.__file__).parent.parent / "ocf" /
                                  "protected_guest.py").read_bytes()
    assert agent.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in units.iterdir()) == sorted(service.UNITS)
    for name in service.UNITS:
        assert (units / name).read_bytes() == service.unit_text(name)
    assert (scripts / "block-remus").read_bytes() == packaged_script()
    assert (scripts / "block-remus").stat().st_mode & 0o777 == 0o755
    assert conf.is_dir() and ran == [["systemctl", "daemon-reload"]]
    assert "systemctl enable --now xen-remus-protect@NAME" in capsys.readouterr().out
    args.unit_dir = str(tmp_path / "nosuch")
    with pytest.raises(UsageError, match="no such directory"):
        service.cmd_install(args, run=ran.append)


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(service.unit_text(name).decode())
    return cp


def test_protect_unit_restarts_only_when_the_backup_was_lost() -> None:
    u = unit("xen-remus-protect@.service")
    s = u["Service"]
    assert s["ExecStart"] == "xen-remus service run %i"
    # only protect's "backup lost, guest runs here unprotected" restarts it; no crash,
    # signal or error does (the backup may have resumed the guest)
    assert s["Restart"] == "no" and s["RestartForceExitStatus"] == str(EXIT_UNPROTECTED)
    assert "RestartPreventExitStatus" not in s
    # protect's supervisor outlives a crashed protect to pause the guest: not killed
    assert s["KillMode"] == "process"
    assert u["Unit"]["ConditionPathExists"] == f"{service.CONF_DIR}/%i.conf"
    assert "xendomains.service" in u["Unit"]["After"]
    assert int(u["Unit"]["StartLimitBurst"]) > 0
    assert unit("xen-remus-metrics.timer")["Timer"]["OnUnitActiveSec"] == "15s"
    assert "--prometheus --output" in unit("xen-remus-metrics.service")["Service"]["ExecStart"]


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    for name in service.UNITS:
        dest = name.replace("@.", "@guest1.")
        (tmp_path / dest).write_bytes(service.unit_text(name))
    files = sorted(str(p) for p in tmp_path.iterdir())
    r = subprocess.run([analyze, "verify", "--man=no", *files], capture_output=True,
                       text=True, timeout=120, check=False, cwd=tmp_path)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines()
                  if ln.strip() and "Command xen-remus is not executable" not in ln]
    assert complaints == [], complaints  # only: xen-remus is not installed on this machine


def test_help_of_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["service", "--help"], ["service", "run", "--help"],
                 ["service", "install", "--help"], ["check", "--help"],
                 ["status", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out: Any = capsys.readouterr().out
    for word in ("--watch", "--prometheus", "--dry-run", "--unit-dir", "MISSING",
                 "key_file", "xen-remus-protect@NAME"):
        assert word in out, word
