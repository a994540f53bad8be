"""ctypes layouts of the Xen 4.17 public structures we exchange with the libraries.

Field names follow xen/include/public (domctl.h, arch-x86/xen.h, xenctrl.h). Sizes and offsets
are asserted in xen_remus/tests/test_xen_structs.py against values measured from the 4.17
headers with a C compiler.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_char,
    c_int,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

DOMID_XEN = 0x7FF2
XEN_DOMCTL_INTERFACE_VERSION = 0x15

# xen_domctl_getdomaininfo.flags (XEN_DOMINF_*)
DOMINF_DYING = 1 << 0
DOMINF_HVM_GUEST = 1 << 1
DOMINF_SHUTDOWN = 1 << 2
DOMINF_PAUSED = 1 << 3
DOMINF_BLOCKED = 1 << 4
DOMINF_RUNNING = 1 << 5
DOMINF_HAP = 1 << 8
DOMINF_SHUTDOWNSHIFT = 16
DOMINF_SHUTDOWNMASK = 255

# sched.h SHUTDOWN_* reasons
SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT, SHUTDOWN_SUSPEND, SHUTDOWN_CRASH = range(4)

# xen_arch_domainconfig.emulation_flags: PVH has LAPIC only, HVM has all, PV none.
X86_EMU_LAPIC = 1 << 0


class XenArchDomainConfig(ctypes.Structure):
    _fields_ = [("emulation_flags", c_uint32), ("misc_flags", c_uint32)]


class XenDomctlGetDomainInfo(ctypes.Structure):
    """struct xen_domctl_getdomaininfo (xc_domaininfo_t), 112 bytes."""

    _fields_ = [
        ("domain", c_uint16),
        ("pad1", c_uint16),
        ("flags", c_uint32),
        ("tot_pages", c_uint64),
        ("max_pages", c_uint64),
        ("outstanding_pages", c_uint64),
        ("shr_pages", c_uint64),
        ("paged_pages", c_uint64),
        ("shared_info_frame", c_uint64),
        ("cpu_time", c_uint64),
        ("nr_online_vcpus", c_uint32),
        ("max_vcpu_id", c_uint32),
        ("ssidref", c_uint32),
        ("handle", c_uint8 * 16),
        ("cpupool", c_uint32),
        ("gpaddr_bits", c_uint8),
        ("pad2", c_uint8 * 7),
        ("arch_config", XenArchDomainConfig),
    ]


class XcHypercallBuffer(ctypes.Structure):
    """xc_hypercall_buffer_t: libxenctrl's descriptor of a hypercall-safe buffer."""

    _fields_ = [("hbuf", c_void_p), ("param_shadow", c_void_p), ("dir", c_int),
                ("ubuf", c_void_p), ("sz", c_size_t)]


class XenDomctlShadowOpStats(ctypes.Structure):
    _fields_ = [("fault_count", c_uint32), ("dirty_count", c_uint32)]


class XenDomctl(ctypes.Structure):
    """struct xen_domctl: header plus the 128-byte union ``u`` (accessed as raw words)."""

    _fields_ = [("cmd", c_uint32), ("interface_version", c_uint32), ("domain", c_uint16),
                ("_pad", c_uint16 * 3), ("u", c_uint64 * 16)]


class XenDomctlExtVcpuContext(ctypes.Structure):
    """struct xen_domctl_ext_vcpucontext (x86); ``size`` says how much Xen filled."""

    _fields_ = [
        ("vcpu", c_uint32),
        ("size", c_uint32),
        ("syscall32_callback_eip", c_uint64),
        ("sysenter_callback_eip", c_uint64),
        ("syscall32_callback_cs", c_uint16),
        ("sysenter_callback_cs", c_uint16),
        ("syscall32_disables_events", c_uint8),
        ("sysenter_disables_events", c_uint8),
        ("vmce", c_uint64 * 4),  # union { mcg_cap; struct hvm_vmce_vcpu vmce; }
    ]


class XenDomctlVcpuExtstate(ctypes.Structure):
    """xen_domctl_vcpuextstate (XEN_DOMCTL_getvcpuextstate)."""

    _fields_ = [("vcpu", c_uint32), ("pad", c_uint32), ("xfeature_mask", c_uint64),
                ("size", c_uint64), ("buffer", c_uint64)]


class XenDomctlVcpuMsrs(ctypes.Structure):
    _fields_ = [("vcpu", c_uint32), ("msr_count", c_uint32), ("msrs", c_uint64)]


class XenDomctlVcpuMsr(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class XenMachphysMfnList(ctypes.Structure):
    """struct xen_machphys_mfn_list (XENMEM_machphys_{,compat_}mfn_list)."""

    _fields_ = [("max_extents", c_uint32), ("extent_start", c_uint64), ("nr_extents", c_uint32)]


XENMEM_machphys_compat_mfn_list = 25


class XenCpuidLeaf(ctypes.Structure):
    _fields_ = [("leaf", c_uint32), ("subleaf", c_uint32),
                ("a", c_uint32), ("b", c_uint32), ("c", c_uint32), ("d", c_uint32)]


class XenMsrEntry(ctypes.Structure):
    _fields_ = [("idx", c_uint32), ("flags", c_uint32), ("val", c_uint64)]


class XcVcpuExtstate(ctypes.Structure):
    _fields_ = [("xfeature_mask", c_uint64), ("size", c_uint64), ("buffer", c_void_p)]


# vcpu_guest_context_any_t is a union of the x86_32 and x86_64 layouts; 5168 bytes.
VCPU_CONTEXT_ANY_SIZE = 5168
VcpuContextAny = c_char * VCPU_CONTEXT_ANY_SIZE

XEN_DOMCTL_get_ext_vcpucontext = 43
XEN_DOMCTL_getvcpuextstate = 63
XEN_DOMCTL_get_vcpu_msrs = 72

# shadow_op operations (XEN_DOMCTL_SHADOW_OP_*) and flags
SHADOW_OP_OFF = 0
SHADOW_OP_ENABLE_LOGDIRTY = 2
SHADOW_OP_CLEAN = 11
SHADOW_OP_PEEK = 12
SHADOW_LOGDIRTY_FINAL = 1 << 0

# xc_get_pfn_type_batch returns XEN_DOMCTL_PFINFO_* in place: the page type (the stream's
# PFINFO_* values) in bits 28-31 of each frame's word.
PFINFO_LTAB_SHIFT = 28

# HVM params (hvm/params.h): those the save path records, the probes' store/console, and
# what tells an HVM guest's PV drivers (the event channel callback) and its ACPI sleep.
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_VIRIDIAN = 9
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_ACPI_S_STATE = 14
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_ACPI_IOPORTS_LOCATION = 19
HVM_PARAM_PAGING_RING_PFN = 27
HVM_PARAM_MONITOR_RING_PFN = 28
HVM_PARAM_SHARING_RING_PFN = 29
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
HVM_PARAM_VM_GENERATION_ID_ADDR = 34
HVM_PARAM_X87_FIP_WIDTH = 36
HVM_PARAM_VM86_TSS_SIZED = 37
HVM_PARAM_MCA_CAP = 38
