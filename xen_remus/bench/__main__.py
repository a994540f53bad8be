"""Run the benchmark sections (see xen_remus.bench)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from xen_remus.bench import SECTIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xen_remus.bench")
    ap.add_argument("sections", nargs="*", default=list(SECTIONS), metavar="SECTION",
                    help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    args = ap.parse_args(argv)
    failed = []
    for name in args.sections:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}")
        mod = importlib.import_module(f"xen_remus.bench.{name}")
        t0 = time.perf_counter()
        figures: dict[str, float] = mod.run()
        print(f"[{name}] ({time.perf_counter() - t0:.1f} s)")
        for key, value in figures.items():
            print(f"  {name}.{key:<32} {value:14.3f}")
        for key, (op, bound) in getattr(mod, "TARGETS", {}).items():
            ok = figures[key] >= bound if op == ">=" else figures[key] <= bound
            print(f"  {'PASS' if ok else 'FAIL'}: {name}.{key} {op} {bound}")
            if not ok:
                failed.append(f"{name}.{key}")
        sys.stdout.flush()
    if failed:
        print(f"bench: targets missed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
