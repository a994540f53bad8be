"""NetBuffer against a fake IPRoute that models the kernel: links, qdiscs, and sch_plug's
epoch counters (net/sched/sch_plug.c), so the tests can count which packets get out."""

from __future__ import annotations

import errno
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from xen_remus.devices.discover import device_set, domain_vifs, netbufs_for_domain
from xen_remus.devices.kmod import MissingKernelModule, Modules
from xen_remus.devices.netbuf import (
    INGRESS,
    ORDER_WAIT_S,
    PLUG,
    NetbufError,
    NetBuffer,
    ifb_name,
    recover,
    ring_names,
)
from xen_remus.devices.runstate import Owner, StateDir, _start_time

ALL_MODULES = {"ifb", "sch_plug", "sch_ingress", "act_mirred", "cls_matchall"}
PLUG_ACTIONS = {"TCQ_PLUG_BUFFER": 0, "TCQ_PLUG_RELEASE_ONE": 1,
                "TCQ_PLUG_RELEASE_INDEFINITE": 2}


class Plug:
    """sch_plug's state machine, as the kernel has it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queue: list[str] = []
        self.throttled = True  # plug_init: starts buffering
        self.indefinite = False
        self.current = self.last = self.to_release = 0
        self.dequeued = 0  # TCA_STATS_BASIC packets

    def action(self, action: int) -> None:
        if action == 0:  # TCQ_PLUG_BUFFER
            self.last, self.current = self.current, 0
            if self.indefinite:
                self.throttled = True
            self.indefinite = False
        elif action == 1:  # TCQ_PLUG_RELEASE_ONE
            self.to_release += self.last
            self.last = 0
            self.throttled = False
        elif action == 2:  # TCQ_PLUG_RELEASE_INDEFINITE
            self.indefinite, self.throttled = True, False
            self.to_release = self.last = self.current = 0

    def enqueue(self, pkt: str) -> None:
        if not self.indefinite:
            self.current += 1
        self.queue.append(pkt)

    def dequeue_all(self) -> list[str]:
        out = []
        while self.queue and not self.throttled:
            if not self.indefinite:
                if not self.to_release:
                    self.throttled = True
                    break
                self.to_release -= 1
            out.append(self.queue.pop(0))
            self.dequeued += 1
        return out

    def dequeue_one(self) -> list[str]:
        """One packet of the softirq's work, if the plug lets one go."""
        if not self.queue or self.throttled or (not self.indefinite and not self.to_release):
            return []
        if not self.indefinite:
            self.to_release -= 1
        self.dequeued += 1
        return [self.queue.pop(0)]


class Attrs:
    """A netlink attribute set: get_attr by name."""

    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class Qdisc:
    def __init__(self, kind: str, handle: int, plug: Plug | None = None) -> None:
        self.kind, self.handle, self.plug = kind, handle, plug
        self.filters: dict[int, int] = {}  # ingress: prio -> matchall + mirred target

    @property
    def redirect(self) -> int | None:
        """Where a packet goes: the filter of the lowest prio matches first."""
        return self.filters[min(self.filters)] if self.filters else None

    def get_attr(self, name: str) -> Any:
        if name == "TCA_KIND":
            return self.kind
        if name == "TCA_STATS2" and self.plug is not None:
            return Attrs(TCA_STATS_BASIC={"packets": self.plug.dequeued},
                         TCA_STATS_QUEUE={"qlen": len(self.plug.queue)})
        return None


