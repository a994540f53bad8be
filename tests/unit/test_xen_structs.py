"""Struct layouts of the Xen layer against Xen 4.17's headers, and its pure helpers."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from xen_remus.errors import XenRemusError
from xen_remus.xen import structs as S
from xen_remus.xen.domain import DomainInfo
from xen_remus.xen.errors import NoSuchDomain, XenCallError, call_failed
from xen_remus.xen.p2m import parse_shared_info
from xen_remus.xen.vcpu import LAYOUT_X86_32, LAYOUT_X86_64, VcpuContext, cr3_to_mfn, mfn_to_cr3

# Measured from the Xen 4.17 headers (Debian libxen-dev 4.17.5) with gcc on x86_64.
SIZES = {
    S.XenDomctlGetDomainInfo: 112,
    S.XenArchDomainConfig: 8,
    S.XenDomctl: 144,
    S.XenDomctlExtVcpuContext: 64,
    S.XenDomctlVcpuMsrs: 16,
    S.XenDomctlVcpuExtstate: 32,
    S.XenDomctlVcpuMsr: 16,
    S.XenDomctlShadowOpStats: 8,
    S.XcHypercallBuffer: 40,
    S.XenCpuidLeaf: 24,
    S.XenMsrEntry: 16,
    S.XcVcpuExtstate: 24,
    S.XenMachphysMfnList: 24,
    S.VcpuContextAny: 5168,
}
DOMAININFO_OFFSETS = {"flags": 4, "tot_pages": 8, "shared_info_frame": 48, "cpu_time": 56,
                      "nr_online_vcpus": 64, "max_vcpu_id": 68, "handle": 76, "cpupool": 92,
                      "gpaddr_bits": 96, "arch_config": 104}


@pytest.mark.parametrize("cls,size", SIZES.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_struct_sizes(cls: type, size: int) -> None:
    assert ctypes.sizeof(cls) == size


def test_domaininfo_offsets() -> None:
    for name, off in DOMAININFO_OFFSETS.items():
        assert getattr(S.XenDomctlGetDomainInfo, name).offset == off, name
    assert S.XenDomctl.u.offset == 16


def test_vcpu_layouts() -> None:
    assert (LAYOUT_X86_64.size, LAYOUT_X86_64.flags, LAYOUT_X86_64.dx) == (5168, 512, 616)
    assert (LAYOUT_X86_64.gdt_frames, LAYOUT_X86_64.gdt_ents, LAYOUT_X86_64.ctrlreg) == (
        4832, 4960, 4984)
    assert (LAYOUT_X86_32.size, LAYOUT_X86_32.flags, LAYOUT_X86_32.dx) == (2800, 512, 524)
    assert (LAYOUT_X86_32.gdt_frames, LAYOUT_X86_32.gdt_ents, LAYOUT_X86_32.ctrlreg) == (
        2640, 2704, 2716)


DUMPER = r"""
#include <stdio.h>
#include <stddef.h>
#define __XEN_TOOLS__ 1
#include <xenctrl.h>
#include <xen/foreign/x86_32.h>
#include <xen/foreign/x86_64.h>
#define P(e) printf("%s %zu\n", #e, (size_t)(e))
int main(void) {
  P(sizeof(xc_domaininfo_t)); P(sizeof(struct xen_domctl)); P(offsetof(struct xen_domctl, u));
  P(sizeof(struct xen_domctl_ext_vcpucontext)); P(sizeof(xc_hypercall_buffer_t));
  P(sizeof(vcpu_guest_context_any_t)); P(sizeof(struct vcpu_guest_context_x86_32));
  P(offsetof(struct vcpu_guest_context_x86_64, user_regs.rdx));
  P(offsetof(struct vcpu_guest_context_x86_64, gdt_frames));
  P(offsetof(struct vcpu_guest_context_x86_64, gdt_ents));
  P(offsetof(struct vcpu_guest_context_x86_64, ctrlreg));
  P(offsetof(struct vcpu_guest_context_x86_32, user_regs.edx));
  P(offsetof(struct vcpu_guest_context_x86_32, gdt_frames));
  P(offsetof(struct vcpu_guest_context_x86_32, gdt_ents));
  P(offsetof(struct vcpu_guest_context_x86_32, ctrlreg));
  P(offsetof(struct shared_info_x86_64, arch.max_pfn));
  P(offsetof(struct shared_info_x86_32, arch.max_pfn));
  P(XEN_DOMCTL_INTERFACE_VERSION);
  return 0;
}
"""


@pytest.mark.skipif(not (shutil.which("gcc") and os.path.exists("/usr/include/xenctrl.h")),
                    reason="needs gcc and the Xen headers (apt-get install libxen-dev)")
def test_layouts_against_installed_headers(tmp_path: Path) -> None:
    src, exe = tmp_path / "d.c", tmp_path / "d"
    src.write_text(DUMPER)
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, timeout=60)
    got = [int(line.split()[-1]) for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout.splitlines()]
    ours = [ctypes.sizeof(S.XenDomctlGetDomainInfo), ctypes.sizeof(S.XenDomctl),
            S.XenDomctl.u.offset, ctypes.sizeof(S.XenDomctlExtVcpuContext),
            ctypes.sizeof(S.XcHypercallBuffer), ctypes.sizeof(S.VcpuContextAny),
            LAYOUT_X86_32.size, LAYOUT_X86_64.dx, LAYOUT_X86_64.gdt_frames,
            LAYOUT_X86_64.gdt_ents, LAYOUT_X86_64.ctrlreg, LAYOUT_X86_32.dx,
            LAYOUT_X86_32.gdt_frames, LAYOUT_X86_32.gdt_ents, LAYOUT_X86_32.ctrlreg,
            3088, 2316, S.XEN_DOMCTL_INTERFACE_VERSION]
    assert got == ours


def _info(flags: int, emu: int = 0) -> DomainInfo:
    s = S.XenDomctlGetDomainInfo(domain=7, flags=flags, tot_pages=100, max_vcpu_id=1)
    s.arch_config.emulation_flags = emu
    return DomainInfo.from_struct(s)


def test_domaininfo_kinds_and_shutdown() -> None:
    pv = _info(S.DOMINF_RUNNING)
    assert pv.pv and not pv.hvm and not pv.pvh and pv.running and pv.vcpus == 2
    pvh = _info(S.DOMINF_HVM_GUEST | S.DOMINF_HAP, S.X86_EMU_LAPIC)
    assert pvh.hvm and pvh.pvh and pvh.hap
    hvm = _info(S.DOMINF_HVM_GUEST, 0x7FF)
    assert hvm.hvm and not hvm.pvh
    susp = _info(S.DOMINF_SHUTDOWN | (S.SHUTDOWN_SUSPEND << S.DOMINF_SHUTDOWNSHIFT))
    assert susp.suspended and susp.shutdown_reason == 2
    crashed = _info(S.DOMINF_SHUTDOWN | (S.SHUTDOWN_CRASH << S.DOMINF_SHUTDOWNSHIFT))
    assert not crashed.suspended and crashed.shutdown_reason == 3
    assert _info(S.DOMINF_RUNNING).shutdown_reason is None


def test_call_errors_name_call_domain_errno() -> None:
    e = call_failed("xc_domain_pause", 5, errno.EPERM, "detail")
    assert isinstance(e, XenCallError) and isinstance(e, XenRemusError)
    assert str(e) == ("xc_domain_pause on domain 5 failed: errno 1 (EPERM, Operation not "
                      "permitted): detail")
    assert isinstance(call_failed("xc_vcpu_getcontext", 9, errno.ESRCH), NoSuchDomain)


def test_parse_shared_info_both_widths() -> None:
    page = bytearray(4096)
    struct.pack_into("<QQQQQQ", page, 3088, 0x8000, 0x1234, 0, 0x5000, 0xFFFFC90000000000, 6)
    a = parse_shared_info(page, 8)
    assert (a.max_pfn, a.pfn_to_mfn_frame_list_list, a.p2m_cr3, a.p2m_generation) == (
        0x8000, 0x1234, 0x5000, 6)
    struct.pack_into("<IIIIII", page, 2316, 0x4000, 0x99, 0, 0, 0, 0)
    b = parse_shared_info(page, 4)
    assert (b.max_pfn, b.pfn_to_mfn_frame_list_list, b.p2m_cr3) == (0x4000, 0x99, 0)


@pytest.mark.parametrize("mfn", [0, 1, 0xFFFFF, 0x100000, 0xABCDEF])
def test_pae_cr3_folding_roundtrips(mfn: int) -> None:
    assert cr3_to_mfn(mfn_to_cr3(mfn, 4), 4) == mfn
    assert cr3_to_mfn(mfn_to_cr3(mfn, 8), 8) == mfn
    assert mfn_to_cr3(0x100000, 4) == 0x1  # bit 20 of the MFN folds into cr3 bit 0


def test_vcpu_context_fields_both_layouts() -> None:
    for width, lay in ((8, LAYOUT_X86_64), (4, LAYOUT_X86_32)):
        ctx = VcpuContext(bytes(5168), width)
        assert len(ctx.raw) == lay.size
        ctx.dx = 0x1234
        ctx.set_gdt_frame(1, 0x77)
        ctx.set_ctrlreg(3, 0x5000)
        fmt = "<Q" if width == 8 else "<I"
        assert struct.unpack_from(fmt, ctx.raw, lay.dx)[0] == 0x1234
        assert struct.unpack_from(fmt, ctx.raw, lay.gdt_frames + width)[0] == 0x77
        assert struct.unpack_from(fmt, ctx.raw, lay.ctrlreg + 3 * width)[0] == 0x5000
    with pytest.raises(ValueError, match="needs 5168"):
        VcpuContext(bytes(100), 8)


def test_vcpuextstate_offsets_match_the_header() -> None:
    # xen_domctl_vcpuextstate: vcpu, (pad), xfeature_mask, size, buffer (gcc: 0/8/16/24).
    offs = [getattr(S.XenDomctlVcpuExtstate, f).offset
            for f in ("vcpu", "xfeature_mask", "size", "buffer")]
    assert offs == [0, 8, 16, 24]
    assert S.XEN_DOMCTL_getvcpuextstate == 63
