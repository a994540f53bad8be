"""`xen-remus COMMAND`: only the modules of COMMAND are imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_stream_support import small_stream
from xen_remus.migrate_hook import COMMANDS, build_parser, command_of


def test_a_command_imports_only_its_modules() -> None:
    """`xen-remus status` must not import numpy (seconds in a TCG dom0, minutes loaded)."""
    code = ("import sys\nfrom xen_remus.migrate_hook import build_parser, command_of\n"
            "build_parser(command_of(['-v', 'status', '--json']))\n"
            "print('numpy' in sys.modules, 'xen_remus.cli.save' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


HEAVY = ("numpy", "lz4", "pyroute2", "asyncio")  # seconds to import in a TCG dom0
PROBE = """import contextlib, io, sys
from xen_remus.migrate_hook import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        rc = main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
print(rc, *sorted(m for m in {heavy!r} if m in sys.modules))
"""


def loaded(*argv: str) -> list[str]:
    """Run `xen-remus ARGV` in a fresh interpreter: its exit status, then which of HEAVY
    it imported."""
    return subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.parametrize("argv", [
    *([name, "--help"] for name in COMMANDS), ["--help"], ["disk", "serve", "--help"],
    ["disk", "install-script", "--help"], ["stream", "verify", "--help"],
])
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    assert loaded(*argv) == ["0"]


def test_commands_that_stop_before_the_work_load_nothing_heavy(tmp_path: Path) -> None:
    """status reads files; a usage error is found before the machinery is loaded."""
    assert loaded("status", "--dir", str(tmp_path)) == ["0"]
    assert loaded("migrate-receive", "-r", "--max-epoch-mib", "0") == ["2"]
    assert loaded("protect", "-i", "0", "g1", "hostb") == ["2"]
    assert loaded("disk", "serve", "/x.img", "--nbd", "/n", "--replica", "/r",
                  "--max-unacked", "0") == ["2"]


def test_reading_a_stream_does_load_numpy(tmp_path: Path) -> None:
    """The probe sees an import when there is one: page records are checked with numpy."""
    path = tmp_path / "s.xl"
    path.write_bytes(small_stream("xl", epochs=2))
    assert loaded("stream", "verify", str(path)) == ["0", "numpy"]


def test_migrate_loads_protect_only_for_remus() -> None:
    """`migrate` declares protect's options itself; protect's module is loaded only to run
    `migrate --remus`, so a plain migration does not pay for it."""
    code = ("import sys\nfrom xen_remus.migrate_hook import build_parser, command_func\n"
            "argv = ['migrate', '-d', '-F', 'g1', 'hostb']\n"
            "func = command_func(build_parser('migrate').parse_args(argv))\n"
            "print(func.__name__, 'xen_remus.cli.protect' in sys.modules)\n"
            "func = command_func(build_parser('migrate').parse_args(['migrate', '--remus',"
            " *argv[1:]]))\n"
            "print(func.__name__, 'xen_remus.cli.protect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["cmd_migrate", "False", "cmd_protect", "True"]


def test_unknown_command_gets_the_full_parser() -> None:
    assert command_of(["-v", "--version"]) is None
    p = build_parser(command_of(["nosuch"]))
    with pytest.raises(SystemExit):
        p.parse_args(["nosuch"])
    usage = p.format_help()
    for name in ("stream", "save", "migrate", "migrate-receive", "status", "protect"):
        assert f"    {name} " in usage or f"    {name}\n" in usage, name