class FakeKernel:
    """Network namespace state shared by every FakeIPRoute opened on it."""

    def __init__(self, modules: set[str] | None = None) -> None:
        self.modules = ALL_MODULES if modules is None else modules
        self.links: dict[str, int] = {"lo": 1}
        self.qdiscs: dict[int, list[Qdisc]] = {}
        self.next_index = 10
        self.wire: list[str] = []  # packets that left (reached the bridge)
        self.calls: list[tuple[Any, ...]] = []
        self.opened = self.closed = 0
        # Lazy: a release only schedules the dequeue (the softirq, ``softirq``), as each
        # IFB drains in its own; get_qdiscs of a plug lets it move one packet first.
        self.lazy = False
        self.releasing: list[Plug] = []  # in release order

    def add_vif(self, name: str) -> int:
        self.links[name] = self.next_index
        self.next_index += 1
        return self.links[name]

    def name_of(self, index: int) -> str:
        return next(n for n, i in self.links.items() if i == index)

    def qdisc(self, index: int, kind: str) -> Qdisc | None:
        return next((q for q in self.qdiscs.get(index, []) if q.kind == kind), None)

    def guest_sends(self, vif: str, pkt: str) -> None:
        """A packet from the guest enters the vif (ingress in dom0)."""
        ingress = self.qdisc(self.links[vif], "ingress")
        if ingress is None or ingress.redirect is None:
            self.wire.append(pkt)
            return
        plug = self.qdisc(ingress.redirect, "plug")
        if plug is None:
            self.wire.append(pkt)  # an IFB without qdisc forwards at once
            return
        assert plug.plug is not None
        plug.plug.enqueue(pkt)
        if not self.lazy:
            self.wire += plug.plug.dequeue_all()

    def softirq(self) -> None:
        """Run the pending dequeues, the IFB released last first (the worst order)."""
        for plug in reversed(self.releasing):
            self.wire += plug.dequeue_all()
        self.releasing.clear()

    def ifb_plug(self, ifb: str) -> Plug:
        q = self.qdisc(self.links[ifb], "plug")
        assert q is not None and q.plug is not None
        return q.plug

    def iproute(self) -> FakeIPRoute:
        self.opened += 1
        return FakeIPRoute(self)


def nl(code: int) -> NetlinkError:
    return NetlinkError(code, errno.errorcode[code])


