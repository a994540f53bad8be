"""A primary that loses a fencing backup holds its guest's output before it goes on alone
(cli/protect_fence.py): the backup may yet fence it and resume from its last committed
epoch, and what this host released meanwhile would be lost to clients (a counter going
back). The backup's offer says how long its fence may take (fence=MS)."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.fakes import FakeDomain, swallow
from tests.unit.test_cli_receive import finish, read_exact, start
from tests.unit.test_protect_loop import PAGES, Devices, Sink, primary
from xen_remus import xlproto as X
from xen_remus.channel.ends import Config
from xen_remus.channel.errors import ChannelError
from xen_remus.channel.negotiate import OFFER_PREFIX, Extensions
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.channel.stats import StatusFile
from xen_remus.cli import protect_fence
from xen_remus.cli.protect import EXIT_UNPROTECTED
from xen_remus.cli.protect_fence import HOLD_MARGIN_S, fence_hold_s, hold_for_fence
from xen_remus.cli.protect_run import Summary, _protect


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XEN_REMUS_RUN_DIR", str(tmp_path))
    return tmp_path


def test_the_offer_says_how_long_the_fence_may_take() -> None:
    ext = Config(fence=True, fence_ms=20_000).extensions()
    assert ext.tokens().split()[-1] == "fence=20000"
    back = Extensions.parse(ext.tokens(), "offer")
    assert back.fence and back.fence_ms == 20_000
    # A gate without a bound (the witness, a cluster's promotion): the bare token.
    bare = Extensions.parse(Config(fence=True).extensions().tokens(), "offer")
    assert bare.fence and bare.fence_ms is None
    assert "fence" not in Config(fence_ms=5).extensions().tokens()  # no gate: no token
    with pytest.raises(ChannelError, match="bad token 'fence=0'"):
        Extensions.parse("version=1 fence=0", "offer")
    with pytest.raises(ChannelError, match="bad token 'fence=soon'"):
        Extensions.parse("version=1 fence=soon", "offer")


def test_migrate_receive_offers_its_fence_timeout(tmp_path: Path) -> None:
    p = start(tmp_path, "-r", "--fence", "true", "--fence-timeout", "20.5",
              XEN_REMUS_RUN_DIR=str(tmp_path), XEN_REMUS_STATE_DIR=str(tmp_path))
    head = read_exact(p, len(X.BANNER) + len(OFFER_PREFIX))
    line = b""
    while not line.endswith(b"\n"):
        line += read_exact(p, 1)
    finish(p)
    assert head.endswith(OFFER_PREFIX)
    assert "fence=20500" in line.decode().split()


def offer(hb_timeout_ms: int, fence: bool, fence_ms: int | None) -> Extensions:
    return Config(heartbeat_timeout_ms=hb_timeout_ms, fence=fence,
                  fence_ms=fence_ms).extensions()


def test_the_hold_is_the_backups_heartbeat_timeout_its_fence_and_a_margin() -> None:
    off = offer(1000, True, 60_000)
    agreed = offer(6000, False, None)  # the more lenient timeout was agreed
    assert fence_hold_s(off, agreed, closed=False) == 6.0 + 60.0 + HOLD_MARGIN_S
    assert fence_hold_s(off, None, closed=False) == 1.0 + 60.0 + HOLD_MARGIN_S
    assert fence_hold_s(off, agreed, closed=True) == 0.0  # it said it stops: no resume
    assert fence_hold_s(offer(1000, True, None), agreed, closed=False) == 0.0
    assert fence_hold_s(offer(1000, False, None), agreed, closed=False) == 0.0
    assert fence_hold_s(None, None, closed=False) == 0.0  # a stock backup


def test_the_hold_ends_the_stream_first_and_says_so(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    events: list[str] = []
    status = StatusFile("g1", "primary", "hb")
    hold_for_fence(36.0, "g1", "hb", status, lambda: events.append("end"),
                   sleep=lambda s: events.append(f"sleep {s}"))
    assert events == ["end", "sleep 36.0"]
    doc = json.loads(status.path.read_text())
    assert doc["state"] == "held" and "stays held 36 s" in doc["detail"]
    assert capsys.readouterr().err == (
        "xen-remus protect: the backup on hb fences this host before it resumes its copy: "
        "the output of g1 stays held 36 s (its heartbeat timeout, its fence command's bound"
        f" and {HOLD_MARGIN_S:.0f} s), so that no client sees what that copy would lack; "
        "if this host is still up then, the guest goes on here\n")


class Releasing(Devices):
    """The devices of a protection that ends: when each call came."""

    def __init__(self, dom: FakeDomain) -> None:
        super().__init__(dom, Sink(), acks=False)
        self.at: dict[str, float] = {}

    def commit(self, epoch: int) -> None:
        raise AssertionError(f"epoch {epoch} committed without an ACK")

    def release_all(self) -> None:
        self.at["release_all"] = time.monotonic()
        self.calls.append(("release_all", -1))

    def __enter__(self) -> Releasing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append(("teardown", -1))


@pytest.mark.parametrize("fence_ms", [300, None])
def test_protect_holds_the_output_after_losing_a_fencing_backup(
        fence_ms: int | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A backup that offers fence=300 and then never answers: protect declares it lost
    (heartbeat timeout 0.2 s), ends the stream, and releases the output only once the
    backup's heartbeat timeout, its fence and the margin are over; without fence=MS
    (nothing says how long its decision may take) the output goes out at once."""
    monkeypatch.setattr(protect_fence, "HOLD_MARGIN_S", 0.25)
    dom = FakeDomain(PAGES)
    a, b = socket.socketpair()
    b.sendall(X.BANNER + ReceiverChannel(Config(heartbeat_timeout_ms=200, fence=True,
                                                fence_ms=fence_ms), 0).offer_line())
    stop = threading.Event()
    swallow(b, stop)  # never answers
    engine, out, link = primary(a, dom, Config(heartbeat_timeout_ms=200), 5.0)
    devs = Releasing(dom)
    ended: list[float] = []
    status = StatusFile("g", "primary", "backup-host")
    rc = _protect(engine, out, link, devs, argparse.Namespace(interval_ms=5, pipeline=1),
                  Summary(status, False), status, "g", None,
                  end_stream=lambda: ended.append(time.monotonic()))
    stop.set()
    a.close()
    b.close()
    assert rc == EXIT_UNPROTECTED
    assert devs.calls[-2:] == [("release_all", -1), ("teardown", -1)]
    assert not dom.paused and not dom.suspended, "the guest runs on here"
    err = capsys.readouterr().err
    assert "UNPROTECTED" in err
    if fence_ms is None:
        assert not ended and "fences this host" not in err
        return
    assert len(ended) == 1
    assert devs.at["release_all"] - ended[0] >= 0.2 + 0.3 + 0.25
    assert "the backup on backup-host fences this host before it resumes its copy" in err
    assert err.index("stays held") < err.index("UNPROTECTED")
