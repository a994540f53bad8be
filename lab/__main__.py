"""`python -m lab`: install, build, boot and drive the real-Xen lab."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

from lab import build, deps, protect
from lab.errors import LabError
from lab.lab import STATE_DIR, Lab, attach


def cmd_deps(args: argparse.Namespace) -> int:
    deps.install()
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    images = build.build()
    if args.prune:
        build.prune(images)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Boot hosts and hold them until Ctrl-C, `python -m lab down`, or --for elapses."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Lab(args.hosts, shared=True) as lab:
        print(f"lab up: {', '.join(lab.hosts)} running; run dir {lab.rundir}\n"
              "  python -m lab run A 'xl list'    python -m lab shell A    python -m lab down",
              flush=True)
        end = time.monotonic() + args.for_s if args.for_s else None
        while not stop and (end is None or time.monotonic() < end):
            if not all(h.alive() for h in lab.hosts.values()):
                print("lab up: a host's QEMU exited", file=sys.stderr)
                break
            time.sleep(0.5)
    print("lab up: hosts stopped")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = (STATE_DIR / "runs" / "latest" / "state.json")
    try:
        pid = int(json.loads(state.read_text())["lock_pid"])
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
        print("lab down: no running lab")
        return 0
    print(f"lab down: asked pid {pid} to stop its hosts")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    host = attach()[args.host]
    r = host.run(args.cmd, timeout=args.timeout)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.rc


def cmd_shell(args: argparse.Namespace) -> int:
    """A line-at-a-time shell: each line runs as its own command in dom0 (cwd kept)."""
    host = attach()[args.host]
    cwd = "/root"
    print(f"dom0 {args.host} (each line is one bash command, {args.timeout:.0f} s limit; ^D ends)")
    while True:
        try:
            line = input(f"dom0{args.host}:{cwd}# ")
        except EOFError:
            return 0
        if not line.strip():
            continue
        try:
            r = host.run(f"cd {cwd} && {line}\necho \"@@cwd=$PWD\" >&2", timeout=args.timeout)
        except LabError as exc:
            print(exc)
            continue
        err = r.stderr.splitlines()
        if err and err[-1].startswith("@@cwd="):
            cwd = err.pop()[len("@@cwd="):]
        sys.stdout.write(r.stdout)
        sys.stdout.write("".join(f"{e}\n" for e in err))
        if r.rc:
            print(f"[rc={r.rc}]")


def cmd_console(args: argparse.Namespace) -> int:
    sys.stdout.write(attach()[args.host].guest_console(args.guest))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    rundir = (STATE_DIR / "runs" / "latest").resolve()
    print(f"run dir: {rundir}")
    logs = sorted(rundir.glob("serial-*.log")) + sorted(rundir.glob("share/hosts/*/xen/**/*.log"))
    for log in logs:
        print(f"  {log}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lab import demo

    return demo.main(args.protect)


def cmd_stress(args: argparse.Namespace) -> int:
    from lab import stress

    return stress.main(args.hosts, args.seconds)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("deps", help="apt-get install the host packages (root)")
    s.set_defaults(func=cmd_deps)
    s = sub.add_parser("build", help="build or find the cached images")
    s.add_argument("--prune", action="store_true", help="then delete older cached stages")
    s.set_defaults(func=cmd_build)
    s = sub.add_parser("up", help="boot hosts and keep them running")
    s.add_argument("--hosts", type=int, default=2, choices=(1, 2))
    s.add_argument("--for", dest="for_s", type=float, default=1800,
                   help="stop after N s (default 1800: others queue for the lab; 0: never)")
    s.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the running lab").set_defaults(func=cmd_down)
    s = sub.add_parser("run", help="run a command in a dom0 of the running lab")
    s.add_argument("host", choices=("A", "B"))
    s.add_argument("cmd")
    s.add_argument("--timeout", type=float, default=120)
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("shell", help="line-at-a-time shell in a dom0 of the running lab")
    s.add_argument("host", choices=("A", "B"))
    s.add_argument("--timeout", type=float, default=120)
    s.set_defaults(func=cmd_shell)
    s = sub.add_parser("console", help="print a guest's console log as a dom0 recorded it")
    s.add_argument("host", choices=("A", "B"))
    s.add_argument("guest")
    s.set_defaults(func=cmd_console)
    sub.add_parser("logs", help="list the log files of the latest run").set_defaults(
        func=cmd_logs)
    s = sub.add_parser("demo", help="protect a guest, kill its host, watch it go on")
    s.add_argument("--protect", choices=sorted(protect.PROTECTORS), default="xen-remus",
                   help="our `xen-remus protect` (default: output commit on) or stock "
                        "`xl remus` (xl)")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("stress", help="check the lab computes right (TCG corruption)")
    s.add_argument("--hosts", type=int, default=2, choices=(1, 2))
    s.add_argument("--seconds", type=int, default=180)
    s.set_defaults(func=cmd_stress)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except LabError as exc:
        print(f"lab {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
