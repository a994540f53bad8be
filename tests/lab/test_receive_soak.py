"""`make soak`: consecutive failovers into our receiver, each at a random cut (lab, one host).

XEN_REMUS_SOAK_RUNS (default 3; `make soak` runs 20), XEN_REMUS_SOAK_RECEIVER=ours|stock
(stock: `xl migrate-receive -r` behind the same relay and cuts, for comparison; it is
allowed to hang, and the hangs are counted), XEN_REMUS_SOAK_SEED to replay a sequence.
Every failover must finish within a bounded wait; ours must finish every time. The same
guest is protected again after each failover (same boot id throughout: one guest survives
every failover in turn).

The guest has 128 MiB, not the usual 96: its kernel keeps about 1 MiB more after every
restore, stock `xl save`/`xl restore` included (lab/README.md), and a 96 MiB guest has
only ~17 MB free, so it runs out after ~14 failovers. The soak prints the trend.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest

from lab import guest
from lab.failover import RECV, STOCK, FailoverHang, cut_and_fail_over
from lab.guest import GuestSpec, destroy
from lab.host import Host

RUNS = int(os.environ.get("XEN_REMUS_SOAK_RUNS", "3"))
WHO = os.environ.get("XEN_REMUS_SOAK_RECEIVER", "ours")
SEED = int(os.environ.get("XEN_REMUS_SOAK_SEED", str(int(time.time()))))


@pytest.mark.lab(timeout=300 + 240 * RUNS)
def test_failover_soak(lab_one: Host) -> None:
    assert WHO in ("ours", "stock")
    recv = f"{RECV} -r" if WHO == "ours" else STOCK
    rnd = random.Random(SEED)
    spec = GuestSpec(name="rsk", ip="169.254.20.24", mac="00:16:3e:00:00:24",
                     memory=128)
    times: list[float] = []
    hangs = 0
    print(f"\nsoak: {RUNS} failovers into {recv!r}, seed {SEED}")
    try:
        for i in range(RUNS):
            epoch, into = rnd.randint(1, 6), rnd.randint(0, 400_000)
            try:
                _, took = cut_and_fail_over(lab_one, spec, epoch, into, recv, tag=str(i),
                                            hang_after=60 if WHO == "stock" else 120)
            except FailoverHang:
                if WHO == "ours":
                    raise
                hangs += 1
                continue
            times.append(took)  # the guest now runs from the backup copy: protect it again
        mem = guest.mem_free(lab_one, spec.name)
        if len(mem) >= 2 and times:
            (t0, f0), (t1, f1) = mem[0], mem[-1]
            print(f"guest MemFree {f0} kB at tick {t0} -> {f1} kB at tick {t1}: "
                  f"{(f0 - f1) / len(times):.0f} kB per failover")
    finally:
        destroy(lab_one, spec.name)
        destroy(lab_one, f"{spec.name}--incoming")
    if times:
        print(f"soak ({WHO}): {len(times)}/{RUNS} failovers completed, {hangs} hung; guest "
              f"running after the stream ended: min {min(times):.1f} s, median "
              f"{statistics.median(times):.1f} s, max {max(times):.1f} s")
    assert len(times) + hangs == RUNS
    if WHO == "ours":
        assert len(times) == RUNS
