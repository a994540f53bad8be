"""`xen-remus`: the xl-style command line.

Each command lives in its own module, which exposes ``register(subparsers)`` and sets
``func`` on its parser; this file only wires them together and turns our exceptions into
one-line messages with the right exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from xen_remus import __version__
from xen_remus.errors import XenRemusError

# Modules that contribute sub-commands (each: register(subparsers) -> None).
COMMAND_MODULES: tuple[str, ...] = (
    "xen_remus.cli.stream",
    "xen_remus.cli.save",
    "xen_remus.cli.receive",
    "xen_remus.cli.status",
    "xen_remus.cli.protect",
)
# Which of them a command needs (protect_cli adds --remus to save_cli's migrate). Only those
# are imported: numpy and the rest cost seconds in a dom0 under TCG, minutes when loaded.
COMMANDS: dict[str, tuple[str, ...]] = {
    "stream": ("xen_remus.cli.stream",),
    "save": ("xen_remus.cli.save",),
    "migrate": ("xen_remus.cli.save", "xen_remus.cli.protect"),
    "migrate-receive": ("xen_remus.cli.receive",),
    "status": ("xen_remus.cli.status",),
    "protect": ("xen_remus.cli.protect",),
}


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the global options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xen-remus",
        description="Remus high availability for Xen guests, on the stock Xen toolstack.",
    )
    parser.add_argument("--version", action="version", version=f"xen-remus {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.get(command or "", COMMAND_MODULES):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = func(args)
    except XenRemusError as exc:
        print(f"xen-remus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"xen-remus {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
