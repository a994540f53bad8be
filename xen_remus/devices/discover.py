"""A domain's devices, from xenstore: its vifs, as netbuf devices; its disks, as
replicated disks when their hotplug script is block-remus."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from xen_remus.devices.base import Device, DeviceError, DeviceSet
from xen_remus.devices.netbuf import NetbufError, NetBuffer, ifb_name

# block-remus writes the path of the disk server's replication socket here, in the
# disk's backend directory.
REPLICA_KEY = "xen-remus-replica"


class _Store(Protocol):
    def read(self, path: str) -> str | None: ...
    def list(self, path: str) -> list[str]: ...
    def domain_path(self, domid: int) -> str: ...


def domain_vifs(xs: _Store, domid: int) -> list[tuple[int, str]]:
    """(devid, backend interface name) of each vif of ``domid``, by devid.

    The name is the backend's ``vifname`` (xl's ``vifname=``) or, by default, vifD.N.
    Only dom0 backends can be buffered here: a driver domain's vif is not our interface.
    """
    front = f"{xs.domain_path(domid)}/device/vif"
    vifs = []
    for dev in sorted(xs.list(front), key=lambda d: int(d) if d.isdigit() else -1):
        if not dev.isdigit():
            continue
        backend_id = xs.read(f"{front}/{dev}/backend-id")
        if backend_id not in (None, "0"):
            raise NetbufError(f"netbuf: vif {dev} of domain {domid} has its backend in domain "
                              f"{backend_id}; only dom0 backends can be buffered")
        backend = xs.read(f"{front}/{dev}/backend") or f"/local/domain/0/backend/vif/{domid}/{dev}"
        name = xs.read(f"{backend}/vifname") or f"vif{domid}.{dev}"
        vifs.append((int(dev), name))
    return vifs


@dataclass(frozen=True)
class DiskInfo:
    vdev: str  # the guest's name for it (xvda)
    params: str  # the backend's target (image path, phy device, ...)
    script: str  # the block hotplug script, "" for none
    replica: str | None  # block-remus: the server's replication socket

    @property
    def replicable(self) -> bool:
        return os.path.basename(self.script) == "block-remus" and bool(self.replica)


def domain_disks(xs: _Store, domid: int) -> list[DiskInfo]:
    """The vbds of ``domid``, by devid, as their dom0 backends describe them."""
    front = f"{xs.domain_path(domid)}/device/vbd"
    disks = []
    for dev in sorted(xs.list(front), key=lambda d: int(d) if d.isdigit() else -1):
        if not dev.isdigit():
            continue
        backend = xs.read(f"{front}/{dev}/backend") or f"/local/domain/0/backend/vbd/{domid}/{dev}"
        disks.append(DiskInfo(xs.read(f"{backend}/dev") or dev, xs.read(f"{backend}/params") or "",
                              xs.read(f"{backend}/script") or "",
                              xs.read(f"{backend}/{REPLICA_KEY}")))
    return disks


def read_disks(domid: int) -> list[DiskInfo]:
    from xen_remus.xen.xenstore import XenStore

    with XenStore() as store:
        return domain_disks(store, domid)


def netbufs_for_domain(domid: int, xs: _Store | None = None, **kw: Any) -> list[NetBuffer]:
    """One NetBuffer per vif of ``domid`` (``kw`` goes to NetBuffer, e.g. ``limit``)."""
    if xs is None:
        from xen_remus.xen.xenstore import XenStore

        with XenStore() as store:
            vifs = domain_vifs(store, domid)
    else:
        vifs = domain_vifs(xs, domid)
    return [NetBuffer(vif, ifb_name(domid, devid), **kw) for devid, vif in vifs]


def device_set(domid: int, *, net: bool = True, xs: _Store | None = None,
               disks: Sequence[Device] = (), **kw: Any) -> DeviceSet:
    """The checkpointed devices of ``domid`` (``net=False``: no buffering, like ``xl -n``)
    with ``disks`` (replicated disks, committed before the network).

    Use it around the epoch loop: ``with device_set(domid) as devs: ...``.
    """
    return DeviceSet([*disks, *(netbufs_for_domain(domid, xs, **kw) if net else [])])


def unreplicable(disks: Sequence[DiskInfo]) -> DeviceError | None:
    """Why these disks cannot all be replicated, or None."""
    bad = [d for d in disks if not d.replicable]
    if not bad:
        return None
    names = ", ".join(f"{d.vdev} ({d.params or 'no target'}, script "
                      f"{d.script or 'none'})" for d in bad)
    return DeviceError(f"cannot replicate disk(s) {names}: only disks served by the "
                       "block-remus hotplug script are replicated (script=block-remus in "
                       "the disk spec); add -d -F to protect without disk replication")
