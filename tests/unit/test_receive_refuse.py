"""A bad epoch after committed ones, end to end: RemusLoop over a fake domain and the real
receiver (receive.driver.receive) on a socket pair, as in test_protect_loop. The backup
drops the epoch, holds its copy of the last committed one (no failover, no destroy) and
says why in a CLOSE frame, which the primary reports in its BackupLost."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from tests.fakes import FakeDomain
from tests.unit.test_protect_loop import PAGES, Devices, Sink, primary
from xen_remus.channel.ends import Config
from xen_remus.channel.link import BackupLost
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import EpochStats
from xen_remus.receive.driver import receive
from xen_remus.receive.upstream import Upstream
from xen_remus.restore_continuous import EpochRefused, ReceiveError
from xen_remus.save_continuous import RemusLoop


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XEN_REMUS_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


class HoldingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.held: int | None = None
        self.aborted: str | None = None

    def hold(self, epoch: int) -> None:
        self.held = epoch

    def abort(self, why: str) -> None:
        self.aborted = why

    def incoming_name(self) -> str:
        return "g--incoming"


def backup(sock: socket.socket, sink: HoldingSink, cfg: Config
           ) -> tuple[threading.Thread, list[object]]:
    """The real receiver on ``sock`` in a thread; its outcome or exception lands in the
    list."""
    result: list[object] = []
    up = Upstream(sock.fileno(), sock.fileno(), idle_timeout=20.0, io_timeout=20.0)

    def run() -> None:
        try:
            result.append(receive(up, cast(Any, sink), True,
                                  chan=ReceiverChannel(cfg, time.monotonic())))
        except BaseException as exc:  # handed to the test
            result.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, result


@pytest.mark.parametrize("mac", [True, False])
def test_a_bad_epoch_is_dropped_held_and_the_primary_told_why(mac: bool) -> None:
    dom = FakeDomain(PAGES)
    sink = HoldingSink()
    a, b = socket.socketpair()
    th, result = backup(b, sink, Config(mac=mac))
    engine, out, link = primary(a, dom, Config(mac=mac), 5.0)

    def on_epoch(st: EpochStats) -> None:
        if st.epoch == 2:  # between epochs, at a libxc record boundary: a record that
            # no libxc knows (mandatory type 0x7777), as a broken primary might send
            link.send([struct.pack("<II", 0x7777, 0)])
        dom.dirty.add(st.epoch % PAGES)

    loop = RemusLoop(engine, out, link, Devices(dom, sink), 0.005, on_epoch=on_epoch)
    with pytest.raises(BackupLost) as lost:
        loop.run()
    th.join(20)
    msg = str(lost.value)
    assert "it stopped: the backup stops: epoch 3 refused:" in msg, msg
    assert "unknown mandatory record type 0x00007777" in msg and "(epoch 3)" in msg
    (err,) = result
    assert isinstance(err, EpochRefused), err
    assert "copy of epoch 2 stays paused" in str(err) and "was told why" in str(err)
    assert sink.held == 2 and sink.failed_over is None and sink.aborted is None
    assert sink.committed_epochs == [0, 1, 2]
    a.close()
    b.close()


class BrokenSink(HoldingSink):
    """Takes epochs 0 and 1, then fails (a bug, a broken disk): not one of our errors."""

    def committed(self, epoch: int) -> None:
        super().committed(epoch)
        if epoch == 1:
            raise RuntimeError("sink broke")


def test_a_failure_after_a_commit_holds_the_copy_and_tells_the_primary() -> None:
    dom = FakeDomain(PAGES)
    sink = BrokenSink()
    a, b = socket.socketpair()
    th, result = backup(b, sink, Config())
    engine, out, link = primary(a, dom, Config(), 5.0)
    loop = RemusLoop(engine, out, link, Devices(dom, sink, acks=False), 0.005,
                     on_epoch=lambda st: dom.dirty.add(st.epoch % PAGES))
    with pytest.raises(BackupLost, match="it stopped: the backup stops: receive failed after "
                       "epoch 1 was committed: sink broke"):
        loop.run()
    th.join(20)
    (err,) = result
    assert isinstance(err, ReceiveError) and not isinstance(err, EpochRefused)
    assert "copy of epoch 1 is left as it is (g--incoming), not resumed" in str(err)
    assert sink.held == 1 and sink.failed_over is None and sink.aborted is None
    a.close()
    b.close()
