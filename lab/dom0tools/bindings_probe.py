"""The dom0 half of test_bindings.py: exercises xen_remus.xen and pagetable.py on a live guest.

Run inside a lab dom0 as ``python3 /mnt/project/lab/dom0tools/bindings_probe.py DOMID``; it
prints one line ``PROBE-RESULT {json}`` that test_bindings.py checks. It holds no tests
itself (pytest collects nothing here); it needs only the stdlib, numpy and pyxs, like dom0.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from xen_remus import pagetable as pt
from xen_remus.stream import consts as C
from xen_remus.xen import (
    M2P,
    P2M,
    ForeignMemory,
    Suspender,
    VcpuContext,
    XenCtrl,
    XenStore,
    read_shared_info,
)
from xen_remus.xen import structs as S

BATCH = 1024


def logdirty(xc: XenCtrl, domid: int, out: dict[str, Any]) -> None:
    pages = xc.maximum_gpfn(domid) + 1
    out["max_gpfn"] = pages - 1
    xc.logdirty_enable(domid)
    bitmap = xc.dirty_bitmap(pages)
    try:
        first = xc.logdirty_clean(domid, bitmap)
        out["clean0_dirty"] = first.dirty_count
        rounds = []
        for _ in range(2):
            time.sleep(1.5)  # the guest's counter ticks every second
            st = xc.logdirty_clean(domid, bitmap)
            rounds.append({"dirty_count": st.dirty_count,
                           "bitmap_pfns": int(len(bitmap.dirty_pfns()))})
        out["clean_rounds"] = rounds
        time.sleep(0.5)
        xc.logdirty_peek(domid, bitmap)
        out["peek_pfns"] = int(len(bitmap.dirty_pfns()))
    finally:
        bitmap.close()
        xc.logdirty_off(domid)


def guest_state(xc: XenCtrl, domid: int, hvm: bool, vcpus: int, out: dict[str, Any]) -> None:
    ctx = VcpuContext(xc.vcpu_context(domid, 0), 8 if hvm else xc.guest_width(domid))
    out["vcpu0"] = {"online": ctx.online, "cr3": ctx.ctrlreg(3), "flags": ctx.flags}
    out["tsc"] = vars(xc.tsc_info(domid))
    pol = xc.cpu_policy(domid)
    out["cpu_policy"] = {"leaves": pol.nr_leaves, "msrs": pol.nr_msrs}
    if hvm:
        out["hvm_context_bytes"] = len(xc.hvm_context(domid))
        out["hvm_params"] = {n: xc.hvm_param(domid, p) for n, p in (
            ("store_pfn", S.HVM_PARAM_STORE_PFN), ("store_evtchn", S.HVM_PARAM_STORE_EVTCHN),
            ("console_pfn", S.HVM_PARAM_CONSOLE_PFN))}
    else:
        out["vcpu0_extended_bytes"] = len(xc.vcpu_extended_context(domid, 0))
        mask, area = xc.vcpu_xsave(domid, 0)
        out["vcpu0_xsave"] = {"mask": mask, "bytes": len(area)}
        out["vcpu0_msrs_bytes"] = len(xc.vcpu_msrs(domid, 0))


def pv_maps(xc: XenCtrl, fm: ForeignMemory, domid: int, info: Any, out: dict[str, Any]
            ) -> tuple[M2P, P2M, pt.PseudoPhysMap]:
    width = xc.guest_width(domid)
    si = read_shared_info(fm, domid, info.shared_info_frame, width)
    out["shared_info"] = {"max_pfn": si.max_pfn, "fll": si.pfn_to_mfn_frame_list_list,
                          "p2m_cr3": si.p2m_cr3, "p2m_vaddr": si.p2m_vaddr}
    m2p = M2P(xc, fm)
    p2m = P2M(fm, domid, si, width)
    out["p2m"] = {"method": p2m.method, "entries": int(len(p2m.table)),
                  "frames": int(len(p2m.frames))}
    if p2m.method == "linear" and si.pfn_to_mfn_frame_list_list not in (0, p2m.invalid):
        tree = P2M(fm, domid, si, width, method="tree")
        n = min(len(tree.table), len(p2m.table))
        out["p2m"]["tree_agrees"] = bool(np.array_equal(tree.table[:n], p2m.table[:n]))
        tree.close()
    table = p2m.table.astype(np.uint64)
    valid = np.flatnonzero(table != np.uint64(p2m.invalid))
    mfns = table[valid]
    out["p2m"]["valid"] = int(len(valid))
    out["p2m"]["m2p_mismatch"] = int(np.count_nonzero(m2p.table[mfns] != valid))
    back = np.take(table, m2p.table[mfns].astype(np.intp), mode="clip")
    out["p2m"]["p2m_m2p_mfn_mismatch"] = int(np.count_nonzero(back != mfns))
    # 64 frames spread over the guest (its first ones, low memory, may all be zero).
    spread = mfns[np.linspace(0, len(mfns) - 1, 64).astype(np.intp)]
    with fm.map(domid, spread) as m:
        out["map64"] = {"errors": int(np.count_nonzero(m.errors)),
                        "nonzero_pages": int(sum(any(m.page(i)) for i in range(64)))}
    ppm = pt.PseudoPhysMap(m2p=m2p.table, p2m=p2m.table, width=width, max_mfn=m2p.max_mfn,
                           compat_m2p_mfn0=xc.compat_m2p_mfn0() if width == 4 else None)
    return m2p, p2m, ppm


def normalise_all(xc: XenCtrl, fm: ForeignMemory, domid: int, p2m: P2M,
                  ppm: pt.PseudoPhysMap, live: bool) -> dict[str, Any]:
    table = p2m.table.astype(np.uint64)
    pfns = np.flatnonzero(table != np.uint64(p2m.invalid)).astype(np.uint64)
    types = xc.pfn_types(domid, table[pfns])
    is_pt = pt.is_pagetable(types)
    levels = {f"L{lv}": int(np.count_nonzero((types[is_pt] & C.PFINFO_LTABTYPE_MASK) == lv))
              for lv in (1, 2, 3, 4)}
    done = retry = present = 0
    t0 = time.monotonic()
    sel = np.flatnonzero(is_pt)
    for start in range(0, len(sel), BATCH):
        part = sel[start:start + BATCH]
        with fm.map(domid, table[pfns[part]]) as m:
            m.raise_on_error()
            src = np.frombuffer(m.view, dtype=np.uint64).reshape(-1, 512)
            res = pt.normalise(src, types[part], ppm, live=live, pfns=pfns[part])
            present += int(np.count_nonzero(src & np.uint64(1)))
            del src
        done += len(part) - int(res.retry.sum())
        retry += int(res.retry.sum())
    return {"tables": int(len(sel)), "normalised": done, "retry": retry, "levels": levels,
            "present_entries": present, "seconds": round(time.monotonic() - t0, 3)}


def main(domid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"domid": domid, "errors": []}
    xc, fm, xs = XenCtrl(), ForeignMemory(), XenStore()
    doms = xc.domains()
    out["domains"] = [d.domid for d in doms]
    info = xc.domain_info(domid)
    out["info"] = {"hvm": info.hvm, "pvh": info.pvh, "tot_pages": info.tot_pages,
                   "max_pages": info.max_pages, "vcpus": info.vcpus,
                   "online_vcpus": info.nr_online_vcpus, "running_or_blocked":
                   bool(info.flags & (S.DOMINF_RUNNING | S.DOMINF_BLOCKED)),
                   "shared_info_frame": info.shared_info_frame}
    xc.pause(domid)
    paused = xc.domain_info(domid).paused
    xc.unpause(domid)
    out["pause_unpause"] = [paused, xc.domain_info(domid).paused]
    logdirty(xc, domid, out)
    guest_state(xc, domid, info.hvm, info.vcpus, out)
    p2m = ppm = None
    if info.pv:
        _m2p, p2m, ppm = pv_maps(xc, fm, domid, info, out)
        out["normalise_live"] = normalise_all(xc, fm, domid, p2m, ppm, live=True)
    else:
        with fm.map(domid, np.arange(256, dtype=np.uint64)) as m:
            out["map256"] = {"errors": int(np.count_nonzero(m.errors)),
                             "nonzero_pages": int(sum(any(m.page(i)) for i in range(256)
                                                      if m.errors[i] == 0))}
    sus = Suspender(xc, xs, domid)
    out["suspend_method"] = sus.method
    try:
        t0 = time.monotonic()
        sus.suspend(timeout=30)
        out["suspend_s"] = round(time.monotonic() - t0, 3)
        out["suspended"] = xc.domain_info(domid).suspended
        if p2m is not None and ppm is not None:
            out["normalise_suspended"] = normalise_all(xc, fm, domid, p2m, ppm, live=False)
            vcpus = []
            for v in range(info.vcpus):
                ctx = VcpuContext(xc.vcpu_context(domid, v), ppm.width)
                if ctx.online:
                    pt.normalise_vcpu(ctx, v, ppm)
                    vcpus.append({"vcpu": v, "cr3_pfn": ctx.ctrlreg(3) >> 12,
                                  "start_info_pfn": ctx.dx if v == 0 else None})
            out["vcpus_normalised"] = vcpus
    finally:
        if xc.domain_info(domid).suspended:
            t0 = time.monotonic()
            sus.resume(fast=True)
            out["resume_s"] = round(time.monotonic() - t0, 3)
    time.sleep(1.0)
    after = xc.domain_info(domid)
    out["after_resume"] = {"shutdown": after.shutdown, "paused": after.paused,
                           "dying": after.dying}
    sus.close()
    return out


if __name__ == "__main__":
    result: dict[str, Any]
    try:
        result = main(int(sys.argv[1]))
    except Exception as exc:  # report, don't trace: the host side shows it
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    print("PROBE-RESULT " + json.dumps(result, default=int), flush=True)