class FakeIPRoute:
    """The subset of pyroute2.IPRoute that NetBuffer uses, answering like the kernel."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def link_lookup(self, ifname: str) -> list[int]:
        self.k.calls.append(("link_lookup", ifname))
        return [self.k.links[ifname]] if ifname in self.k.links else []

    def link(self, cmd: str, **kw: Any) -> None:
        self.k.calls.append(("link", cmd, kw.get("ifname") or self.k.name_of(kw["index"])))
        if cmd == "add":
            if kw["kind"] == "ifb" and "ifb" not in self.k.modules:
                raise nl(errno.EOPNOTSUPP)
            if kw["ifname"] in self.k.links:
                raise nl(errno.EEXIST)
            self.k.add_vif(kw["ifname"])
        elif cmd == "del":
            name = self.k.name_of(kw["index"])
            del self.k.links[name]
            self.k.qdiscs.pop(kw["index"], None)  # queued packets are dropped
        elif cmd != "set":
            raise AssertionError(cmd)

    def tc(self, cmd: str, kind: str, index: int, handle: int = 0, **kw: Any) -> None:
        k = self.k
        k.calls.append(("tc", cmd, kind, k.name_of(index), kw.get("action")))
        if index not in k.links.values():
            raise nl(errno.ENODEV)
        qs = k.qdiscs.setdefault(index, [])
        if cmd == "add":
            module = {"ingress": "sch_ingress", "plug": "sch_plug"}[kind]
            if module not in k.modules:
                raise nl(errno.ENOENT)
            if k.qdisc(index, kind):
                raise nl(errno.EEXIST)
            assert kind != "plug" or kw["limit"] > 0
            qs.append(Qdisc(kind, handle, Plug(kw["limit"]) if kind == "plug" else None))
        elif cmd == "add-filter":
            assert kind == "matchall" and kw["parent"] == INGRESS and kw["protocol"] == 3
            if not {"cls_matchall", "act_mirred"} <= k.modules:
                raise nl(errno.ENOENT)
            ingress = k.qdisc(index, "ingress")
            if ingress is None:
                raise nl(errno.EINVAL)
            act = kw["action"]
            assert (act["kind"], act["direction"], act["action"]) == (
                "mirred", "egress", "redirect")
            if kw["prio"] in ingress.filters:
                raise nl(errno.EEXIST)  # cls_matchall: one filter per prio, no replace
            ingress.filters[kw["prio"]] = act["ifindex"]
        elif cmd == "del-filter":
            ingress = k.qdisc(index, "ingress")
            if ingress is None or kw["prio"] not in ingress.filters:
                raise nl(errno.ENOENT)
            del ingress.filters[kw["prio"]]
        elif cmd == "change":
            q = k.qdisc(index, kind)
            if q is None or q.plug is None or handle != PLUG:
                raise nl(errno.ENOENT)
            # pyroute2's sched_plug: actions.get(value, 0) - a number silently means BUFFER
            q.plug.action(PLUG_ACTIONS.get(kw.get("action", 0), 0))
            if k.lazy:
                k.releasing.append(q.plug)
            else:
                k.wire += q.plug.dequeue_all()
        elif cmd == "del":
            q = k.qdisc(index, kind)
            if q is None:
                raise nl(errno.EINVAL)
            qs.remove(q)
        else:
            raise AssertionError(cmd)

    def get_qdiscs(self, index: int) -> list[Qdisc]:
        qs = list(self.k.qdiscs.get(index, []))
        for q in qs:
            if self.k.lazy and q.plug is not None and q.plug in self.k.releasing:
                self.k.wire += q.plug.dequeue_one()
        return qs

    def close(self) -> None:
        self.k.closed += 1


def no_modprobe(name: str) -> str:
    return f"modprobe: FATAL: Module {name} not found in directory /lib/modules/x"


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    k.add_vif("vif5.0")
    return k


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir("netbuf", root=tmp_path)


def make(kernel: FakeKernel, state: StateDir, vif: str = "vif5.0", ifb: str = "xrifb5.0",
         modules: Modules | None = None, depth: int = 1, **kw: Any) -> NetBuffer:
    mods = modules or Modules(proc=Path("/nonexistent/modules"))  # no module support: skip
    return NetBuffer(vif, ifb, iproute=kernel.iproute, state=state, modules=mods, depth=depth,
                     **kw)


def send(kernel: FakeKernel, tag: str, n: int, vif: str = "vif5.0") -> list[str]:
    pkts = [f"{tag}.{i}" for i in range(n)]
    for p in pkts:
        kernel.guest_sends(vif, p)
    return pkts


def test_setup_builds_plug_before_redirect(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    steps = [c[:3] for c in kernel.calls if c[0] in ("tc", "link") and c[1] != "set"]
    assert steps == [("link", "add", "xrifb5.0"), ("tc", "add", "plug"),
                     ("tc", "add", "ingress"), ("tc", "add-filter", "matchall")]
    assert json.loads(state.path("vif5.0").read_text())["ifb"] == "xrifb5.0"
    # The plug starts closed: nothing leaves before the first commit.
    send(kernel, "pre", 3)
    assert kernel.wire == []


def test_commit_releases_exactly_that_epoch(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    e1 = send(kernel, "e1", 3)
    nb.postsuspend(1)
    e2 = send(kernel, "e2", 4)  # the guest runs on speculatively: epoch 2's output
    assert kernel.wire == []
    nb.commit(1)
    assert kernel.wire == e1
    e2 += send(kernel, "e2b", 2)
    assert kernel.wire == e1
    nb.postsuspend(2)
    e3 = send(kernel, "e3", 1)
    nb.commit(2)
    assert kernel.wire == e1 + e2
    nb.postsuspend(3)
    nb.commit(3)
    assert kernel.wire == e1 + e2 + e3
    nb.postsuspend(4)  # an epoch with no output
    nb.commit(4)
    assert kernel.wire == e1 + e2 + e3


def test_actions_are_passed_by_name(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    nb.postsuspend(1)
    nb.commit(1)
    nb.release_all()
    acts = [c[4] for c in kernel.calls if c[:2] == ("tc", "change")]
    assert acts == ["TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE", "TCQ_PLUG_RELEASE_INDEFINITE"]


@pytest.mark.parametrize("case", ["commit-unsealed", "commit-wrong", "two-sealed", "backwards"])
def test_out_of_order_is_refused(kernel: FakeKernel, state: StateDir, case: str) -> None:
    nb = make(kernel, state)
    nb.setup()
    e1 = send(kernel, "e1", 2)
    if case == "commit-unsealed":
        with pytest.raises(NetbufError, match=r"commit of epoch 1 out of order \(sealed: none"):
            nb.commit(1)
    elif case == "commit-wrong":
        nb.postsuspend(1)
        with pytest.raises(NetbufError, match="commit of epoch 2 out of order.*sealed: epoch 1"):
            nb.commit(2)
    elif case == "two-sealed":
        nb.postsuspend(1)
        with pytest.raises(NetbufError, match="postsuspend of epoch 2 while epoch 1 awaits"):
            nb.postsuspend(2)
    else:
        nb.postsuspend(7)
        nb.commit(7)
        with pytest.raises(NetbufError, match="vif5.0.*epoch 7 after epoch 7 was committed"):
            nb.postsuspend(7)
    assert kernel.wire == ([] if case != "backwards" else e1)
    # A refused call changed nothing: the sealed epoch (if any) still commits exactly.
    if nb.sealed is not None:
        nb.commit(nb.sealed)
        assert kernel.wire == e1


def test_release_all_then_protect_again(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    e1 = send(kernel, "e1", 2)
    nb.postsuspend(1)
    e2 = send(kernel, "e2", 2)
    nb.release_all()  # backup lost: everything out, then unbuffered
    assert kernel.wire == e1 + e2
    free = send(kernel, "free", 2)
    assert kernel.wire == e1 + e2 + free
    nb.postsuspend(5)  # protection resumes with a new backup
    e6 = send(kernel, "e6", 3)
    nb.commit(5)
    assert kernel.wire == e1 + e2 + free
    nb.postsuspend(6)
    nb.commit(6)
    assert kernel.wire == e1 + e2 + free + e6


def test_teardown_drops_what_is_held_and_removes_everything(kernel: FakeKernel,
                                                            state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    nb.postsuspend(1)
    send(kernel, "e2", 2)  # epoch 1 sealed, never committed; epoch 2 open
    nb.teardown()
    assert kernel.wire == []  # never released without a commit: the backup lacks it
    assert "xrifb5.0" not in kernel.links
    assert kernel.qdiscs[kernel.links["vif5.0"]] == []
    assert not state.path("vif5.0").exists()
    assert kernel.opened == kernel.closed == 1
    after = send(kernel, "after", 2)
    assert kernel.wire == after
    ops = [c[1:3] for c in kernel.calls if c[0] in ("tc", "link") and c[1] in ("change", "del")]
    assert ops == [("change", "plug"), ("del", "ingress"), ("del", "xrifb5.0")]  # BUFFER only
    nb.teardown()  # twice is fine


def test_release_all_then_teardown_lets_everything_out(kernel: FakeKernel,
                                                       state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    e1 = send(kernel, "e1", 2)
    nb.release_all()  # protection stops, the guest goes on here
    nb.teardown()
    assert kernel.wire == e1
    assert "xrifb5.0" not in kernel.links


def test_setup_twice_replaces_cleanly(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    nb.postsuspend(1)
    nb.setup()  # again, same process: fresh IFB, fresh epochs
    assert nb.sealed is None and nb.committed is None
    ifb = kernel.links["xrifb5.0"]
    assert [q.kind for q in kernel.qdiscs[ifb]] == ["plug"]
    assert [q.kind for q in kernel.qdiscs[kernel.links["vif5.0"]]] == ["ingress"]
    e1 = send(kernel, "e1", 2)
    nb.postsuspend(1)
    nb.commit(1)
    assert kernel.wire == e1


def dead_owner() -> Owner:
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return Owner(p.pid, "1")


def test_crash_restart_cleans_leftovers(kernel: FakeKernel, state: StateDir) -> None:
    kernel.add_vif("vif6.0")
    crashed = make(kernel, state)
    crashed.setup()
    other = make(kernel, state, "vif6.0", "xrifb6.0")
    other.setup()
    send(kernel, "held", 2)
    # Both "crash": records stay, owned by a process that is gone; the kernel keeps all.
    for key in ("vif5.0", "vif6.0"):
        state.write(key, {"vif": key, "ifb": "xrifb" + key[3:]}, dead_owner())
    nb = make(kernel, state)
    nb.setup()
    # vif6.0's leftovers are gone (its guest's network flows again); vif5.0 is set up anew.
    assert "xrifb6.0" not in kernel.links and not state.path("vif6.0").exists()
    assert kernel.qdiscs[kernel.links["vif6.0"]] == []
    assert kernel.ifb_plug("xrifb5.0").queue == []
    e1 = send(kernel, "e1", 3)
    nb.postsuspend(1)
    nb.commit(1)
    assert kernel.wire == e1
    assert json.loads(state.path("vif5.0").read_text())["pid"] == Owner.me().pid


def test_teardown_without_state_file(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    state.remove("vif5.0")
    nb.teardown()
    assert "xrifb5.0" not in kernel.links and kernel.qdiscs[kernel.links["vif5.0"]] == []


def test_leftover_without_state_file_is_replaced(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    state.remove("vif5.0")  # /run lost, kernel state not
    nb2 = make(kernel, state)
    nb2.setup()
    assert [q.kind for q in kernel.qdiscs[kernel.links["vif5.0"]]] == ["ingress"]


def test_recover_cleans_only_dead_owners(kernel: FakeKernel, state: StateDir) -> None:
    kernel.add_vif("vif6.0")
    live = subprocess.Popen(["sleep", "30"])
    try:
        make(kernel, state).setup()
        make(kernel, state, "vif6.0", "xrifb6.0").setup()
        state.write("vif5.0", {"vif": "vif5.0", "ifb": "xrifb5.0"}, dead_owner())
        start = _start_time(live.pid)
        assert start is not None
        state.write("vif6.0", {"vif": "vif6.0", "ifb": "xrifb6.0"}, Owner(live.pid, start))
        assert recover(state=state, iproute=kernel.iproute) == ["vif5.0"]
        assert "xrifb5.0" not in kernel.links and "xrifb6.0" in kernel.links
        # The live owner's vif is refused to a second xen-remus.
        with pytest.raises(NetbufError, match=f"buffered by another xen-remus \\(pid {live.pid}"):
            make(kernel, state, "vif6.0", "xrifb6.0").setup()
    finally:
        live.kill()
        live.wait(timeout=10)


def test_foreign_ingress_is_refused(kernel: FakeKernel, state: StateDir) -> None:
    kernel.iproute().tc("add", "ingress", kernel.links["vif5.0"], INGRESS)
    with pytest.raises(NetbufError, match="vif5.0 already has an ingress qdisc"):
        make(kernel, state).setup()
    assert "xrifb5.0" not in kernel.links and not state.path("vif5.0").exists()
    assert [q.kind for q in kernel.qdiscs[kernel.links["vif5.0"]]] == ["ingress"]  # untouched


def test_missing_vif(kernel: FakeKernel, state: StateDir) -> None:
    with pytest.raises(NetbufError, match="no interface vif9.0"):
        make(kernel, state, "vif9.0", "xrifb9.0").setup()


def test_missing_module_is_named_before_anything(tmp_path: Path, kernel: FakeKernel,
                                                 state: StateDir) -> None:
    proc = tmp_path / "modules"
    proc.write_text("ifb 16384 0 - Live 0x0\nsch_ingress 16384 0 - Live 0x0\n")
    builtin = tmp_path / "modules.builtin"
    builtin.write_text("kernel/net/sched/act_mirred.ko\n")
    tried: list[str] = []

    def modprobe(name: str) -> str | None:
        tried.append(name)
        return None if name == "cls_matchall" else no_modprobe(name)

    mods = Modules(proc=proc, sys_module=tmp_path / "none", builtin=builtin, modprobe=modprobe)
    with pytest.raises(MissingKernelModule) as err:
        make(kernel, state, modules=mods).setup()
    assert tried == ["sch_plug", "cls_matchall"]
    assert list(err.value.missing) == ["sch_plug"]
    assert str(err.value).startswith("netbuf: kernel module missing: sch_plug (modprobe: FATAL")
    assert kernel.calls == [] and state.keys() == []


@pytest.mark.parametrize("module,step", [("sch_plug", "add plug qdisc"),
                                         ("ifb", "add ifb"),
                                         ("cls_matchall", "add matchall filter")])
def test_netlink_refusal_names_module_and_undoes(state: StateDir, module: str,
                                                 step: str) -> None:
    kernel = FakeKernel(ALL_MODULES - {module})  # a kernel without module support (no /proc)
    kernel.add_vif("vif5.0")
    with pytest.raises(NetbufError) as err:
        make(kernel, state).setup()
    assert f"netbuf vif5.0 -> xrifb5.0: {step}: netlink error" in str(err.value)
    assert module in str(err.value) and err.value.code in (errno.ENOENT, errno.EOPNOTSUPP)
    assert "xrifb5.0" not in kernel.links and state.keys() == []
    assert kernel.qdiscs.get(kernel.links["vif5.0"], []) == []


def test_setup_waits_for_the_lock(kernel: FakeKernel, state: StateDir) -> None:
    order: list[str] = []
    held = threading.Event()

    def hold() -> None:
        with state.locked():
            held.set()
            time.sleep(0.2)
            order.append("released")

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    make(kernel, state).setup()
    order.append("setup done")
    t.join(5)
    assert order == ["released", "setup done"]


def test_ifb_name_fits_ifnamsiz() -> None:
    assert ifb_name(32752, 99) == "xrifb32752.99"
    with pytest.raises(NetbufError, match="longer than 15"):
        ifb_name(32752, 12345)


class FakeStore:
    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    def read(self, path: str) -> str | None:
        return self.data.get(path)

    def list(self, path: str) -> list[str]:
        kids = {p[len(path) + 1:].split("/")[0] for p in self.data if p.startswith(path + "/")}
        return sorted(kids)

    def domain_path(self, domid: int) -> str:
        return f"/local/domain/{domid}"


def test_discovery_of_a_domains_vifs(kernel: FakeKernel, state: StateDir) -> None:
    fe, be = "/local/domain/7/device/vif", "/local/domain/0/backend/vif/7"
    xs = FakeStore({f"{fe}/0/backend": f"{be}/0", f"{fe}/0/backend-id": "0",
                    f"{fe}/10/backend": f"{be}/10", f"{fe}/10/backend-id": "0",
                    f"{be}/10/vifname": "web0",
                    f"{fe}/2/backend": f"{be}/2", f"{fe}/2/backend-id": "0"})
    assert domain_vifs(xs, 7) == [(0, "vif7.0"), (2, "vif7.2"), (10, "web0")]
    nbs = netbufs_for_domain(7, xs, iproute=kernel.iproute, state=state)
    assert [(n.vif, n.ifb) for n in nbs] == [("vif7.0", "xrifb7.0"), ("vif7.2", "xrifb7.2"),
                                            ("web0", "xrifb7.10")]
    xs.data[f"{fe}/2/backend-id"] = "3"
    with pytest.raises(NetbufError, match="vif 2 of domain 7 has its backend in domain 3"):
        domain_vifs(xs, 7)


def test_device_set_of_a_domain(kernel: FakeKernel, state: StateDir) -> None:
    xs = FakeStore({"/local/domain/5/device/vif/0/backend": "/local/domain/0/backend/vif/5/0"})
    assert device_set(5, net=False, xs=xs).devices == []
    with device_set(5, xs=xs, iproute=kernel.iproute, state=state,
                    modules=Modules(proc=Path("/nonexistent"))) as devs:
        e1 = send(kernel, "e1", 2)
        devs.postsuspend(1)
        devs.preresume()
        devs.commit(1)
        assert kernel.wire == e1
    assert "xrifb5.0" not in kernel.links and state.keys() == []


# -- pipelined epochs: a ring of IFBs ---------------------------------------------------------

RING = ["xrifb5.0", "xrifb5.0-1", "xrifb5.0-2"]


def test_ring_setup_plugs_every_ifb_before_the_redirect(kernel: FakeKernel,
                                                        state: StateDir) -> None:
    nb = make(kernel, state, depth=3)
    nb.setup()
    steps = [c[:4] for c in kernel.calls if c[0] in ("tc", "link") and c[1] != "set"]
    assert steps == [("link", "add", "xrifb5.0"), ("tc", "add", "plug", "xrifb5.0"),
                     ("link", "add", "xrifb5.0-1"), ("tc", "add", "plug", "xrifb5.0-1"),
                     ("link", "add", "xrifb5.0-2"), ("tc", "add", "plug", "xrifb5.0-2"),
                     ("tc", "add", "ingress", "vif5.0"),
                     ("tc", "add-filter", "matchall", "vif5.0")]
    assert json.loads(state.path("vif5.0").read_text())["ifbs"] == RING
    send(kernel, "pre", 3)
    assert kernel.wire == [] and len(kernel.ifb_plug("xrifb5.0").queue) == 3


def test_pipelined_epochs_leave_in_order_and_only_once_committed(kernel: FakeKernel,
                                                                  state: StateDir) -> None:
    nb = make(kernel, state, depth=3)
    nb.setup()
    out: list[str] = []
    e = {1: send(kernel, "e1", 3)}
    for n in (2, 3, 4):  # three epochs sealed at once; the fourth is open
        nb.postsuspend(n - 1)
        e[n] = send(kernel, f"e{n}", n)
    assert nb.awaiting == [1, 2, 3] and kernel.wire == []
    with pytest.raises(NetbufError, match=r"postsuspend of epoch 4 while epochs 1, 2, 3 await "
                       r"its commit \(pipeline depth 3\)"):
        nb.postsuspend(4)
    with pytest.raises(NetbufError, match=r"commit of epoch 2 out of order \(sealed: epochs "
                       r"1, 2, 3"):
        nb.commit(2)
    for n in range(1, 9):
        nb.commit(n)
        out += e[n]
        assert kernel.wire == out, f"after commit({n})"
        nb.postsuspend(n + 3)  # the slot of epoch n takes epoch n+4: it was just freed
        e[n + 4] = send(kernel, f"e{n + 4}", 2)
        assert kernel.wire == out  # nothing of an uncommitted epoch left
    assert nb.awaiting == [9, 10, 11]
    # The redirect moved at each postsuspend: one filter at a time, never none.
    ingress = kernel.qdisc(kernel.links["vif5.0"], "ingress")
    assert ingress is not None and len(ingress.filters) == 1


def test_depth_one_never_moves_the_redirect(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state)
    nb.setup()
    for n in range(1, 4):
        nb.postsuspend(n)
        nb.commit(n)
    assert not [c for c in kernel.calls if c[:2] in (("tc", "add-filter"), ("tc", "del-filter"))
                and c[3] == "vif5.0"][1:]
    assert not [c for c in kernel.calls if c[0] == "tc" and c[2] == "plug" and
                c[3] != "xrifb5.0"]


def two_epochs_sealed(kernel: FakeKernel, nb: NetBuffer, n1: int,
                      n2: int) -> tuple[list[str], list[str]]:
    """Set up ``nb`` (depth 2), with IFBs that drain only at kernel.softirq(); the guest
    sends ``n1`` packets in epoch 1 and ``n2`` in epoch 2, both sealed."""
    nb.setup()
    kernel.lazy = True
    e1 = send(kernel, "e1", n1)
    nb.postsuspend(1)
    e2 = send(kernel, "e2", n2)
    nb.postsuspend(2)
    return e1, e2


def test_release_of_an_epoch_waits_for_the_one_before(kernel: FakeKernel,
                                                     state: StateDir) -> None:
    """Each IFB drains in its own softirq: released back to back, epoch 2 could reach the
    bridge before epoch 1 (the fake runs the IFB released last first)."""
    nb = make(kernel, state, depth=2)
    e1, e2 = two_epochs_sealed(kernel, nb, 4, 4)
    nb.commit(1)
    nb.commit(2)  # polls xrifb5.0 until epoch 1's packets have left it
    kernel.softirq()
    assert kernel.wire == e1 + e2


def test_order_wait_is_bounded(kernel: FakeKernel, state: StateDir) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    nb = make(kernel, state, depth=2, clock=lambda: now[0], sleep=sleep)
    e1, e2 = two_epochs_sealed(kernel, nb, 2, 1)
    nb.commit(1)
    kernel.releasing.clear()  # epoch 1's softirq never runs: its packets stay queued
    nb.commit(2)
    assert ORDER_WAIT_S <= sum(slept) < ORDER_WAIT_S + 0.01
    kernel.softirq()
    assert kernel.wire == e2  # released late, not held; epoch 1's stay queued in the fake
    assert len(kernel.ifb_plug("xrifb5.0").queue) == len(e1)


def test_pipelined_release_all_then_protect_again(kernel: FakeKernel,
                                                  state: StateDir) -> None:
    nb = make(kernel, state, depth=2)
    nb.setup()
    e1 = send(kernel, "e1", 2)
    nb.postsuspend(1)
    e2 = send(kernel, "e2", 2)
    nb.release_all()  # backup lost: everything out, oldest epoch first, every IFB open
    assert kernel.wire == e1 + e2 and nb.awaiting == []
    free = send(kernel, "free", 1)
    assert kernel.wire[-1:] == free
    seen = list(kernel.wire)
    nb.postsuspend(5)  # a new backup: the next IFB is plugged before packets go there
    e6 = send(kernel, "e6", 3)
    nb.postsuspend(6)
    e7 = send(kernel, "e7", 1)
    assert kernel.wire == seen
    nb.commit(5)
    nb.commit(6)
    assert kernel.wire == seen + e6
    nb.postsuspend(7)
    nb.commit(7)
    assert kernel.wire == seen + e6 + e7


def test_ring_teardown_and_crash_recovery(kernel: FakeKernel, state: StateDir) -> None:
    nb = make(kernel, state, depth=3)
    nb.setup()
    send(kernel, "e1", 2)
    nb.postsuspend(1)
    send(kernel, "e2", 2)
    nb.teardown()
    assert kernel.wire == []  # held output is dropped: releasing is release_all's job
    assert not set(RING) & set(kernel.links) and state.keys() == []
    # A crashed pipelined run: its record names the whole ring.
    make(kernel, state, depth=3).setup()
    state.write("vif5.0", {"vif": "vif5.0", "ifb": "xrifb5.0", "ifbs": RING}, dead_owner())
    assert recover(state=state, iproute=kernel.iproute) == ["vif5.0"]
    assert not set(RING) & set(kernel.links)
    assert kernel.qdiscs[kernel.links["vif5.0"]] == []
    # A ring left behind is replaced by a setup of another depth.
    make(kernel, state, depth=3).setup()
    state.remove("vif5.0")
    make(kernel, state, depth=2).setup()
    assert "xrifb5.0-1" in kernel.links and "xrifb5.0-2" in kernel.links  # unrecorded: kept
    ingress = kernel.qdisc(kernel.links["vif5.0"], "ingress")
    assert ingress is not None and list(ingress.filters.values()) == [kernel.links["xrifb5.0"]]


def test_ring_names() -> None:
    assert ring_names("xrifb5.0", 1) == ["xrifb5.0"]
    assert ring_names("xrifb32752.9", 3) == ["xrifb32752.9", "xrifb32752.9-1", "xrifb32752.9-2"]
    with pytest.raises(NetbufError, match=r"xrifb32752.999-1 \(pipeline depth 2\) is longer"):
        ring_names("xrifb32752.999", 2)
    with pytest.raises(NetbufError, match=r"depth 9 for xrifb5.0 is not in 1..8"):
        ring_names("xrifb5.0", 9)
