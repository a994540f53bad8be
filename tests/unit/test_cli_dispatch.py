"""`xen-remus COMMAND`: only the modules of COMMAND are imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xen_remus.migrate_hook import build_parser, command_of


def test_a_command_imports_only_its_modules() -> None:
    """`xen-remus status` must not import numpy (seconds in a TCG dom0, minutes loaded)."""
    code = ("import sys\nfrom xen_remus.migrate_hook import build_parser, command_of\n"
            "build_parser(command_of(['-v', 'status', '--json']))\n"
            "print('numpy' in sys.modules, 'xen_remus.cli.save' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


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
