"""Pipelined epochs in the Remus loop (RemusLoop ``depth``), over a fake domain and a
backup that ACKs late (tests/fakes.py LaggingBackup, a virtual clock).

Checked: commits come in epoch order, each only once its ACK was seen; no more than
``depth`` epochs await their ACK at once; depth 1 never checkpoints N+1 before N is
committed; a lost backup with several epochs awaiting commits none of them; stopping
commits what the backup ACKs; an ACK out of order stops the loop naming the epochs.
"""

from __future__ import annotations

import pytest

from tests.fakes import BufferingEmitter, FakeDomain, FakeGuest, LaggingBackup
from xen_remus.channel.link import BackupLost
from xen_remus.channel.stats import EpochStats
from xen_remus.save.engine import SaveEngine
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save_continuous import IDLE_EVERY, PipelineError, RemusLoop

INTERVAL = 0.1


class Devices:
    """Checks the output-commit rules as the calls come, and logs them."""

    def __init__(self, link: LaggingBackup, dom: FakeDomain) -> None:
        self.link, self.dom = link, dom
        self.log: list[tuple[str, int]] = []
        self.loop: RemusLoop | None = None
        self.committed = -1
        self.idles: list[tuple[float, int]] = []  # (when, the last epoch sealed then)
        self.sealed_at: dict[int, float] = {}

    def postsuspend(self, epoch: int) -> None:
        assert self.dom.suspended
        self.log.append(("postsuspend", epoch))
        self.sealed_at[epoch] = self.link.now

    def preresume(self) -> None:
        pass

    def idle(self) -> None:
        assert not self.dom.suspended, "idle work while the guest is suspended"
        sealed = [n for op, n in self.log if op == "postsuspend"]
        self.idles.append((self.link.now, sealed[-1] if sealed else -1))

    def commit(self, epoch: int) -> None:
        assert epoch == self.committed + 1, f"commit({epoch}) after {self.committed}"
        if self.link.acks:
            assert epoch in self.link.delivered, f"epoch {epoch} released before its ACK"
        self.committed = epoch
        self.log.append(("commit", epoch))

    def order(self) -> list[str]:
        return [f"{op[0]}{n}" for op, n in self.log]


def make(depth: int, lag: float, acks: bool = True, lost_at: float | None = None,
         stop_at: int = 12) -> tuple[RemusLoop, LaggingBackup, Devices, list[EpochStats]]:
    dom = FakeDomain(16)
    link = LaggingBackup(lambda epoch: lag, acks, lost_at)
    out = BufferingEmitter()
    engine = SaveEngine(dom, FakeGuest(dom), out, PrecopyPolicy(2, 4))
    devs = Devices(link, dom)
    stats: list[EpochStats] = []

    def on_epoch(st: EpochStats) -> None:
        stats.append(st)
        dom.write(st.epoch % 16, st.epoch & 0xFF)  # the guest runs on
        if st.epoch == stop_at:
            loop.stop()

    loop = RemusLoop(engine, out, link, devs, INTERVAL, on_epoch=on_epoch, clock=link.clock,
                     depth=depth)
    devs.loop = loop
    return loop, link, devs, stats


@pytest.mark.parametrize("depth", [2, 3])
def test_pipelined_commits_in_order_within_the_depth(depth: int) -> None:
    loop, link, devs, stats = make(depth, lag=2.5 * INTERVAL)
    loop.run()
    commits = [n for op, n in devs.log if op == "commit"]
    sealed = [n for op, n in devs.log if op == "postsuspend"]
    assert commits == sealed == list(range(len(commits)))  # every epoch sent was committed
    assert commits[-1] >= 12 and [s.epoch for s in stats] == commits
    assert link.max_awaiting == depth and not loop.awaiting
    # The overlap itself: checkpoint N+1 (and more) before the commit of N.
    order = devs.log
    assert order.index(("postsuspend", 5)) < order.index(("commit", 4))
    if depth == 3:
        assert order.index(("postsuspend", 6)) < order.index(("commit", 4))
    # Never more than depth epochs between a seal and its commit.
    for i, (op, n) in enumerate(order):
        if op == "postsuspend":
            done = {m for o, m in order[:i] if o == "commit"}
            assert len([m for m in range(n + 1) if m not in done]) <= depth


