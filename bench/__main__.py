"""Run the benchmark sections (see bench)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench import LAB_SECTIONS, SECTIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"sections to run (default: all of {', '.join(SECTIONS)}; with "
                         f"--lab also {', '.join(LAB_SECTIONS)})")
    ap.add_argument("--lab", action="store_true",
                    help="then the lab sections on real Xen (one QEMU host): ours against "
                         "stock xl in the same run")
    args = ap.parse_args(argv)
    for name in args.sections:
        if name not in SECTIONS + LAB_SECTIONS:
            ap.error(f"unknown section {name!r}")
    host = [n for n in args.sections if n in SECTIONS] if args.sections else list(SECTIONS)
    lab_sections = ([n for n in args.sections if n in LAB_SECTIONS] if args.sections
                    else list(LAB_SECTIONS))
    failed: list[str] = []
    for name in host:
        mod = importlib.import_module(f"bench.{name}")
        t0 = time.perf_counter()
        report(name, mod.run(), getattr(mod, "TARGETS", {}), t0, failed)
    if args.lab:
        from lab.errors import LabError  # the lab driver: a checkout, not the package
        from lab.lab import Lab

        name = "boot"
        try:
            with Lab(1) as lab:
                for name in lab_sections:
                    mod = importlib.import_module(f"bench.{name}")
                    t0 = time.perf_counter()
                    report(f"{name}-lab", mod.lab_figures(lab.a),
                           getattr(mod, "LAB_TARGETS", {}), t0, failed)
        except (LabError, RuntimeError) as exc:  # the lab or a tool in it failed: no figures
            print(f"bench: lab section {name} failed: {exc}", file=sys.stderr)
            return 1
    if failed:
        print(f"bench: targets missed: {', '.join(failed)}")
    return 1 if failed else 0


def report(name: str, figures: dict[str, float], targets: dict[str, tuple[str, float]],
           t0: float, failed: list[str]) -> None:
    print(f"[{name}] ({time.perf_counter() - t0:.1f} s)")
    for key, value in figures.items():
        print(f"  {name}.{key:<32} {value:14.3f}")
    for key, (op, bound) in targets.items():
        ok = figures[key] >= bound if op == ">=" else figures[key] <= bound
        print(f"  {'PASS' if ok else 'FAIL'}: {name}.{key} {op} {bound}")
        if not ok:
            failed.append(f"{name}.{key}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
