"""Typed bindings to the Xen 4.17 toolstack libraries (ctypes) and xenstore (pyxs).

The only package that calls ctypes. Entry points:

- ``XenCtrl`` (libxenctrl): domains(), domain_info(), pause/unpause, resume(fast),
  guest_width, maximum_gpfn, log-dirty enable/clean/peek/off with a ``DirtyBitmap``,
  pfn_types, vcpu_context / vcpu_extended_context / vcpu_xsave / vcpu_extstate_raw /
  vcpu_msrs, tsc_info, cpu_policy, hvm_context, hvm_param.
- ``ForeignMemory`` (libxenforeignmemory): map(domid, frames) -> ``Mapping`` (memoryview,
  per-frame errors).
- ``P2M`` / ``M2P`` / ``read_shared_info``: a PV guest's p2m and Xen's m2p as numpy views.
- ``VcpuContext``: typed view of a PV vcpu_guest_context (x86_64 / x86_32).
- ``XenStore`` (pyxs) and ``Suspender`` (suspend event channel or control/shutdown).

Every failure raises a ``XenError`` (a ``XenRemusError``) naming the call, domain and errno.
Importing this package needs no Xen; the libraries load on first use.
"""

from xen_remus.xen.ctrl import ShadowStats, XenCtrl
from xen_remus.xen.domain import DomainInfo
from xen_remus.xen.errors import (
    GuestStateError,
    MappingError,
    NoSuchDomain,
    SuspendError,
    XenCallError,
    XenError,
    XenLibraryError,
)
from xen_remus.xen.hcbuf import DirtyBitmap, HypercallBuffer
from xen_remus.xen.memory import ForeignMemory, Mapping
from xen_remus.xen.p2m import M2P, P2M, SharedInfoArch, parse_shared_info, read_shared_info
from xen_remus.xen.state import CpuPolicy, TscInfo
from xen_remus.xen.suspend import Suspender
from xen_remus.xen.vcpu import VcpuContext
from xen_remus.xen.xenstore import XenStore, XenStoreError

__all__ = [
    "CpuPolicy", "DirtyBitmap", "DomainInfo", "ForeignMemory", "GuestStateError",
    "HypercallBuffer", "M2P", "Mapping", "MappingError", "NoSuchDomain", "P2M",
    "SharedInfoArch", "ShadowStats", "SuspendError", "Suspender", "TscInfo", "VcpuContext",
    "XenCallError", "XenCtrl", "XenError", "XenLibraryError", "XenStore", "XenStoreError",
    "parse_shared_info", "read_shared_info",
]
