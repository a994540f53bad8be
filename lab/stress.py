"""`python -m lab stress`: is this lab computing right? (the TCG corruption check)

Boots the hosts, starts a PVH and a PV guest on each (corruption needed a domU beside
dom0), then for SECONDS runs in every dom0 two loops that regenerate the guests' 4 MiB
pattern with awk and hash it, a numpy loop that must hash the same every time, and a loop
asking each guest to re-hash its pattern. Prints ok/bad counts, wrong guest boot hashes
and dom0 process faults; exit 1 if anything was wrong. lab/README.md has the figures.
"""

from __future__ import annotations

import re
import threading

from lab import guest
from lab.build import pattern_sha256
from lab.guest import GuestSpec
from lab.host import Host, Job
from lab.lab import Lab

FAULT = re.compile(r".*(?:segfault at|general protection|Oops|BUG:).*")
AWK = ("awk 'BEGIN { s = sprintf(\"%1014s\", \"\"); gsub(/ /, \"x\", s); "
       "for (i = 0; i < 4096; i++) printf \"%08d %s\\n\", i, s }' | sha256sum | cut -c1-64")
NUMPY = """python3 -c '
import hashlib, time, numpy as np
end, ok, bad, ref = time.time() + {secs}, 0, 0, None
while time.time() < end:
    a = np.arange(1 << 20, dtype=np.float64) * 1.5
    h = hashlib.sha256(np.sqrt(a).tobytes() + str((a * a).sum()).encode()).hexdigest()
    ref = ref or h
    ok, bad = (ok + 1, bad) if h == ref else (ok, bad + 1)
print(f"ok={{ok}} bad={{bad}}")
'"""


def loops(specs: list[GuestSpec], secs: int, good: str) -> dict[str, str]:
    until = f"end=$(( $(date +%s) + {secs} )); ok=0; bad=0; while [ $(date +%s) -lt $end ]; do"
    tail = "done; echo ok=$ok bad=$bad"
    ips = " ".join(s.ip for s in specs)
    return {
        "dom0 awk 1": f'{until} r=$({AWK}); if [ "$r" = {good} ]; then ok=$((ok+1)); '
                      f'else bad=$((bad+1)); echo "BAD $r"; fi; {tail}',
        "dom0 awk 2": f'{until} r=$({AWK}); if [ "$r" = {good} ]; then ok=$((ok+1)); '
                      f'else bad=$((bad+1)); echo "BAD $r"; fi; {tail}',
        "dom0 numpy": NUMPY.format(secs=secs),
        # a reply without the hash (timeout under load) is not counted as wrong
        "guest check": f'{until} for ip in {ips}; do r=$(echo check | timeout 60 busybox nc '
                       f'$ip 7000); case "$r" in *{good}*) ok=$((ok+1));; *sha256=*) '
                       f'bad=$((bad+1)); echo "BAD $ip $r";; esac; done; {tail}',
    }


def main(nhosts: int = 2, secs: int = 180) -> int:
    good = pattern_sha256()
    wrong = 0
    with Lab(nhosts) as lab:
        hosts = list(lab.hosts.values())
        specs = {h.name: [GuestSpec(name=f"st{h.name}{k}", kind=k, ip=f"169.254.2{i}.{j}",
                                    mac=f"00:16:3e:00:1{i}:0{j}")
                          for j, k in ((2, "pvh"), (3, "pv"))]
                 for i, h in enumerate(hosts)}

        def create_all(h: Host) -> None:  # one at a time per host: hotplug is slow
            for s in specs[h.name]:
                try:
                    print(f"{h.name} {s.name}: ready in {guest.create(h, s, 300):.0f} s",
                          flush=True)
                except Exception as exc:
                    print(f"{h.name} {s.name}: not created: {str(exc)[:300]}", flush=True)

        threads = [threading.Thread(target=create_all, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        jobs: list[tuple[str, Job]] = []
        for h in hosts:
            for s in specs[h.name]:
                boot = re.findall(r"pattern sha256=(\w+)", h.guest_console(s.name))
                bad_boot = [x for x in boot if x != good]
                wrong += len(bad_boot)
                state = "wrong" if bad_boot else "right" if boot else "none"
                print(f"{h.name} {s.name}: boot hash {state}", flush=True)
            jobs += [(f"{h.name} {name}", h.spawn(cmd))
                     for name, cmd in loops(specs[h.name], secs, good).items()]
        for name, job in jobs:
            r = job.wait(secs + 180)
            m = re.search(r"ok=(\d+) bad=(\d+)", r.stdout)
            wrong += int(m.group(2)) if m else 1
            print(f"{name}: {m.group(0) if m else 'no result: ' + r.stderr[-200:]}")
        for h in hosts:
            faults = FAULT.findall(h.serial())
            wrong += len(faults)
            print(f"{h.name}: {len(faults)} dom0 process faults", *faults[:3], sep="\n  ")
    print(f"stress: {'WRONG results: ' + str(wrong) if wrong else 'all right'}")
    return 1 if wrong else 0
