"""Output commit for one vif: the guest's packets leave only once their epoch is committed.

    vifD.N ingress qdisc (ffff:) -- matchall, every protocol --> mirred egress redirect
        --> IFB xrifbD.N -- root plug qdisc (1:) holds the packets, one epoch at a time

All through pyroute2 (Debian 12's 0.7.2 in dom0, PyPI's current one on the host); no tc/ip.

sch_plug keeps per epoch only a packet count: TCQ_PLUG_BUFFER seals what was queued since
the last BUFFER as "the last epoch" (overwriting any sealed epoch not yet released) and
TCQ_PLUG_RELEASE_ONE lets exactly that many packets out. So at most one sealed epoch may
wait for its commit: postsuspend(N+1) before commit(N) is refused, as is any commit but of
the sealed epoch. The plug starts closed: output from setup() on is held until the first
postsuspend and commit.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

from xen_remus.devices.base import Device, DeviceError
from xen_remus.devices.kmod import Modules
from xen_remus.devices.runstate import Owner, StateDir, owner_of

MODULES = ("ifb", "sch_plug", "sch_ingress", "act_mirred", "cls_matchall")
INGRESS = 0xFFFF0000  # ffff:
PLUG = 0x10000  # 1:
ETH_P_ALL = 0x0003
DEFAULT_LIMIT = 10 * 1024 * 1024  # bytes held at most (sch_plug drops beyond; 0 drops all)
IFNAMSIZ = 16  # with the NUL
# pyroute2's sched_plug maps action NAMES to numbers; a number is silently taken as BUFFER.
BUFFER, RELEASE_ONE, RELEASE_ALL = ("TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE",
                                    "TCQ_PLUG_RELEASE_INDEFINITE")
# Which module a failing step most likely lacks (a kernel without modules cannot pre-check).
_STEP_MODULE = {"add ifb": "ifb", "add plug qdisc": "sch_plug",
                "add ingress qdisc": "sch_ingress",
                "add matchall filter": "cls_matchall or act_mirred"}


_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)  # already absent: nothing to remove


class NetbufError(DeviceError):
    """A network buffering step failed; names the vif/ifb, the step and the netlink error."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the netlink errno, when the kernel refused


def ifb_name(domid: int, devid: int) -> str:
    name = f"xrifb{domid}.{devid}"
    if len(name) >= IFNAMSIZ:
        raise NetbufError(f"netbuf: IFB name {name} for vif{domid}.{devid} is longer than "
                          f"{IFNAMSIZ - 1} characters (IFNAMSIZ)")
    return name


def _netlink_errors() -> tuple[type[BaseException], ...]:
    try:
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return (OSError,)
    return (NetlinkError, OSError)


def _code(exc: BaseException) -> int:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return code if isinstance(code, int) else errno.EIO


def _default_iproute() -> Any:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise NetbufError("netbuf: pyroute2 is not installed (Debian: python3-pyroute2)"
                          ) from None
    return IPRoute()


