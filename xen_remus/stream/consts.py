"""Constants of the Xen migration specs, written as the specs' tables.

libxc: docs/specs/libxc-migration-stream.pandoc (revision 3), libxl:
docs/specs/libxl-migration-stream.pandoc (revision 2), xl: tools/xl/xl.h.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# --- xl save header (tools/xl/xl.h): 32-byte magic then 4 native-endian u32s.
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_HDR_SIZE = 48
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1
XL_MANDATORY_FLAGS_KNOWN = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2

# --- libxl stream header (big-endian) and record types.
LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_HDR_SIZE = 16
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1

LIBXL_END = 0x00000000
LIBXL_LIBXC_CONTEXT = 0x00000001
LIBXL_EMULATOR_XENSTORE_DATA = 0x00000002
LIBXL_EMULATOR_CONTEXT = 0x00000003
LIBXL_CHECKPOINT_END = 0x00000004
LIBXL_CHECKPOINT_STATE = 0x00000005

LIBXL_NAMES = {
    LIBXL_END: "END",
    LIBXL_LIBXC_CONTEXT: "LIBXC_CONTEXT",
    LIBXL_EMULATOR_XENSTORE_DATA: "EMULATOR_XENSTORE_DATA",
    LIBXL_EMULATOR_CONTEXT: "EMULATOR_CONTEXT",
    LIBXL_CHECKPOINT_END: "CHECKPOINT_END",
    LIBXL_CHECKPOINT_STATE: "CHECKPOINT_STATE",
}

EMULATOR_UNKNOWN = 0
EMULATOR_QEMU_TRADITIONAL = 1
EMULATOR_QEMU_UPSTREAM = 2
EMULATOR_IDS = (EMULATOR_UNKNOWN, EMULATOR_QEMU_TRADITIONAL, EMULATOR_QEMU_UPSTREAM)

# CHECKPOINT_STATE control_id (COLO).
CHECKPOINT_STATES = {0: "NEW", 1: "SVM_SUSPENDED", 2: "SVM_READY", 3: "SVM_RESUMED"}

# --- libxc image header (big-endian), domain header, record types.
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSIONS = (2, 3)
IHDR_SIZE = 24
IHDR_OPT_BIG_ENDIAN = 1 << 0
DHDR_SIZE = 16
DHDR_TYPE_X86_PV = 0x0001
DHDR_TYPE_X86_HVM = 0x0002
DHDR_TYPES = {DHDR_TYPE_X86_PV: "x86 PV", DHDR_TYPE_X86_HVM: "x86 HVM"}
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

REC_HDR_SIZE = 8
REC_ALIGN = 8
REC_LENGTH_MAX = 128 << 20  # xg_sr_stream_format.h
MAX_BATCH_SIZE = 1024  # pfns per PAGE_DATA record as libxc writes them (4 MiB of data)
REC_TYPE_OPTIONAL = 0x80000000

REC_TYPE_END = 0x00000000
REC_TYPE_PAGE_DATA = 0x00000001
REC_TYPE_X86_PV_INFO = 0x00000002
REC_TYPE_X86_PV_P2M_FRAMES = 0x00000003
REC_TYPE_X86_PV_VCPU_BASIC = 0x00000004
REC_TYPE_X86_PV_VCPU_EXTENDED = 0x00000005
REC_TYPE_X86_PV_VCPU_XSAVE = 0x00000006
REC_TYPE_SHARED_INFO = 0x00000007
REC_TYPE_X86_TSC_INFO = 0x00000008
REC_TYPE_HVM_CONTEXT = 0x00000009
REC_TYPE_HVM_PARAMS = 0x0000000A
REC_TYPE_TOOLSTACK = 0x0000000B
REC_TYPE_X86_PV_VCPU_MSRS = 0x0000000C
REC_TYPE_VERIFY = 0x0000000D
REC_TYPE_CHECKPOINT = 0x0000000E
REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST = 0x0000000F
REC_TYPE_STATIC_DATA_END = 0x00000010
REC_TYPE_X86_CPUID_POLICY = 0x00000011
REC_TYPE_X86_MSR_POLICY = 0x00000012

LIBXC_NAMES = {
    REC_TYPE_END: "END",
    REC_TYPE_PAGE_DATA: "PAGE_DATA",
    REC_TYPE_X86_PV_INFO: "X86_PV_INFO",
    REC_TYPE_X86_PV_P2M_FRAMES: "X86_PV_P2M_FRAMES",
    REC_TYPE_X86_PV_VCPU_BASIC: "X86_PV_VCPU_BASIC",
    REC_TYPE_X86_PV_VCPU_EXTENDED: "X86_PV_VCPU_EXTENDED",
    REC_TYPE_X86_PV_VCPU_XSAVE: "X86_PV_VCPU_XSAVE",
    REC_TYPE_SHARED_INFO: "SHARED_INFO",
    REC_TYPE_X86_TSC_INFO: "X86_TSC_INFO",
    REC_TYPE_HVM_CONTEXT: "HVM_CONTEXT",
    REC_TYPE_HVM_PARAMS: "HVM_PARAMS",
    REC_TYPE_TOOLSTACK: "TOOLSTACK",
    REC_TYPE_X86_PV_VCPU_MSRS: "X86_PV_VCPU_MSRS",
    REC_TYPE_VERIFY: "VERIFY",
    REC_TYPE_CHECKPOINT: "CHECKPOINT",
    REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST: "CHECKPOINT_DIRTY_PFN_LIST",
    REC_TYPE_STATIC_DATA_END: "STATIC_DATA_END",
    REC_TYPE_X86_CPUID_POLICY: "X86_CPUID_POLICY",
    REC_TYPE_X86_MSR_POLICY: "X86_MSR_POLICY",
}

# --- PAGE_DATA pfn word: bits 63-60 type (XEN_DOMCTL_PFINFO_* >> 28), 59-52 reserved.
PFN_TYPE_SHIFT = 60
PFN_RESERVED_MASK = 0x0FF0000000000000
PFN_MASK = (1 << 52) - 1

# The page types (XEN_DOMCTL_PFINFO_* >> 28): the one vocabulary of page types, used by the
# codec, the save engine, the pagetable normaliser and the compression alike.
PFINFO_NOTAB = 0x0
PFINFO_L1TAB = 0x1
PFINFO_L2TAB = 0x2
PFINFO_L3TAB = 0x3
PFINFO_L4TAB = 0x4
PFINFO_L1TAB_PIN = 0x9
PFINFO_L2TAB_PIN = 0xA
PFINFO_L3TAB_PIN = 0xB
PFINFO_L4TAB_PIN = 0xC
PFINFO_BROKEN = 0xD
PFINFO_XALLOC = 0xE
PFINFO_XTAB = 0xF
PFINFO_LTABTYPE_MASK = 0x7  # type & mask: 1..4 is a pagetable's level
PFINFO_LPINTAB = 0x8  # the pin bit of the *_PIN types

PFINFO_NAMES = {
    0x0: "NOTAB", 0x1: "L1TAB", 0x2: "L2TAB", 0x3: "L3TAB", 0x4: "L4TAB",
    0x9: "L1TAB_PIN", 0xA: "L2TAB_PIN", 0xB: "L3TAB_PIN", 0xC: "L4TAB_PIN",
    0xD: "BROKEN", 0xE: "XALLOC", 0xF: "XTAB",
}
# Types 5-8 are invalid; BROKEN, XALLOC and XTAB carry no page contents.
PFINFO_INVALID = frozenset({0x5, 0x6, 0x7, 0x8})
PFINFO_NO_DATA = frozenset({PFINFO_BROKEN, PFINFO_XALLOC, PFINFO_XTAB})

# The two sets over the 16 types, as lookup tables for whole arrays of types.
_VALID = np.ones(16, dtype=np.bool_)
_VALID[list(PFINFO_INVALID)] = False
_DATA = np.ones(16, dtype=np.bool_)
_DATA[list(PFINFO_NO_DATA)] = False


def valid_types(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per entry: a type the stream may carry (0..15 but not 5..8)."""
    ok: npt.NDArray[np.bool_] = (types <= 0xF) & _VALID[types & 0xF]
    return ok


def carries_data(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per entry of a PAGE_DATA record: its page's contents follow (every type but BROKEN,
    XALLOC and XTAB; callers reject the invalid types 5..8 first)."""
    data: npt.NDArray[np.bool_] = _DATA[types & 0xF]
    return data


def pad8(n: int) -> int:
    """Length ``n`` rounded up to the 8-octet record alignment."""
    return (n + 7) & ~7
