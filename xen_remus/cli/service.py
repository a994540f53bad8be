"""`xen-remus service run NAME` (protection described in /etc/xen-remus/NAME.conf, what the
systemd unit xen-remus-protect@NAME runs) and `xen-remus service install` (the units and the
block-remus hotplug script into place).

NAME.conf: one `key = value` a line, `#` comments; the keys in KEYS below."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from xen_remus.cli.disk import install_script
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.paths import XEN_SCRIPTS_DIR as SCRIPTS_DIR

CONF_DIR = "/etc/xen-remus"
UNIT_DIR = "/etc/systemd/system"
OCF_DIR = "/usr/lib/ocf/resource.d/xen-remus"  # Pacemaker's agent xen-remus:protected-guest
OCF_AGENT = "protected-guest"
UNITS = ("xen-remus-protect@.service", "xen-remus-metrics.service", "xen-remus-metrics.timer")
WAIT_DEFAULT_S = 300
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
KEYS = {
    "domain": "the domain to protect (default: NAME)",
    "backup": "the host that keeps the backup copy (required)",
    "interval": "checkpoint interval in ms (protect -i)",
    "key_file": "pre-shared key file, the same on both hosts (--key-file)",
    "metrics_file": "Prometheus textfile (--metrics-file)",
    "options": "more protect options, shell-quoted (e.g. -d -F --heartbeat-timeout 2000)",
    "wait": f"seconds to wait for the domain to exist, e.g. at boot (default "
            f"{WAIT_DEFAULT_S}; 0: not at all)",
}
DESCRIPTION = f"""Protection started at boot by systemd. `service run NAME` reads
{CONF_DIR}/NAME.conf (one `key = value` a line: {', '.join(KEYS)}), waits for the domain
to exist and becomes `xen-remus protect ... DOMAIN BACKUP`; the unit
xen-remus-protect@NAME.service runs it. `service install` puts the units into
{UNIT_DIR} and the block-remus hotplug script into {SCRIPTS_DIR}."""


@dataclass
class ServiceConfig:
    name: str
    path: Path
    values: dict[str, str] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        return self.values.get("domain", self.name)

    @property
    def wait(self) -> float:
        return float(self._number("wait", float, WAIT_DEFAULT_S))

    def _number(self, key: str, kind: Callable[[str], Any], default: Any) -> Any:
        raw = self.values.get(key)
        if raw is None:
            return default
        try:
            v = kind(raw)
        except ValueError:
            raise UsageError(f"{self.path}: {key} = {raw!r} is not a number") from None
        if v < 0:
            raise UsageError(f"{self.path}: {key} = {raw!r} must not be negative")
        return v

    def protect_argv(self) -> list[str]:
        """The `xen-remus protect` arguments this file means."""
        argv = ["protect"]
        if "interval" in self.values:
            argv += ["-i", str(self._number("interval", int, None))]
        if "key_file" in self.values:
            argv += ["--key-file", self.values["key_file"]]
        if "metrics_file" in self.values:
            argv += ["--metrics-file", self.values["metrics_file"]]
        try:
            argv += shlex.split(self.values.get("options", ""))
        except ValueError as exc:
            raise UsageError(f"{self.path}: options: {exc}") from None
        return [*argv, self.domain, self.values["backup"]]


def config_path(name: str, conf_dir: Path) -> Path:
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"service name {name!r}: letters, digits and _.@+- only, not "
                         "starting with a punctuation mark")
    return conf_dir / f"{name}.conf"


def parse_config(name: str, path: Path, text: str) -> ServiceConfig:
    cfg = ServiceConfig(name, path)
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not eq or not key:
            raise UsageError(f"{path} line {no}: expected `key = value`, got {line[:60]!r}")
        if key not in KEYS:
            raise UsageError(f"{path} line {no}: unknown key {key!r} (known: "
                             f"{', '.join(KEYS)})")
        if key in cfg.values:
            raise UsageError(f"{path} line {no}: {key} given twice")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        cfg.values[key] = value
    if not cfg.values.get("backup"):
        raise UsageError(f"{path}: no `backup = HOST` (the host that keeps the copy)")
    return cfg


def load_config(name: str, conf_dir: Path) -> ServiceConfig:
    path = config_path(name, conf_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; write `backup = HOST` (and more: "
                         "`xen-remus service --help`) into it") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    return parse_config(name, path, text)


def _domain_exists(domain: str) -> bool:
    try:
        r = subprocess.run(["xl", "domid", domain], capture_output=True, timeout=30,
                           check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def wait_for_domain(domain: str, seconds: float,
                    exists: Callable[[str], bool] = _domain_exists,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep, every: float = 2.0) -> None:
    """Until ``domain`` exists (xendomains may still be starting it at boot), at most
    ``seconds``; then a XenRemusError: there is nothing to protect."""
    deadline = clock() + seconds
    while not exists(domain):
        if clock() >= deadline:
            raise XenRemusError(f"domain {domain!r} does not exist (waited {seconds:g} s): "
                                "nothing to protect; start it, then the unit")
        sleep(every)


def cmd_run(args: argparse.Namespace,
            execv: Callable[[str, list[str]], Any] | None = None,
            exists: Callable[[str], bool] = _domain_exists) -> int:
    cfg = load_config(args.name, Path(args.conf_dir))
    wait = cfg.wait
    argv = cfg.protect_argv()
    if args.verbose:
        argv = ["-" + "v" * args.verbose, *argv]
    from xen_remus.migrate_hook import build_parser

    try:  # refuse bad options here, with the file named, not after the wait
        build_parser("protect").parse_args(argv)
    except SystemExit:
        raise UsageError(f"{cfg.path}: the protect options above are refused") from None
    cmd = [sys.executable, "-m", "xen_remus", *argv]
    if args.dry_run:
        print(shlex.join(["xen-remus", *argv]))
        return 0
    if wait:
        wait_for_domain(cfg.domain, wait, exists)
    sys.stdout.flush()
    sys.stderr.flush()
    # protect takes this process over: systemd watches it, its exit status is the unit's
    if execv is None:
        os.execv(sys.executable, cmd)
    execv(sys.executable, cmd)  # a test's
    return 0


def unit_text(name: str) -> bytes:
    return (resources.files("xen_remus.systemd") / name).read_bytes()


def install_ocf_agent(ocf_dir: Path) -> Path:
    """The OCF resource agent (xen_remus/ocf/protected_guest.py, stdlib-only Python run
    by the system's python3) into ``ocf_dir``, executable."""
    ocf_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    dst = ocf_dir / OCF_AGENT
    tmp = ocf_dir / f".{OCF_AGENT}.new"
    tmp.write_bytes((resources.files("xen_remus.ocf") / "protected_guest.py").read_bytes())
    tmp.chmod(0o755)
    tmp.replace(dst)
    return dst


def cmd_install(args: argparse.Namespace,
                run: Callable[[list[str]], Any] = subprocess.run) -> int:
    unit_dir, conf_dir = Path(args.unit_dir), Path(args.conf_dir)
    if not unit_dir.is_dir():
        raise UsageError(f"{unit_dir}: no such directory (is this a systemd host?)")
    for name in UNITS:
        tmp = unit_dir / f".{name}.new"
        tmp.write_bytes(unit_text(name))
        tmp.chmod(0o644)
        tmp.replace(unit_dir / name)
        print(f"installed {unit_dir / name}")
    if not args.no_script:
        print(f"installed {install_script(Path(args.scripts_dir))}")
    if not args.no_ocf:
        print(f"installed {install_ocf_agent(Path(args.ocf_dir))} (Pacemaker: "
              "ocf:xen-remus:protected-guest)")
    conf_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not args.no_reload and shutil.which("systemctl"):
        run(["systemctl", "daemon-reload"])
    print(f"next: write {conf_dir}/NAME.conf (`backup = HOST`), then `systemctl enable --now "
          "xen-remus-protect@NAME`")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("service", help="protection started at boot (systemd units)",
                       description=DESCRIPTION)
    cmds = p.add_subparsers(dest="service_command", metavar="ACTION")
    r = cmds.add_parser(
        "run", help="protect the domain that NAME.conf describes (the unit runs this)",
        description=f"Read {CONF_DIR}/NAME.conf, wait for its domain to exist (`wait`), "
        "and run `xen-remus protect` with its options in this process (exec): its exit "
        "status is this command's. Keys: " + "; ".join(f"{k}: {v}" for k, v in KEYS.items())
        + ".")
    r.add_argument("name", metavar="NAME", help=f"the file {CONF_DIR}/NAME.conf")
    r.add_argument("--conf-dir", default=CONF_DIR, metavar="DIR",
                   help="where NAME.conf is (default %(default)s)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the protect command and exit, without waiting or running it")
    r.set_defaults(func=cmd_run)
    i = cmds.add_parser(
        "install", help="install the systemd units, the block-remus script and the OCF agent",
        description=f"Copy the units ({', '.join(UNITS)}) into --unit-dir, the block-remus "
        f"hotplug script into --scripts-dir, the OCF resource agent {OCF_AGENT} (for "
        "Pacemaker) into --ocf-dir, create --conf-dir and reload systemd. Nothing is "
        "enabled or started.")
    i.add_argument("--unit-dir", default=UNIT_DIR, metavar="DIR",
                   help="default %(default)s")
    i.add_argument("--scripts-dir", default=SCRIPTS_DIR, metavar="DIR",
                   help="xl's hotplug scripts (default %(default)s)")
    i.add_argument("--conf-dir", default=CONF_DIR, metavar="DIR",
                   help="default %(default)s")
    i.add_argument("--no-script", action="store_true", help="do not install block-remus")
    i.add_argument("--ocf-dir", default=OCF_DIR, metavar="DIR",
                   help=f"where the OCF resource agent {OCF_AGENT} goes (default "
                   "%(default)s)")
    i.add_argument("--no-ocf", action="store_true",
                   help="do not install the OCF resource agent")
    i.add_argument("--no-reload", action="store_true",
                   help="do not run `systemctl daemon-reload`")
    i.set_defaults(func=cmd_install)
    p.set_defaults(func=lambda args: p.print_help(sys.stderr) or 2)