class NetBuffer(Device):
    """Output buffering of one vif through its own IFB and plug qdisc."""

    order = 10  # after disks

    def __init__(self, vif: str, ifb: str, *, limit: int = DEFAULT_LIMIT,
                 iproute: Callable[[], Any] = _default_iproute,
                 state: StateDir | None = None, modules: Modules | None = None) -> None:
        if len(vif) >= IFNAMSIZ or len(ifb) >= IFNAMSIZ:
            raise NetbufError(f"netbuf: interface name {vif!r} or {ifb!r} exceeds IFNAMSIZ")
        self.vif, self.ifb, self.limit = vif, ifb, limit
        self._iproute = iproute
        self._state = state or StateDir("netbuf")
        self._modules = modules or Modules()
        self._ip: Any = None
        self._ifb_index: int | None = None
        self.sealed: int | None = None  # epoch whose output waits for commit
        self.committed: int | None = None  # last epoch released

    @property
    def name(self) -> str:
        return f"netbuf {self.vif} -> {self.ifb}"

    # -- netlink, with errors that say where -------------------------------------------
    def _call(self, step: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except _netlink_errors() as exc:
            code = _code(exc)
            hint = ""
            module = _STEP_MODULE.get(step)
            if module and code in (errno.ENOENT, errno.EOPNOTSUPP):
                hint = f" (is kernel module {module} available?)"
            raise NetbufError(
                f"{self.name}: {step}: netlink error {code} "
                f"({errno.errorcode.get(code, '?')}, {os.strerror(code)}){hint}", code) from None

    def _index(self, ifname: str) -> int | None:
        found = self._call(f"look up {ifname}", self._ip.link_lookup, ifname=ifname)
        return int(found[0]) if found else None

    def _has_ingress(self, index: int) -> bool:
        qdiscs = self._call(f"list qdiscs of {self.vif}", self._ip.get_qdiscs, index=index)
        return any(q.get_attr("TCA_KIND") == "ingress" for q in qdiscs)

    def _plug(self, action: str) -> None:
        if self._ifb_index is None:
            raise NetbufError(f"{self.name}: {action} before setup")
        self._call(f"plug {action}", self._ip.tc, "change", "plug", self._ifb_index, PLUG,
                   action=action)

    def _open(self) -> None:
        if self._ip is None:
            self._ip = self._iproute()

    # -- Device ------------------------------------------------------------------------
    def setup(self) -> None:
        self._modules.require("netbuf", MODULES)
        self._open()
        me = Owner.me()
        with self._state.locked():
            self._recover_stale(me)
            record = self._state.read(self.vif)
            if record is not None and not record.get("corrupt"):
                owner = owner_of(record)
                if owner is not None and owner.alive() and owner != me:
                    raise NetbufError(f"{self.name}: {self.vif} is buffered by another "
                                      f"xen-remus (pid {owner.pid})")
                self._remove(record)  # ours: replace it cleanly
            vif_index = self._index(self.vif)
            if vif_index is None:
                raise NetbufError(f"{self.name}: no interface {self.vif}")
            leftover_ifb = self._index(self.ifb) is not None
            if self._has_ingress(vif_index) and not leftover_ifb:
                raise NetbufError(
                    f"{self.name}: {self.vif} already has an ingress qdisc that xen-remus did "
                    f"not set up (xl's remus netbuf script?); remove it first")
            self._state.write(self.vif, {"vif": self.vif, "ifb": self.ifb}, me)
            if leftover_ifb:
                self._remove({"vif": self.vif, "ifb": self.ifb})
            try:
                self._create(vif_index)
            except BaseException:
                self._ifb_index = None
                self._remove({"vif": self.vif, "ifb": self.ifb})
                self._state.remove(self.vif)
                raise
        self.sealed = self.committed = None

    def _create(self, vif_index: int) -> None:
        ip = self._ip
        self._call("add ifb", ip.link, "add", ifname=self.ifb, kind="ifb")
        ifb_index = self._index(self.ifb)
        if ifb_index is None:
            raise NetbufError(f"{self.name}: {self.ifb} vanished after it was added")
        self._ifb_index = ifb_index
        # The plug goes on before the redirect: no packet may cross the IFB unbuffered.
        self._call("add plug qdisc", ip.tc, "add", "plug", ifb_index, PLUG, limit=self.limit)
        self._call(f"set {self.ifb} up", ip.link, "set", index=ifb_index, state="up")
        self._call("add ingress qdisc", ip.tc, "add", "ingress", vif_index, INGRESS)
        self._call("add matchall filter", ip.tc, "add-filter", "matchall", vif_index,
                   parent=INGRESS, prio=1, protocol=ETH_P_ALL,
                   action={"kind": "mirred", "direction": "egress", "action": "redirect",
                           "ifindex": ifb_index})

    def postsuspend(self, epoch: int) -> None:
        if self.sealed is not None:
            raise NetbufError(f"{self.name}: postsuspend of epoch {epoch} while epoch "
                              f"{self.sealed} awaits its commit (sch_plug seals one epoch)")
        if self.committed is not None and epoch <= self.committed:
            raise NetbufError(f"{self.name}: postsuspend of epoch {epoch} after epoch "
                              f"{self.committed} was committed (epochs must increase)")
        self._plug(BUFFER)
        self.sealed = epoch

    def commit(self, epoch: int) -> None:
        if self.sealed != epoch:
            held = "none" if self.sealed is None else f"epoch {self.sealed}"
            raise NetbufError(f"{self.name}: commit of epoch {epoch} out of order "
                              f"(sealed: {held}, last committed: {self.committed})")
        self._plug(RELEASE_ONE)
        self.sealed, self.committed = None, epoch

    def release_all(self) -> None:
        """Open the plug for good (a later postsuspend closes it again: new epochs) and
        give what it held a moment to leave, so that a teardown right after drops none."""
        self._plug(RELEASE_ALL)
        self.sealed = None
        assert self._ifb_index is not None  # _plug checked
        self._drain(self._ifb_index)

    def teardown(self) -> None:
        """Delete the IFB (what its plug still holds is dropped), then unhook the vif.
        Releasing is release_all()'s job, called first when the guest goes on here."""
        if self._ip is None:
            return  # never set up
        try:
            with self._state.locked():
                record = self._state.read(self.vif)
                owner = owner_of(record) if record else None
                if record is None and self._ifb_index is not None:
                    record = {"vif": self.vif, "ifb": self.ifb}  # state file lost: ours
                if record is not None and (owner is None or owner == Owner.me()):
                    self._remove(record)
                    self._state.remove(self.vif)
        finally:
            self._ifb_index = None
            self.sealed = None
            ip, self._ip = self._ip, None
            ip.close()

    # -- removal, also of a crashed run's leftovers --------------------------------------
    def _remove(self, record: dict[str, Any]) -> None:
        """Remove what ``record`` names; absent pieces are fine; every piece is tried."""
        vif, ifb = record.get("vif"), record.get("ifb")
        failures: list[NetbufError] = []

        def attempt(step: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
            try:
                self._call(step, fn, *args, **kw)
            except NetbufError as exc:
                if exc.code not in _GONE:
                    failures.append(exc)

        ifb_index = self._index(ifb) if isinstance(ifb, str) else None
        vif_index = self._index(vif) if isinstance(vif, str) else None
        if vif_index is not None and self._has_ingress(vif_index):
            attempt(f"delete ingress qdisc of {vif}", self._ip.tc, "del", "ingress",
                    vif_index, INGRESS)
        if ifb_index is not None:
            attempt(f"delete {ifb}", self._ip.link, "del", index=ifb_index)
        if failures:
            raise NetbufError("; ".join(str(f) for f in failures))

    def _drain(self, ifb_index: int, timeout: float = 0.2) -> None:
        """Give the released packets a moment to leave before the IFB is deleted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _queued(self._ip, ifb_index):
                return
            time.sleep(0.005)

    def _recover_stale(self, me: Owner) -> None:
        _recover(self._state, me, self.vif, self._ip)


def recover(*, state: StateDir | None = None,
            iproute: Callable[[], Any] = _default_iproute) -> list[str]:
    """Tear down what crashed xen-remus runs left behind (owner dead); the vifs cleaned."""
    state = state or StateDir("netbuf")
    if not state.keys():
        return []
    ip = iproute()
    try:
        with state.locked():
            return _recover(state, Owner.me(), None, ip)
    finally:
        ip.close()


def _recover(state: StateDir, me: Owner, skip: str | None, ip: Any) -> list[str]:
    """Under the lock: remove every record of a dead owner, and what it names."""
    cleaned = []
    for key in state.keys():
        record = state.read(key)
        if record is None or key == skip:
            continue
        owner = owner_of(record)
        if owner is not None and (owner.alive() or owner == me):
            continue
        vif, ifb = record.get("vif"), record.get("ifb")
        if isinstance(vif, str) and isinstance(ifb, str):
            leftover = NetBuffer(vif, ifb, iproute=lambda: ip, state=state)
            leftover._ip = ip
            leftover._remove(record)
        state.remove(key)
        cleaned.append(key)
    return cleaned


def _queued(ip: Any, index: int) -> int:
    """Packets still in the plug qdisc of ``index`` (0 if unknown)."""
    try:
        for q in ip.get_qdiscs(index=index):
            if q.get_attr("TCA_KIND") != "plug":
                continue
            stats = q.get_attr("TCA_STATS2")
            queue = stats.get_attr("TCA_STATS_QUEUE") if stats is not None else None
            if queue is not None:
                return int(queue["qlen"])
    except Exception:
        return 0
    return 0
