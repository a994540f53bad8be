"""`xen-remus`: the xl-style command line.

Each command group lives in its own module of xen_remus/cli, which exposes
``register(subparsers)`` and sets ``func`` on its parsers; the options several commands
take are declared once in cli/options.py. This file only wires them together, hands
`migrate --remus` over to protect, and turns our exceptions into one-line messages with
the right exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from xen_remus import __version__
from xen_remus.errors import XenRemusError

# The module that declares each command (register(subparsers) -> None, setting ``func``),
# in the order `--help` lists them. Only the named command's module is imported: numpy and
# the rest cost seconds in a dom0 under TCG, minutes when loaded.
COMMANDS: dict[str, str] = {
    "stream": "xen_remus.cli.stream",
    "save": "xen_remus.cli.save",
    "migrate": "xen_remus.cli.save",
    "migrate-receive": "xen_remus.cli.receive",
    "promote": "xen_remus.cli.promote",
    "handover": "xen_remus.cli.handover",
    "status": "xen_remus.cli.status",
    "protect": "xen_remus.cli.protect",
    "disk": "xen_remus.cli.disk",
    "service": "xen_remus.cli.service",
    "check": "xen_remus.cli.check",
    "witness": "xen_remus.cli.witness",
}


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the global options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xen-remus",
        description="Remus high availability for Xen guests, on the stock Xen toolstack.",
        epilog="`xen-remus COMMAND --help` describes each command and its options.",
    )
    parser.add_argument("--version", action="version", version=f"xen-remus {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output; twice for debugging output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS.get(command or "")
    for name in dict.fromkeys(COMMANDS.values()):  # each module once, in order
        if wanted in (None, name):
            importlib.import_module(name).register(sub)
    return parser


def command_func(args: argparse.Namespace) -> Callable[[argparse.Namespace], int] | None:
    """What runs the parsed command. `migrate --remus` is protect, as the old `xm migrate
    --remus` was: migrate declares protect's options, protect runs them."""
    if args.command == "migrate" and args.remus:
        from xen_remus.cli.protect import cmd_protect  # only now: it is not migrate's cost

        return cmd_protect
    return getattr(args, "func", None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    func = command_func(args)
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
