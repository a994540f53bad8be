"""The device model of an HVM guest (qemu-xen in dom0) as one more participant of a save:
the part libxl plays around libxc's stream, through QEMU's QMP socket.

    live rounds        QEMU marks what it writes into guest memory (DMA, the VGA memory)
                       dirty too: xen-set-global-dirty-log on, off when the save ends
    guest suspended -> QMP stop, then xen-save-devices-state into a file in dom0 (passed
                       to QEMU as an fd: add-fd), and the physmap keys QEMU keeps in
                       xenstore; before the last dirty pages are read, so that QEMU's
                       last writes into guest memory belong to this checkpoint
    after libxc's      EMULATOR_XENSTORE_DATA (if QEMU has physmap keys), EMULATOR_CONTEXT
    CHECKPOINT / END   (libxl layer), then CHECKPOINT_END / END: libxl's order
    guest resumes   <- QMP cont, before the guest's vCPUs run (a stopped QEMU serves no I/O)

It is not a Device (devices/base.py): a device's postsuspend comes after the page copy,
and QEMU must stop before it; its output is stream records that only the engine places;
and a one-shot save or migration, which has no devices, needs it all the same.

Every QMP exchange is its own short connection: QEMU serves one client at a time, and
libxl connects to the same socket for its own commands.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from xen_remus.errors import XenRemusError
from xen_remus.paths import run_dir
from xen_remus.stream import consts as C
from xen_remus.stream import encoder
from xen_remus.stream.events import Buffer
from xen_remus.stream.libxl_bodies import Emulator, EmulatorXenstoreData
from xen_remus.xen import structs as S
from xen_remus.xen.qmp import COMMAND_TIMEOUT, QMP_SOCKET, QmpClient, QmpError

# libxl's xenstore keys (libxl_dm.c, libxl_dom_save.c) for the device model of DOMID.
DM_VERSION_KEY = "/libxl/{domid}/dm-version"  # "qemu_xen" for qemu-xen
STUBDOM_KEY = "/local/domain/{domid}/image/device-model-domid"
DM_XS_ROOT = "/local/domain/0/device-model/{domid}"  # a dom0 device model's directory
PHYSMAP_KEYS = ("start_addr", "size", "name")  # of each physmap/<id>, in libxl's order
QEMU_XEN = "qemu_xen"


class UnsupportedGuest(XenRemusError):
    """The domain cannot be saved by xen-remus; the message names it and says why."""


class DeviceModelError(XenRemusError):
    """The device model's state could not be saved (names the domain and the step)."""


class _Store(Protocol):
    def read(self, path: str) -> str | None: ...
    def list(self, path: str) -> list[str]: ...


def check_hvm_guest(domid: int, name: str, xs: _Store,
                    hvm_param: Callable[[int], int]) -> None:
    """Refuse, naming the domain, an HVM guest whose device model we cannot drive (not
    qemu-xen, or in a stub domain) or that cannot be suspended cooperatively: without PV
    drivers (no event channel callback) a guest never answers a suspend request, and
    stock libxl then suspends it without its knowledge, which fast resume cannot undo."""
    what = f"domain {domid} ({name}) is an HVM guest"
    version = xs.read(DM_VERSION_KEY.format(domid=domid))
    if version != QEMU_XEN:
        raise UnsupportedGuest(f"{what} whose device model is {version or 'not recorded'} "
                               f"({DM_VERSION_KEY.format(domid=domid)}): only qemu-xen "
                               "(device_model_version='qemu-xen') is supported")
    stubdom = xs.read(STUBDOM_KEY.format(domid=domid))
    if stubdom not in (None, "", "0"):
        raise UnsupportedGuest(f"{what} with its device model in stub domain {stubdom}: "
                               "only a device model in dom0 is supported")
    if hvm_param(S.HVM_PARAM_CALLBACK_IRQ) == 0:
        raise UnsupportedGuest(f"{what} without PV drivers (HVM_PARAM_CALLBACK_IRQ is 0: "
                               "no xen-platform-pci/xenbus driver running), so it cannot "
                               "suspend itself for a checkpoint; load the guest's Xen PV "
                               "drivers first")
    if (state := hvm_param(S.HVM_PARAM_ACPI_S_STATE)) != 0:
        raise UnsupportedGuest(f"{what} in ACPI sleep state S{state}: wake it up first")


