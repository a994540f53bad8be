"""xl's sender handshake against a fake `xl migrate-receive` (real pipes, real stream)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import FakeDomain, FakeGuest
from xen_remus.cli.save import migrate
from xen_remus.save.emit import FdEmitter
from xen_remus.save.engine import SaveEngine, SaveStats
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.session import Target
from xen_remus.save.transport import MigrationRefused, ReceiverProcess, receiver_command

ROOT = Path(__file__).resolve().parents[2]


class FakeSaver:
    def __init__(self) -> None:
        self.target = Target(7, "guest")
        self.dom = FakeDomain(300)
        self.engine: SaveEngine | None = None
        self.handover: bool | None = None

    def save(self, fd: int, xl_config: str | None, policy: PrecopyPolicy,
             what: str = "stream", handover: bool = False) -> SaveStats:
        self.handover = handover
        self.engine = SaveEngine(self.dom, FakeGuest(self.dom),
                                 FdEmitter(fd, xl_config, what=what), policy)
        return self.engine.run()

    def resume(self) -> None:
        assert self.engine is not None
        self.engine.resume()

    def destroy(self, xl_cmd: Callable[..., str] | None = None) -> None:
        assert xl_cmd is not None
        xl_cmd("destroy", str(self.target.domid))


def run(mode: str, s: FakeSaver | None = None, calls: list[tuple[str, ...]] | None = None
        ) -> tuple[FakeSaver, list[tuple[str, ...]], int | None]:
    rune = f"cd {ROOT} && exec {sys.executable} -m tests.unit.save_fake_receiver {mode}"
    s = s or FakeSaver()
    calls = [] if calls is None else calls

    def fake_xl(*args: str, timeout: float = 60.0) -> str:
        calls.append(args)
        return ""

    recv = ReceiverProcess(receiver_command(rune, "", []))
    try:
        migrate(s, recv, '{"c_info": {}}', PrecopyPolicy(max_rounds=2), timeout=30,
                xl=fake_xl)
    finally:
        rc = recv.close()
    return s, calls, rc


def test_receiver_command_like_xl() -> None:
    assert receiver_command("hostb", None, []) == "exec ssh hostb xl migrate-receive"
    assert receiver_command("hostb", "ssh -p 22", ["-e"]) == \
        "exec ssh -p 22 hostb xl migrate-receive -e"
    assert receiver_command("xl migrate-receive", "", []) == "xl migrate-receive"


def test_migrate_success_renames_away_then_destroys() -> None:
    s, calls, rc = run("ok")
    assert rc == 0
    assert calls == [("rename", "7", "guest--migratedaway"), ("destroy", "7")]
    assert s.dom.suspended and s.dom.resumed == 0
    assert s.handover, "a migration hands the device model's disks over"


def test_refusing_host_leaves_guest_untouched() -> None:
    s = FakeSaver()
    with pytest.raises(MigrationRefused, match=r"expected the banner at offset 0 .* got "
                       r"b'xl: command not found"):
        run("refuse", s)
    assert s.dom.calls == [] and s.engine is None  # never suspended, log-dirty never on


def test_receiver_dropping_after_stream_resumes_guest() -> None:
    s, calls = FakeSaver(), list[tuple[str, ...]]()
    with pytest.raises(MigrationRefused, match="closed the connection before the 'domain "
                       "received' message"):
        run("drop", s, calls)
    assert s.dom.calls[-1] == "resume" and not s.dom.suspended and calls == []


def test_failed_unpause_on_target_renames_back_and_resumes() -> None:
    s, calls = FakeSaver(), list[tuple[str, ...]]()
    with pytest.raises(MigrationRefused, match="could not unpause"):
        run("nounpause", s, calls)
    assert calls == [("rename", "7", "guest--migratedaway"), ("rename", "7", "guest")]
    assert not s.dom.suspended and s.dom.resumed == 1


def test_config_is_fetched_while_the_guest_is_opened() -> None:
    """`xl list -l` runs in a thread beside open_guest; its error reaches the caller."""
    from types import SimpleNamespace

    from xen_remus.cli.save import config_while_opening
    from xen_remus.save.session import ToolError

    opened: list[bool] = []
    s = SimpleNamespace(target=SimpleNamespace(domid=7),
                        open_guest=lambda: opened.append(True))
    assert config_while_opening(s, lambda domid: f'{{"domid": {domid}}}'  # type: ignore[arg-type]
                                ) == '{"domid": 7}'

    def broken(domid: int) -> str:
        raise ToolError(f"xl list -l {domid} exited 1: no such domain")

    with pytest.raises(ToolError, match="xl list -l 7"):
        config_while_opening(s, broken)  # type: ignore[arg-type]
    assert opened == [True, True]
