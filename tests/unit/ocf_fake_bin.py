#!/usr/bin/env python3
"""The commands the OCF agent runs, faked for tests/unit/test_ocf_agent.py: one script
linked as xen-remus, xl, crm_attribute and crm_node, acting on a state directory
($FAKE_OCF): domains (xl list: NAME STATE a line), status.json (`xen-remus status
--json`), calls.log (every call, one line each); handover-fails makes `xen-remus
handover` fail."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

D = Path(os.environ["FAKE_OCF"])


def domains() -> dict[str, str]:
    f = D / "domains"
    return dict(ln.split() for ln in f.read_text().splitlines() if ln.strip()) \
        if f.exists() else {}


def set_domains(doms: dict[str, str]) -> None:
    (D / "domains").write_text("".join(f"{n} {s}\n" for n, s in doms.items()))


def main() -> int:
    tool, args = Path(sys.argv[0]).name, sys.argv[1:]
    with open(D / "calls.log", "a") as log:
        log.write(json.dumps([tool, *args]) + "\n")
    doms = domains()
    if tool == "xl":
        cmd, name = args[0], args[-1]
        if cmd == "list":
            print("Name                ID   Mem VCPUs\tState\tTime(s)")
            print("Domain-0             0  1024     2     r-----      10.0")
            for i, (n, s) in enumerate(doms.items(), 1):
                print(f"{n:<20}{i:>3}    96     1     {s}       1.0")
        elif cmd in ("destroy", "shutdown"):
            if doms.pop(name, None) is None:
                print(f"domain {name} not found", file=sys.stderr)
                return 1
        elif cmd in ("pause", "unpause"):
            doms[name] = "--p---" if cmd == "pause" else "r-----"
        elif cmd == "create":
            doms["g1"] = "r-----"
        set_domains(doms)
        return 0
    if tool == "crm_node":
        print("nodeA" if args == ["-n"] else "1 nodeA member\n2 nodeB member")
        return 0
    if tool == "crm_attribute":
        return 0
    # xen-remus
    if args[:2] == ["status", "--json"]:
        st = D / "status.json"
        print(st.read_text() if st.exists() else "[]")
        return 0
    if args[0] == "promote":
        if not (D / "waiting").exists():
            print("xen-remus: no receiver of g1 waits for a promotion", file=sys.stderr)
            return 1
        doms.pop("g1--incoming", None)
        doms["g1"] = "r-----"  # the receiver resumes it
        set_domains(doms)
        print("xen-remus promote: the receiver of g1 resumes it from epoch 4",
              file=sys.stderr)
        return 0
    if args[0] == "handover":
        if (D / "handover-fails").exists():
            print("xen-remus handover: the handover of g1 did not complete: protect (pid 9) "
                  "ended unprotected: backup lost", file=sys.stderr)
            return 1
        st = D / "status.json"
        docs = json.loads(st.read_text()) if st.exists() else []
        for d in docs:  # protect takes its last checkpoint, the guest suspended, and ends
            if d.get("role") == "primary" and d.get("alive"):
                os.kill(d["pid"], signal.SIGUSR1)  # the stand-in ends of it
                d.update(alive=False, state="handed-over", detail="after epoch 12")
        st.write_text(json.dumps(docs))
        doms[args[1]] = "--ps--"
        set_domains(doms)
        print(f"xen-remus handover: {args[1]} handed over to hostB after epoch 12",
              file=sys.stderr)
        return 0
    if args[0] in ("protect", "migrate-receive"):
        if os.environ.get("FAKE_OCF_RECORD") != "0":  # not the stand-ins of the tests
            (D / f"{args[0]}.argv").write_text(json.dumps(args))
        time.sleep(float(os.environ.get("FAKE_OCF_RUN_S", "30")))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