def test_depth_one_is_the_plain_loop() -> None:
    loop, link, devs, _ = make(1, lag=2.5 * INTERVAL)
    loop.run()
    ops = [f"{op}({n})" for op, n in devs.log]
    expect = [f"{op}({n})" for n in range(len(ops) // 2) for op in ("postsuspend", "commit")]
    assert ops == expect and link.max_awaiting == 1


@pytest.mark.parametrize(("depth", "lag"), [(1, 2.5 * INTERVAL), (1, 0.2 * INTERVAL),
                                          (3, 2.5 * INTERVAL)])
def test_devices_get_their_idle_work_while_the_loop_waits(depth: int, lag: float) -> None:
    """Between any two checkpoints, whether the loop waits for an ACK or the interval,
    the devices' idle() (never with the guest suspended: Devices.idle checks): at most
    2 x IDLE_EVERY apart (a step, and an ACK taken within the next), the last at most
    IDLE_EVERY before the next checkpoint."""
    loop, link, devs, _ = make(depth, lag=lag)
    loop.run()
    seal_at = devs.sealed_at
    assert len(seal_at) > 10
    for n in range(1, len(seal_at)):
        between = [t for t, sealed in devs.idles if sealed == n - 1]
        assert between, f"no idle work between checkpoints {n - 1} and {n}"
        gaps = [b - a for a, b in zip([seal_at[n - 1], *between], [*between, seal_at[n]],
                                      strict=True)]
        assert max(gaps) <= 2 * IDLE_EVERY + 1e-9, (n, gaps)  # checkpoints take no time here
        assert gaps[-1] <= IDLE_EVERY + 1e-9, (n, gaps)


def test_fast_acks_commit_each_epoch_before_the_next() -> None:
    """ACKs within the interval: depth 3 behaves as depth 1 (nothing to pipeline)."""
    loop, link, devs, _ = make(3, lag=0.2 * INTERVAL)
    loop.run()
    assert link.max_awaiting == 1
    assert [op for op, _ in devs.log] == ["postsuspend", "commit"] * (len(devs.log) // 2)


def test_lost_backup_with_epochs_awaiting_commits_none_of_them() -> None:
    loop, link, devs, stats = make(3, lag=2.5 * INTERVAL, lost_at=1.0)
    with pytest.raises(BackupLost):
        loop.run()
    commits = [n for op, n in devs.log if op == "commit"]
    sealed = [n for op, n in devs.log if op == "postsuspend"]
    assert commits == link.delivered  # exactly the ACKed epochs, in order
    assert len(sealed) - len(commits) >= 2  # several epochs were awaiting their ACK
    assert list(loop.awaiting) == sealed[len(commits):] and loop.epoch == commits[-1]
    assert not loop.engine.dom.suspended and not loop.engine.dom.logdirty  # type: ignore[attr-defined]


def test_stop_commits_the_epochs_awaiting_their_ack() -> None:
    loop, link, devs, _ = make(3, lag=2.5 * INTERVAL, stop_at=4)
    loop.run()
    sealed = [n for op, n in devs.log if op == "postsuspend"]
    commits = [n for op, n in devs.log if op == "commit"]
    assert len(sealed) > 5 and commits == sealed  # those after 4 as well, once ACKed
    assert not loop.awaiting and link.sent == {}


def test_stock_backup_commits_once_sent_whatever_the_depth() -> None:
    loop, link, devs, stats = make(3, lag=0, acks=False, stop_at=5)
    loop.run()
    ops = [f"{op}({n})" for op, n in devs.log]
    assert ops == [f"{op}({n})" for n in range(6) for op in ("postsuspend", "commit")]
    assert all(s.ack_ms is None for s in stats)


def test_an_ack_out_of_order_stops_the_loop() -> None:
    loop, link, devs, _ = make(2, lag=2.5 * INTERVAL)
    link.wrong_epoch = 1  # the first ACK names epoch 1 while epoch 0 awaits one
    with pytest.raises(PipelineError, match=r"expected the ACK of epoch 0 \(epochs awaiting "
                       r"one: 0(, 1)?\), got epoch 1"):
        loop.run()
    assert [op for op, _ in devs.log] == ["postsuspend"] * len(devs.log)  # nothing released


def test_depth_must_be_positive() -> None:
    dom = FakeDomain(4)
    out = BufferingEmitter()
    with pytest.raises(ValueError, match="pipeline depth 0"):
        RemusLoop(SaveEngine(dom, FakeGuest(dom), out, PrecopyPolicy(1, 1)), out,
                  LaggingBackup(lambda e: 0), Devices(LaggingBackup(lambda e: 0), dom),
                  INTERVAL, depth=0)
