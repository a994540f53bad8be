"""Output commit for one vif: the guest's packets leave only once their epoch is committed.

    vifD.N ingress qdisc (ffff:) -- matchall, every protocol --> mirred egress redirect
        --> IFB xrifbD.N -- root plug qdisc (1:) holds the packets, one epoch at a time

All through pyroute2 (Debian 12's 0.7.2 in dom0, PyPI's current one on the host); no tc/ip.

sch_plug keeps per epoch only a packet count: TCQ_PLUG_BUFFER seals what was queued since
the last BUFFER as "the last epoch" (overwriting any sealed epoch not yet released) and
TCQ_PLUG_RELEASE_ONE lets exactly that many packets out. So one plug holds at most one
sealed epoch (and the open one behind it). The plug starts closed: output from setup() on
is held until the first postsuspend and commit.

Pipelined epochs (``depth`` D > 1, several epochs awaiting their ACK): a ring of D IFBs,
xrifbD.N, xrifbD.N-1, ..., each with its own plug. The open epoch's packets go to one IFB
of the ring; postsuspend(N), the guest suspended, points the vif's redirect at the next
IFB (which holds at most epoch N+1-D, sealed: its plug keeps that and counts the new
open epoch) and seals N on the IFB it leaves. commit(N) releases epoch N's IFB; commits
come in epoch order, and before releasing an IFB we wait (briefly, bounded) until the
previous epoch's packets have left theirs, so epochs reach the bridge in order too (each
IFB drains in its own softirq). The redirect moves by adding a matchall filter at the
other of two priorities and deleting the old one: cls_matchall refuses to replace a
filter in place (EEXIST), and a gap between delete and add would let packets bypass the
plugs. At most D epochs may be sealed and not committed: postsuspend beyond that is
refused, as is any commit but of the oldest sealed epoch. D = 1 is one IFB, no switch.
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
DEPTH_RANGE = (1, 8)  # epochs awaiting their ACK at once (protect --pipeline); one IFB each
FILTER_PRIOS = (1, 2)  # the redirect alternates between them (pipelined only)
ORDER_WAIT_S = 0.05  # at most this long for an epoch's packets to leave before the next's
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


def ring_names(ifb: str, depth: int) -> list[str]:
    """The IFBs of a ring of ``depth``: ``ifb`` itself (as without pipelining), then
    ``ifb``-1 ... ``ifb``-(depth-1)."""
    lo, hi = DEPTH_RANGE
    if not lo <= depth <= hi:
        raise NetbufError(f"netbuf: pipeline depth {depth} for {ifb} is not in {lo}..{hi}")
    names = [ifb] + [f"{ifb}-{k}" for k in range(1, depth)]
    for name in names:
        if len(name) >= IFNAMSIZ:
            raise NetbufError(f"netbuf: IFB name {name} (pipeline depth {depth}) is longer "
                              f"than {IFNAMSIZ - 1} characters (IFNAMSIZ)")
    return names


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
    """Output buffering of one vif through its own IFB and plug qdisc (a ring of ``depth``
    of them when epochs are pipelined)."""

    order = 10  # after disks

    def __init__(self, vif: str, ifb: str, *, limit: int = DEFAULT_LIMIT, depth: int = 1,
                 iproute: Callable[[], Any] = _default_iproute,
                 state: StateDir | None = None, modules: Modules | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if len(vif) >= IFNAMSIZ or len(ifb) >= IFNAMSIZ:
            raise NetbufError(f"netbuf: interface name {vif!r} or {ifb!r} exceeds IFNAMSIZ")
        self.vif, self.ifb, self.limit, self.depth = vif, ifb, limit, depth
        self.ifbs = ring_names(ifb, depth)
        self._iproute = iproute
        self._state = state or StateDir("netbuf")
        self._modules = modules or Modules()
        self._clock, self._sleep = clock, sleep
        self._ip: Any = None
        self._ifb_index: list[int] | None = None  # by ring slot, once set up
        self._vif_index: int | None = None
        # Epochs sealed, not yet committed, oldest first: [epoch, slot, drain mark]; the
        # mark (packets the slot's plug will have dequeued once that epoch left) is read
        # before the slot can take packets of a later epoch.
        self._sealed: list[list[Any]] = []
        self._slot = 0  # the ring slot that takes the open epoch's packets
        self._prio = FILTER_PRIOS[0]  # of the matchall filter redirecting to it
        self._unplugged: set[int] = set()  # slots opened for good by release_all
        self._released: tuple[int, int | None] | None = None  # last released (slot, mark)
        self.committed: int | None = None  # last epoch released

    @property
    def name(self) -> str:
        return f"netbuf {self.vif} -> {self.ifb}"

    @property
    def sealed(self) -> int | None:
        """The oldest epoch whose output waits for its commit."""
        return self._sealed[0][0] if self._sealed else None

    @property
    def awaiting(self) -> list[int]:
        """Every epoch whose output waits for its commit, oldest first."""
        return [e for e, _, _ in self._sealed]

    def _record(self) -> dict[str, Any]:
        return {"vif": self.vif, "ifb": self.ifb, "ifbs": self.ifbs}

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

    def _plug(self, action: str, slot: int = 0) -> None:
        if self._ifb_index is None:
            raise NetbufError(f"{self.name}: {action} before setup")
        where = "" if self.depth == 1 else f" of {self.ifbs[slot]}"
        self._call(f"plug {action}{where}", self._ip.tc, "change", "plug",
                   self._ifb_index[slot], PLUG, action=action)

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
            leftover_ifb = any(self._index(name) is not None for name in self.ifbs)
            if self._has_ingress(vif_index) and not leftover_ifb:
                raise NetbufError(
                    f"{self.name}: {self.vif} already has an ingress qdisc that xen-remus did "
                    f"not set up (xl's remus netbuf script?); remove it first")
            self._state.write(self.vif, self._record(), me)
            if leftover_ifb:
                self._remove(self._record())
            try:
                self._create(vif_index)
            except BaseException:
                self._ifb_index = None
                self._remove(self._record())
                self._state.remove(self.vif)
                raise
        self._sealed, self._unplugged, self._released = [], set(), None
        self._slot, self._prio, self.committed = 0, FILTER_PRIOS[0], None

    def _create(self, vif_index: int) -> None:
        ip = self._ip
        self._vif_index = vif_index
        indexes = []
        for name in self.ifbs:
            self._call("add ifb", ip.link, "add", ifname=name, kind="ifb")
            ifb_index = self._index(name)
            if ifb_index is None:
                raise NetbufError(f"{self.name}: {name} vanished after it was added")
            indexes.append(ifb_index)
            self._ifb_index = indexes
            # The plug goes on before the redirect: no packet may cross the IFB unbuffered.
            self._call("add plug qdisc", ip.tc, "add", "plug", ifb_index, PLUG,
                       limit=self.limit)
            self._call(f"set {name} up", ip.link, "set", index=ifb_index, state="up")
        self._call("add ingress qdisc", ip.tc, "add", "ingress", vif_index, INGRESS)
        self._redirect("add matchall filter", vif_index, indexes[0], FILTER_PRIOS[0])

    def _redirect(self, step: str, vif_index: int, ifb_index: int, prio: int) -> None:
        self._call(step, self._ip.tc, "add-filter", "matchall", vif_index,
                   parent=INGRESS, prio=prio, protocol=ETH_P_ALL,
                   action={"kind": "mirred", "direction": "egress", "action": "redirect",
                           "ifindex": ifb_index})

    def postsuspend(self, epoch: int) -> None:
        if len(self._sealed) >= self.depth:
            raise NetbufError(f"{self.name}: postsuspend of epoch {epoch} while "
                              f"{self._held()} await{'s' if len(self._sealed) == 1 else ''} "
                              f"its commit (pipeline depth {self.depth})")
        last = self._sealed[-1][0] if self._sealed else self.committed
        if last is not None and epoch <= last:
            what = "sealed" if self._sealed else "committed"
            raise NetbufError(f"{self.name}: postsuspend of epoch {epoch} after epoch "
                              f"{last} was {what} (epochs must increase)")
        slot = self._slot
        if self.depth > 1:
            nxt = (slot + 1) % self.depth
            for entry in self._sealed:  # at most one: epoch+1-depth, still held there
                if entry[1] == nxt and entry[2] is None:
                    entry[2] = self._mark(nxt)
            if nxt in self._unplugged:  # closed again before anything goes there
                self._plug(BUFFER, nxt)
                self._unplugged.discard(nxt)
            self._switch(nxt)
        else:
            nxt = slot
        self._plug(BUFFER, slot)
        self._unplugged.discard(slot)
        self._sealed.append([epoch, slot, None])
        self._slot = nxt

    def _switch(self, slot: int) -> None:
        """Point the vif's redirect at ring slot ``slot``: the new filter first, then the
        old one goes (packets never pass unredirected)."""
        assert self._ifb_index is not None and self._vif_index is not None
        vif_index = self._vif_index  # looked up at setup: no extra call in the pause
        old, new = self._prio, FILTER_PRIOS[1] if self._prio == FILTER_PRIOS[0] \
            else FILTER_PRIOS[0]
        self._redirect(f"redirect to {self.ifbs[slot]}", vif_index, self._ifb_index[slot], new)
        self._prio = new
        self._call(f"delete the redirect at prio {old}", self._ip.tc, "del-filter",
                   "matchall", vif_index, parent=INGRESS, prio=old, protocol=ETH_P_ALL)

    def commit(self, epoch: int) -> None:
        if not self._sealed or self._sealed[0][0] != epoch:
            raise NetbufError(f"{self.name}: commit of epoch {epoch} out of order "
                              f"(sealed: {self._held()}, last committed: {self.committed})")
        _, slot, mark = self._sealed[0]
        if self.depth > 1:
            if mark is None:  # the slot takes no packets now (postsuspend saw to that)
                mark = self._mark(slot)
            self._await_order(slot)
        self._plug(RELEASE_ONE, slot)
        self._sealed.pop(0)
        self.committed = epoch
        if self.depth > 1:
            self._released = (slot, mark)

    def _held(self) -> str:
        if not self._sealed:
            return "none"
        if len(self._sealed) == 1:
            return f"epoch {self._sealed[0][0]}"
        return "epochs " + ", ".join(str(e) for e, _, _ in self._sealed)

    def _mark(self, slot: int) -> int | None:
        """What slot's plug will have dequeued once everything in it now has left."""
        assert self._ifb_index is not None
        counts = _plug_counts(self._ip, self._ifb_index[slot])
        return None if counts is None else counts[0] + counts[1]

    def _await_order(self, slot: int) -> None:
        """Before releasing ``slot``: wait, at most ORDER_WAIT_S, until the epoch released
        last (from another IFB) has left it, so epochs reach the bridge in order."""
        if self._released is None:
            return
        prev, mark = self._released
        self._released = None
        if prev == slot or mark is None:
            return  # one plug is FIFO; or no counters to tell
        assert self._ifb_index is not None
        deadline = self._clock() + ORDER_WAIT_S
        while True:
            counts = _plug_counts(self._ip, self._ifb_index[prev])
            if counts is None or (counts[0] - mark) % (1 << 32) < (1 << 31):
                return  # dequeued caught up with the mark (a u32 counter: modulo)
            if self._clock() >= deadline:
                return  # bounded: a late packet is reordered, never held or lost
            self._sleep(0.0005)

    def release_all(self) -> None:
        """Open the plugs for good (a later postsuspend closes them again: new epochs) and
        give what they held a moment to leave, so that a teardown right after drops none.
        The oldest epoch's IFB goes first, each drained before the next: epochs stay in
        order on the wire."""
        first = [slot for _, slot, _ in self._sealed]
        for slot in first + [s for s in range(self.depth) if s not in first]:
            self._plug(RELEASE_ALL, slot)
            assert self._ifb_index is not None  # _plug checked
            self._drain(self._ifb_index[slot])
        self._unplugged = set(range(self.depth))
        self._sealed, self._released = [], None

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
                    record = self._record()  # state file lost: ours
                if record is not None and (owner is None or owner == Owner.me()):
                    self._remove(record)
                    self._state.remove(self.vif)
        finally:
            self._ifb_index = None
            self._sealed = []
            ip, self._ip = self._ip, None
            ip.close()

    # -- removal, also of a crashed run's leftovers --------------------------------------
    def _remove(self, record: dict[str, Any]) -> None:
        """Remove what ``record`` names; absent pieces are fine; every piece is tried."""
        vif = record.get("vif")
        failures: list[NetbufError] = []

        def attempt(step: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
            try:
                self._call(step, fn, *args, **kw)
            except NetbufError as exc:
                if exc.code not in _GONE:
                    failures.append(exc)

        ifb_indexes = [(ifb, i) for ifb in _recorded_ifbs(record)
                       if (i := self._index(ifb)) is not None]
        vif_index = self._index(vif) if isinstance(vif, str) else None
        if vif_index is not None and self._has_ingress(vif_index):
            attempt(f"delete ingress qdisc of {vif}", self._ip.tc, "del", "ingress",
                    vif_index, INGRESS)
        for ifb, ifb_index in ifb_indexes:
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


def _recorded_ifbs(record: dict[str, Any]) -> list[str]:
    """The IFBs a state record names: its ring, or (a record of before rings) its one IFB."""
    ifbs = record.get("ifbs")
    if isinstance(ifbs, list) and ifbs and all(isinstance(i, str) for i in ifbs):
        return list(ifbs)
    ifb = record.get("ifb")
    return [ifb] if isinstance(ifb, str) else []


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
    counts = _plug_counts(ip, index)
    return 0 if counts is None else counts[1]


def _plug_counts(ip: Any, index: int) -> tuple[int, int] | None:
    """(packets dequeued so far, packets queued) of the plug qdisc of ``index``; None if
    the kernel does not say."""
    try:
        for q in ip.get_qdiscs(index=index):
            if q.get_attr("TCA_KIND") != "plug":
                continue
            stats = q.get_attr("TCA_STATS2")
            if stats is None:
                return None
            basic, queue = stats.get_attr("TCA_STATS_BASIC"), stats.get_attr("TCA_STATS_QUEUE")
            if basic is None or queue is None:
                return None
            return int(basic["packets"]), int(queue["qlen"])
    except Exception:
        return None
    return None
