"""CLI pieces that need no Xen: the per-domain lock, argument handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from xen_remus.migrate_hook import build_parser
from xen_remus.save import session
from xen_remus.save.session import DomainBusy, domain_lock


def test_second_save_of_same_domain_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "LOCK_DIR", str(tmp_path))
    with domain_lock(5):
        with pytest.raises(DomainBusy, match="domain 5 is already being saved"):
            with domain_lock(5):
                pass
        with domain_lock(6):  # another domain is fine
            pass
    with domain_lock(5):  # released
        pass


def test_save_and_migrate_arguments() -> None:
    p = build_parser()
    a = p.parse_args(["save", "-c", "g1", "/tmp/f"])
    assert a.checkpoint and not a.live and a.domain == "g1" and a.file == "/tmp/f"
    a = p.parse_args(["migrate", "-s", "", "--max-rounds", "3", "g1", "xl migrate-receive"])
    assert a.ssh == "" and a.max_rounds == 3 and a.host == "xl migrate-receive"
    a = p.parse_args(["migrate", "g1", "hostb"])
    assert a.ssh is None and a.target_dirty == 50
