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


def test_unknown_command_gets_the_full_parser() -> None:
    assert command_of(["-v", "--version"]) is None
    p = build_parser(command_of(["nosuch"]))
    with pytest.raises(SystemExit):
        p.parse_args(["nosuch"])
    usage = p.format_help()
    for name in ("stream", "save", "migrate", "migrate-receive", "status", "protect"):
        assert f"    {name} " in usage or f"    {name}\n" in usage, name
