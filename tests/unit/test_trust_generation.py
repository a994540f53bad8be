"""Generation numbers (xen_remus/generation.py): each host's records per domain, the
receiver's refusal of a stale primary, and the numbers a failover and a new protection
take."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from xen_remus.channel.ends import Config
from xen_remus.channel.link import ReceiverLink
from xen_remus.channel.negotiate import Accept
from xen_remus.channel.receiver import ReceiverChannel
from xen_remus.generation import (
    Generation,
    GenerationError,
    GenerationRefused,
    GenerationStore,
    refusal,
)
from xen_remus.paths import STATE_DIR, state_dir
from xen_remus.receive.driver import _GenerationCheck
from xen_remus.restore_continuous import ReceiveError


@pytest.mark.parametrize("offered,recorded,refused", [
    (1, None, False),  # first protection this host hears of
    (5, Generation(4, "failover"), False),  # newer than the copy resumed here
    (4, Generation(4, "failover"), True),  # the old primary's new protection
    (3, Generation(4, "failover"), True),  # the old primary's old protection
    (3, Generation(4, "received"), True),
    (4, Generation(4, "received"), False),
    (4, Generation(4, "protect"), False),  # protect and its receiver on one host
    (3, Generation(4, "protect"), True),
    (None, None, False),  # an older sender, nothing recorded here
    (None, Generation(1, "received"), True),
])
def test_refusal(offered: int | None, recorded: Generation | None, refused: bool) -> None:
    why = refusal("g1", offered, recorded)
    assert (why is not None) == refused
    if why is not None and recorded is not None:
        assert "g1" in why and str(recorded.number) in why


def test_state_dir_and_its_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XEN_REMUS_STATE_DIR", raising=False)
    assert state_dir() == Path(STATE_DIR) == Path("/var/lib/xen-remus")
    monkeypatch.setenv("XEN_REMUS_STATE_DIR", str(tmp_path))
    assert GenerationStore().path("g1") == tmp_path / "generations" / "g1.generation"


def test_records_only_go_up_and_survive_as_files(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path)
    assert store.get("g1") is None
    assert store.start_protection("g1") == 1 and store.start_protection("g1") == 2
    assert store.get("g1") == Generation(2, "protect")
    assert store.put("g1", 1, "received") == Generation(2, "protect")  # never lowered
    assert store.failed_over("g1", 2) == 3
    assert (tmp_path / "g1.generation").read_text() == "3 failover\n"
    assert GenerationStore(tmp_path).get("g1") == Generation(3, "failover")
    assert store.get("g2") is None  # per domain
    assert store.path("a/b") == tmp_path / "a%2Fb.generation"
    assert [p.name for p in tmp_path.iterdir()] == ["g1.generation"]  # no temp files left


def test_a_bad_record_is_named_and_refuses_senders(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path)
    store.path("g1").write_text("seven failover\n")
    with pytest.raises(GenerationError, match=f"{store.path('g1')}: expected 'NUMBER ORIGIN'"):
        store.get("g1")
    with pytest.raises(GenerationRefused, match="refusing the sender until it is fixed"):
        store.check_sender("g1", 9)


def test_an_unwritable_store_refuses_senders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = GenerationStore(tmp_path / "file" / "generations")  # even root cannot
    with pytest.raises(GenerationError, match=f"generation record {store.path('g1')}"):
        store.start_protection("g1")
    with pytest.raises(GenerationRefused, match="refusing the sender"):
        store.check_sender("g1", 1)


def test_a_stale_primary_is_refused_after_a_failover(tmp_path: Path) -> None:
    """Hosts A and B, each with its own records. A protects g1 to B; the link breaks, B
    fails over while A runs on. The old primary's protection and any new one it starts
    are refused by B; B's own protection back to A is taken."""
    a, b = GenerationStore(tmp_path / "a"), GenerationStore(tmp_path / "b")
    gen = a.start_protection("g1")
    b.check_sender("g1", gen)
    assert b.get("g1") == Generation(gen, "received")
    assert b.failed_over("g1", gen) == gen + 1
    for stale in (gen, a.start_protection("g1")):
        with pytest.raises(GenerationRefused, match=(
                f"generation {stale}, but this host failed over and resumed its own copy "
                f"as generation {gen + 1}: the sender's copy is stale.*remove "
                f"{b.path('g1')}")):
            b.check_sender("g1", stale)
    assert b.get("g1") == Generation(gen + 1, "failover")  # a refusal records nothing
    back = b.start_protection("g1")
    assert back == gen + 2
    a.check_sender("g1", back)
    assert a.get("g1") == Generation(back, "received")


class NamedSink:
    def __init__(self) -> None:
        self.domain_name: str | None = None
        self.aborted: str | None = None

    def abort(self, why: str) -> None:
        self.aborted = why


@pytest.mark.parametrize("header_first", [True, False])
def test_the_driver_checks_the_accept_whenever_the_header_is_acted_on(
        tmp_path: Path, header_first: bool) -> None:
    """The xl header always precedes the accept on the wire, but when both arrive in one
    chunk the driver learns the guest's name only after the accept was decoded."""
    store = GenerationStore(tmp_path)
    store.put("g1", 4, "failover")
    sink = NamedSink()
    r, w = os.pipe()
    link = ReceiverLink(ReceiverChannel(Config(), 0), w)
    check = _GenerationCheck(cast(Any, sink), store, link)
    acc = Accept(Config().extensions(), 4)
    msg = r"REMUS_ACCEPT at offset 99 \(epoch 0\): the sender's protection of g1 is " \
          "generation 4, but this host failed over"
    if header_first:
        sink.domain_name = "g1"
        check.header_seen()
        with pytest.raises(GenerationRefused, match=msg):  # the core aborts
            check.on_accept(acc, "REMUS_ACCEPT at offset 99 (epoch 0)")
        assert sink.aborted is None
    else:
        check.on_accept(acc, "REMUS_ACCEPT at offset 99 (epoch 0)")
        sink.domain_name = "g1"
        with pytest.raises(ReceiveError, match=msg):  # the driver aborts
            check.header_seen()
        assert sink.aborted is not None and "generation 4" in sink.aborted
    assert check.refused and store.get("g1") == Generation(4, "failover")
    fine = Accept(Config().extensions(), 5)
    check2 = _GenerationCheck(cast(Any, sink), store, link)
    check2.on_accept(fine, "x")
    check2.header_seen()
    assert store.get("g1") == Generation(5, "received") and not check2.refused
    os.close(r)
    os.close(w)
