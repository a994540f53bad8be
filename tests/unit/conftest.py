"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def tmp() -> Iterator[str]:
    """A temporary directory with a short path: a Unix socket path has at most 107 bytes."""
    d = tempfile.mkdtemp(prefix="xr-disk-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_state_dirs(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit test reads or writes the host's /var/lib/xen-remus (generations)."""
    monkeypatch.setenv("XEN_REMUS_STATE_DIR", str(tmp_path_factory.mktemp("state")))
