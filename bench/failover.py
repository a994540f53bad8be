"""Benchmark section (lab only): failover time of our receiver against stock libxl's own.

On one lab host, stock `xl remus -F -n -d` protects a PV guest into a receiver through a
relay that cuts the stream at a fixed byte inside an epoch; the primary is destroyed and
the stream ends. Measured: seconds from the stream's end to the guest running from the
backup copy, for `xen-remus migrate-receive -r` and for stock `xl migrate-receive -r`,
the same cuts in the same run. Stock may hang on failover (../shared/LAB-NOTES.md 11): a
hang (no running guest 60 s after the end) is counted, not timed.
"""

from __future__ import annotations

import statistics
from typing import Any

# (epoch, bytes into the next epoch) of each cut: early, mid and late in an epoch.
CUTS = ((2, 3000), (3, 150_000), (4, 350_000))
HANG_S = 60.0
LAB_TARGETS: dict[str, tuple[str, float]] = {"ours_hangs": ("<=", 0.0)}


def lab_figures(h: Any) -> dict[str, float]:
    from lab import failover, guest

    out: dict[str, float] = {}
    for who, recv in (("ours", f"{failover.RECV} -r"), ("stock", failover.STOCK)):
        spec = guest.GuestSpec(name=f"bfo{who}", kind="pv", ip="169.254.20.53",
                               mac="00:16:3e:00:03:03")
        took: list[float] = []
        hangs = 0
        try:
            for i, (epoch, into) in enumerate(CUTS):
                try:
                    took.append(failover.cut_and_fail_over(h, spec, epoch, into, recv,
                                                           tag=f"b{i}", hang_after=HANG_S)[1])
                except failover.FailoverHang:
                    hangs += 1
        finally:
            guest.destroy(h, spec.name)
            guest.destroy(h, f"{spec.name}--incoming")
        out[f"{who}_hangs"] = float(hangs)
        if took:
            out[f"{who}_median_s"] = statistics.median(took)
            out[f"{who}_max_s"] = max(took)
    if "ours_median_s" in out and "stock_median_s" in out:
        out["median_ratio"] = out["ours_median_s"] / out["stock_median_s"]
    return out
