"""Generation numbers (xen_remus/generation.py): each host's records per domain, the
receiver's refusal of a stale primary, and the numbers a failover and a new protection
take."""

from __future__ import annotations

from pathlib import Path

import pytest

from xen_remus.generation import (
    Generation,
    GenerationError,
    GenerationRefused,
    GenerationStore,
    refusal,
)
from xen_remus.paths import STATE_DIR, state_dir


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
