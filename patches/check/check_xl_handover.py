"""Check the patched xl's hand-over to xen-remus on a machine without Xen.

    python3 patches/check/check_xl_handover.py [XL]

XL defaults to what patches/build-xl.sh built. xl runs under an LD_PRELOAD shim
(xlshim.c, compiled here with gcc against libxen-dev) that gives it a dummy libxl context,
an xl.conf of each case's choosing and no domains. The engine is a fake that records its
argv. Each case checks what xl ran (or that it ran nothing and went on to libxl, which
then stops at its first domain look-up), and every recorded command line is parsed by
xen-remus's own parser to check it means what the xl options meant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's xen_remus

from xen_remus.migrate_hook import build_parser, command_of  # noqa: E402

CACHE = Path(os.environ.get("CACHE") or Path(os.environ.get("XDG_CACHE_HOME")
                                             or Path.home() / ".cache") / "xen-remus-xl")
NO_DOMAIN = "is an invalid domain identifier"  # xl went on to libxl (shim: no domains)


@dataclass
class Case:
    name: str
    xl_args: list[str]
    engine_argv: list[str] | None  # what the engine gets after its name; None: not run
    conf: str | None = 'remus.engine="{fake}"\n'
    rc: int = 0
    stderr: str = ""  # a part of xl's stderr
    stdout: str = ""  # a part of xl's stdout
    meaning: dict[str, object] = field(default_factory=dict)  # parsed by xen-remus


PLAIN: dict[str, object] = {
    "interval_ms": 200, "uncompressed": False, "no_netbuf": False, "no_disk": False,
    "unsafe": False, "blackhole": False, "no_daemon": False, "ssh": None, "verbose": 0,
    "domain": "vm1", "host": "hostb"}

CASES = [
    Case("plain", ["remus", "vm1", "hostb"], ["protect", "--", "vm1", "hostb"],
         meaning=PLAIN),
    Case("every flag", ["remus", "-i", "100", "-u", "-n", "-d", "-F", "-e", "vm1", "hostb"],
         ["protect", "-i", "100", "-u", "-n", "-d", "-F", "-e", "--", "vm1", "hostb"],
         meaning={**PLAIN, "interval_ms": 100, "uncompressed": True, "no_netbuf": True,
                  "no_disk": True, "unsafe": True, "no_daemon": True}),
    Case("blackhole", ["remus", "-F", "-b", "vm1", "hostb"],
         ["protect", "-F", "-b", "--", "vm1", "hostb"],
         meaning={**PLAIN, "unsafe": True, "blackhole": True}),
    Case("ssh command", ["remus", "-s", "ssh -p 2222", "vm1", "hostb"],
         ["protect", "-s", "ssh -p 2222", "--", "vm1", "hostb"],
         meaning={**PLAIN, "ssh": "ssh -p 2222"}),
    Case("-s '': HOST is the command", ["remus", "-s", "", "vm1", "socat - TCP:b:8003"],
         ["protect", "-s", "", "--", "vm1", "socat - TCP:b:8003"],
         meaning={**PLAIN, "ssh": "", "host": "socat - TCP:b:8003"}),
    Case("global -v", ["-v", "-v", "remus", "vm1", "hostb"],
         ["-v", "-v", "protect", "--", "vm1", "hostb"], meaning={**PLAIN, "verbose": 2}),
    Case("options after the domain are ignored (xl does not reorder)",
         ["remus", "vm1", "hostb", "-i", "50"], ["protect", "--", "vm1", "hostb"],
         meaning=PLAIN),
    Case("-i as xl reads it (atoi)", ["remus", "-i", "abc", "vm1", "hostb"],
         ["protect", "--", "vm1", "hostb"], meaning=PLAIN),
    Case("domain id", ["remus", "7", "hostb"], ["protect", "--", "7", "hostb"],
         meaning={**PLAIN, "domain": "7"}),
    Case("engine found on PATH", ["remus", "-u", "vm1", "hostb"],
         ["protect", "-u", "--", "vm1", "hostb"], conf='remus.engine="xen-remus"\n',
         meaning={**PLAIN, "uncompressed": True}),
    Case("the engine's exit status is xl's", ["remus", "vm1", "hostb"],
         ["protect", "--", "vm1", "hostb"], rc=3),
    Case("migrate --remus", ["migrate", "--remus", "-i", "100", "-F", "-n", "-d", "vm1",
                             "hostb"],
         ["protect", "-i", "100", "-n", "-d", "-F", "--", "vm1", "hostb"],
         meaning={**PLAIN, "interval_ms": 100, "no_netbuf": True, "no_disk": True,
                  "unsafe": True}),
    Case("migrate --remus, remus's -F", ["migrate", "--remus", "-F", "-e", "-d", "vm1",
                                         "hostb"],
         ["protect", "-d", "-F", "-e", "--", "vm1", "hostb"],
         meaning={**PLAIN, "no_disk": True, "unsafe": True, "no_daemon": True}),
    Case("--remus not first: plain migrate", ["migrate", "-e", "--remus", "vm1", "hostb"],
         None, rc=2, stderr="not supported"),
    Case("-N refused", ["remus", "-N", "/x/netbuf", "vm1", "hostb"], None, rc=1,
         stderr="-N is for libxl's Remus"),
    Case("COLO stays with libxl", ["remus", "-c", "vm1", "hostb"], None, rc=1,
         stderr=NO_DOMAIN),
    Case("engine libxl: off", ["remus", "vm1", "hostb"], None,
         conf='remus.engine="libxl"\n', rc=1, stderr=NO_DOMAIN),
    Case("no remus.engine: off", ["remus", "vm1", "hostb"], None,
         conf='autoballoon="off"\n', rc=1, stderr=NO_DOMAIN),
    Case("no xl.conf: off", ["remus", "vm1", "hostb"], None, conf=None, rc=1,
         stderr=NO_DOMAIN),
    Case("migrate without --remus: libxl", ["migrate", "vm1", "hostb"], None, rc=1,
         stderr=NO_DOMAIN),
    Case("migrate --remus, engine off: libxl's remus", ["migrate", "--remus", "vm1",
                                                        "hostb"], None,
         conf=None, rc=1, stderr=NO_DOMAIN),
    Case("engine missing", ["remus", "vm1", "hostb"], None,
         conf='remus.engine="/nonexistent/xen-remus"\n', rc=1,
         stderr='cannot run remus.engine "/nonexistent/xen-remus"'),
    Case("remus -h", ["remus", "-h"], None, stdout="Enable Remus HA"),
    Case("migrate -h lists --remus", ["migrate", "-h"], None, stdout="--remus"),
]


FAKE = """#!/bin/sh
printf '%s\\0' "$0" "$@" > "$XLCHECK_OUT"
exit "${XLCHECK_RC:-0}"
"""


def build_shim(tmp: Path) -> Path:
    flags = subprocess.run(["pkg-config", "--cflags", "xenlight"], check=True,
                           capture_output=True, text=True).stdout.split()
    so = tmp / "xlshim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror",
                    "-Wno-unused-parameter", *flags, "-o", str(so), str(HERE / "xlshim.c"),
                    "-ldl"], check=True)
    return so


def run_case(xl: Path, shim: Path, tmp: Path, case: Case) -> list[str]:
    """The problems with ``case`` (empty: it passed)."""
    fake_dir = tmp / "bin"
    fake = fake_dir / "xen-remus"
    out = tmp / "argv"
    out.unlink(missing_ok=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "XLCHECK_OUT": str(out),
           "XLCHECK_RC": str(case.rc), "PATH": f"{fake_dir}:{os.environ['PATH']}"}
    env.pop("XLSHIM_CONF", None)
    if case.conf is not None:
        conf = tmp / "xl.conf"
        conf.write_text(case.conf.format(fake=fake))
        env["XLSHIM_CONF"] = str(conf)
    r = subprocess.run([str(xl), *case.xl_args], env=env, capture_output=True, text=True,
                       timeout=30)
    problems = []
    if r.returncode != case.rc:
        problems.append(f"exit status {r.returncode}, expected {case.rc}")
    for part, text, stream in ((case.stderr, r.stderr, "stderr"),
                               (case.stdout, r.stdout, "stdout")):
        if part and part not in text:
            problems.append(f"{stream} lacks {part!r}: {text[-400:]!r}")
    ran = out.read_bytes().split(b"\0")[:-1] if out.exists() else None
    argv = [a.decode() for a in ran] if ran is not None else None
    if case.engine_argv is None:
        if argv is not None:
            problems.append(f"ran the engine: {shlex.join(argv)}")
        return problems
    if argv is None:
        return problems + [f"did not run the engine; stderr: {r.stderr[-400:]!r}"]
    # A script's $0 is the path it was run from: execvp's PATH look-up for a bare name.
    if argv != [str(fake), *case.engine_argv]:
        problems.append(f"ran {shlex.join(argv)}, expected "
                        f"{shlex.join([str(fake), *case.engine_argv])}")
    if case.meaning:
        args = build_parser(command_of(argv[1:])).parse_args(argv[1:])
        for key, want in case.meaning.items():
            if getattr(args, key) != want:
                problems.append(f"xen-remus reads {key}={getattr(args, key)!r}, "
                                f"expected {want!r}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("xl", nargs="?", type=Path, default=CACHE / "out" / "xl")
    xl = ap.parse_args().xl
    if not xl.is_file():
        print(f"check_xl_handover: no xl at {xl}: run patches/build-xl.sh first",
              file=sys.stderr)
        return 2
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="xlcheck-") as t:
        tmp = Path(t)
        (tmp / "bin").mkdir()
        fake = tmp / "bin" / "xen-remus"
        fake.write_text(FAKE)
        fake.chmod(0o755)
        shim = build_shim(tmp)
        for case in CASES:
            problems = run_case(xl.resolve(), shim, tmp, case)
            print(f"{'ok  ' if not problems else 'FAIL'} {case.name}: "
                  f"xl {shlex.join(case.xl_args)}")
            for p in problems:
                print(f"     {p}")
            passed += not problems
            failed += bool(problems)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
