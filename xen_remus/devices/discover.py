"""A domain's devices, from xenstore: its vifs, as netbuf devices."""

from __future__ import annotations

from typing import Any, Protocol

from xen_remus.devices.base import DeviceSet
from xen_remus.devices.netbuf import NetbufError, NetBuffer, ifb_name


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
               **kw: Any) -> DeviceSet:
    """The checkpointed devices of ``domid`` (``net=False``: no buffering, like ``xl -n``).

    Use it around the epoch loop: ``with device_set(domid) as devs: ...``.
    """
    return DeviceSet(netbufs_for_domain(domid, xs, **kw) if net else [])