class DeviceModel:
    """qemu-xen of HVM domain ``domid``: the save engine's DeviceModelOps (save/ops.py).

    ``handover``: the saved state is for another QEMU to take over (a migration), so QEMU
    lets go of its disk images as it saves (xen-save-devices-state's ``live``); False for
    a save to a file and for Remus checkpoints, after which this QEMU runs on."""

    def __init__(self, domid: int, xs: _Store, *, socket: str | None = None,
                 save_path: Path | None = None, timeout: float = COMMAND_TIMEOUT,
                 connect: Callable[[str, float], QmpClient] = QmpClient.connect) -> None:
        self.domid, self.xs = domid, xs
        self.socket = socket or QMP_SOCKET.format(domid=domid)
        self.save_path = save_path or run_dir() / f"qemu-save.{domid}"
        self.timeout = timeout
        self.handover = False
        self.stopped = False
        self.state = b""  # the last saved device state
        self.xenstore_data = b""  # and the physmap keys with it
        self._connect = connect

    def _qmp(self) -> QmpClient:
        return self._connect(self.socket, self.timeout)

    def logdirty(self, enable: bool) -> None:
        with self._qmp() as q:
            q.execute("xen-set-global-dirty-log", {"enable": enable})

    def suspend(self) -> None:
        with self._qmp() as q:
            q.execute("stop")
            self.stopped = True
            self.state = self._save(q)
        self.xenstore_data = physmap_data(self.xs, self.domid)

    def _save(self, q: QmpClient) -> bytes:
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.save_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        try:
            added = q.execute("add-fd", fd=fd)
        finally:
            os.close(fd)
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            raise DeviceModelError(f"domain {self.domid}: QMP add-fd returned {added!r}, "
                                   "no fdset-id")
        try:
            q.execute("xen-save-devices-state",
                      {"filename": f"/dev/fdset/{fdset}", "live": self.handover})
        except BaseException:
            with contextlib.suppress(QmpError):  # the save's error is the one to see
                q.execute("remove-fd", {"fdset-id": fdset})
            raise
        q.execute("remove-fd", {"fdset-id": fdset})
        data = self.save_path.read_bytes()
        if not data:
            raise DeviceModelError(f"domain {self.domid}: the device model saved an empty "
                                   f"state into {self.save_path}")
        return data

    def resume(self) -> None:
        with self._qmp() as q:
            q.execute("cont")
        self.stopped = False

    def records(self) -> list[list[Buffer]]:
        out = []
        if self.xenstore_data:
            out.append(encoder.record(C.LIBXL_EMULATOR_XENSTORE_DATA, EmulatorXenstoreData(
                C.EMULATOR_QEMU_UPSTREAM, 0, self.xenstore_data)))
        out.append(encoder.record(C.LIBXL_EMULATOR_CONTEXT,
                                  Emulator(C.EMULATOR_QEMU_UPSTREAM, 0, self.state)))
        return out

    def close(self) -> None:
        self.save_path.unlink(missing_ok=True)


def physmap_data(xs: _Store, domid: int) -> bytes:
    """EMULATOR_XENSTORE_DATA's body: the physmap entries QEMU wrote (where it moved guest
    memory, e.g. the VGA memory to its PCI BAR), as packed NUL-terminated "physmap/ID/KEY"
    and value pairs; b"" when there are none. A restoring libxl writes them back before it
    starts QEMU, which needs them to find that memory again."""
    root = DM_XS_ROOT.format(domid=domid)
    pairs = []
    for ent in xs.list(f"{root}/physmap"):
        for key in PHYSMAP_KEYS:
            rel = f"physmap/{ent}/{key}"
            value = xs.read(f"{root}/{rel}")
            if value is None:
                raise DeviceModelError(f"domain {domid}: {root}/{rel} is missing (QEMU's "
                                       "physmap entry is incomplete)")
            pairs.append((rel, value))
    return bytes(EmulatorXenstoreData.from_pairs(pairs).data)
