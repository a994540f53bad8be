"""One save of one domain, from the command line's point of view: find the domain, take
its lock, open the Xen handles, pick PV, PVH or HVM (with its device model), run the
engine, and leave the guest as the caller asked (destroyed, running, or paused) or, on
failure, running as it was."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from xen_remus.errors import XenRemusError
from xen_remus.paths import run_dir
from xen_remus.save.devmodel import DeviceModel, check_hvm_guest
from xen_remus.save.emit import FdEmitter
from xen_remus.save.engine import SaveEngine, SaveStats
from xen_remus.save.hvm import HvmGuest
from xen_remus.save.ops import GuestSaveOps
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.pv import PvGuest
from xen_remus.save.xenops import XenDomain
from xen_remus.xen import ForeignMemory, NoSuchDomain, XenCtrl, XenStore

log = logging.getLogger(__name__)


class DomainBusy(XenRemusError):
    """Another save/migration of the same domain holds its lock."""


class ToolError(XenRemusError):
    """A stock xl command we rely on for control (config, destroy, rename) failed."""


@dataclass
class Target:
    domid: int
    name: str


def find_domain(xc: XenCtrl, xs: XenStore, spec: str) -> Target:
    """A domain by id or by name (xenstore /local/domain/N/name), as xl accepts either."""
    doms = [d for d in xc.domains() if d.domid != 0 and not d.dying]
    if spec.isdigit():
        for d in doms:
            if d.domid == int(spec):
                return Target(d.domid, xs.read(f"/local/domain/{d.domid}/name") or spec)
    for d in doms:
        if xs.read(f"/local/domain/{d.domid}/name") == spec:
            return Target(d.domid, spec)
    raise NoSuchDomain("find domain", None, 3, f"no domain named or numbered {spec!r}")


def xl(*args: str, timeout: float = 60.0) -> str:
    """Run a stock xl control command (never for the page data) and return its stdout."""
    try:
        p = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError(f"xl {' '.join(args)}: {exc}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ToolError(f"xl {' '.join(args)} exited {p.returncode}: {last}")
    return p.stdout


def domain_config_json(domid: int) -> str:
    """The domain's libxl configuration as JSON, as `xl save` writes it: `xl list -l` prints
    the same libxl_domain_config JSON, wrapped in [{"domid": N, "config": {...}}]."""
    out = xl("list", "-l", str(domid))
    try:
        doc = json.loads(out)
        return json.dumps(doc[0]["config"], indent=4)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ToolError(f"xl list -l {domid}: output is not the JSON config ({exc})") from None


@contextmanager
def domain_lock(domid: int) -> Iterator[None]:
    """Exclusive, non-blocking: a second save/migrate of the same domain is refused."""
    run_dir().mkdir(parents=True, exist_ok=True)
    path = run_dir() / f"save-{domid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DomainBusy(f"domain {domid} is already being saved or migrated "
                             f"(lock {path} held)") from None
        yield
    finally:
        os.close(fd)


class SaveSession:
    """Open Xen handles and the guest-type ops of one domain; ``save(fd)`` writes one
    complete stream. Use as a context manager."""

    def __init__(self, spec: str) -> None:
        self.xc = XenCtrl()
        self.fmem = ForeignMemory()
        self.xs = XenStore()
        self.target = find_domain(self.xc, self.xs, spec)
        self.guest: GuestSaveOps | None = None
        self.dom: XenDomain | None = None
        self.dm: DeviceModel | None = None  # an HVM guest's qemu-xen
        self.engine: SaveEngine | None = None

    def __enter__(self) -> SaveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_guest(self) -> GuestSaveOps:
        domid = self.target.domid
        info = self.xc.domain_info(domid)
        if info.pv:
            self.guest = PvGuest(self.xc, self.fmem, domid)
        elif info.pvh:
            self.guest = HvmGuest(self.xc, domid)
        else:
            check_hvm_guest(domid, self.target.name, self.xs,
                            lambda param: self.xc.hvm_param(domid, param))
            self.guest = HvmGuest(self.xc, domid)
            self.dm = DeviceModel(domid, self.xs)
        self.dom = XenDomain(self.xc, self.fmem, self.xs, domid, self.guest.nr_pfns())
        return self.guest

    def save(self, fd: int, xl_config: str | None, policy: PrecopyPolicy,
             what: str = "stream", handover: bool = False) -> SaveStats:
        """``handover``: another host takes the guest over (a migration): its device
        model, if any, lets go of the disk images as it saves its state."""
        guest = self.guest or self.open_guest()
        assert self.dom is not None
        out = FdEmitter(fd, xl_config, what=what)
        if self.dm is not None:
            self.dm.handover = handover
        self.engine = SaveEngine(self.dom, guest, out, policy, dm=self.dm)
        stats = self.engine.run()
        log.info("domain %d saved (%s): %s, %d bytes, suspend via %s", self.target.domid,
                 what, stats.summary(), out.offset, self.dom.suspend_method)
        return stats

    def resume(self) -> None:
        if self.engine is not None:
            self.engine.resume()

    def release_guest(self) -> None:
        """Unmap what we hold of the guest (p2m, m2p, bitmap, event channel): a domain
        destroyed while dom0 still maps its pages lingers as a zombie. Drop the device
        model's saved state."""
        for obj in (self.dom, self.guest, self.dm):
            if obj is not None:
                try:
                    obj.close()
                except (XenRemusError, OSError) as exc:
                    log.warning("closing: %s", exc)
        self.dom = self.guest = self.dm = None

    def destroy(self, xl_cmd: Callable[..., str] | None = None) -> None:
        """Destroy the saved domain, as `xl save` and `xl migrate` do on success."""
        self.release_guest()
        (xl_cmd or xl)("destroy", str(self.target.domid))

    def close(self) -> None:
        self.release_guest()
        self.xs.close()
        self.fmem.close()
        self.xc.close()
