"""The command-line side of issue 14's host pieces: --key-file (both ends), --fence and
--fence-timeout (migrate-receive -r), and protect's warning about an unfenced backup."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, cast

import pytest

from xen_remus.channel.ends import Config
from xen_remus.channel.sender import Offered
from xen_remus.cli import options
from xen_remus.cli.protect import check_args, receiver_rune
from xen_remus.cli.protect_run import _warn_unfenced
from xen_remus.errors import UsageError
from xen_remus.migrate_hook import build_parser, main


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def key_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "key"
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def test_key_file_is_read_and_checked(tmp_path: Path) -> None:
    assert options.read_key(None) is None
    assert options.read_key(key_file(tmp_path, b"  0123456789abcdef0123\n")) == \
        b"0123456789abcdef0123"
    with pytest.raises(UsageError, match="readable or writable by others .mode 640.: "
                       "chmod 600"):
        options.read_key(key_file(tmp_path, b"0123456789abcdef0123", 0o640))
    with pytest.raises(UsageError, match="a key of 5 bytes; it must be 16..4096"):
        options.read_key(key_file(tmp_path, b"short\n"))
    with pytest.raises(UsageError, match="--key-file .*missing: No such file"):
        options.read_key(str(tmp_path / "missing"))


@pytest.mark.parametrize("argv,msg", [
    (["--fence", "true"], "--fence needs -r"),
    (["-r", "--fence", "true", "--fence-timeout", "0"], "--fence-timeout must be positive"),
    (["-r", "--no-extensions", "--key-file", "/nonexistent"], "--key-file needs -r"),
    (["--key-file", "/nonexistent"], "--key-file needs -r"),
    (["-r", "--key-file", "/nonexistent"], "--key-file /nonexistent"),
])
def test_receive_refuses(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]
                         ) -> None:
    assert main(["migrate-receive", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_protect_refuses_a_key_file_without_a_xen_remus_backup() -> None:
    for flag in ("--stock-backup", "-b"):
        with pytest.raises(UsageError, match="--key-file is for a xen-remus backup"):
            check_args(parse("protect", "-d", "-F", flag, "--key-file", "k", "g1", "hb"))


def test_help_names_the_new_options() -> None:
    rx = build_parser().parse_args(["migrate-receive", "-r", "--fence", "ipmitool x",
                                    "--key-file", "/k"])
    assert rx.fence == "ipmitool x" and rx.fence_timeout == 60.0 and rx.key_file == "/k"
    assert parse("protect", "--key-file", "/k", "g1", "hb").key_file == "/k"


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["migrate-receive", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--fence CMD", "--fence-timeout S", "XEN_REMUS_DOMAIN, XEN_REMUS_EPOCH",
                 "--key-file FILE", "split brain"):
        assert text in out, text
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--key-file FILE" in out and "split brain" in out and "generation" in out


class FakeLink:
    def __init__(self, events: list[object]) -> None:
        self.events = events


@pytest.mark.parametrize("fence,warned", [(False, True), (True, False), (None, True)])
def test_protect_warns_unless_the_backup_fences(fence: bool | None, warned: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    events: list[object] = [] if fence is None else [  # None: a stock backup, no offer
        Offered(Config(mac=True, fence=fence).extensions())]
    _warn_unfenced(cast(Any, FakeLink(events)), "hb", "g1")
    err = capsys.readouterr().err
    assert (err == "xen-remus protect: warning: the backup on hb fails over without "
            "fencing this host (no --fence there): if the link between the hosts breaks, "
            "g1 will run on both (split brain)\n") == warned
    assert bool(err) == warned


def test_the_receiver_is_given_the_key_file_path() -> None:
    assert receiver_rune("hb", None, False, False, "/etc/xen-remus/key") == \
        "exec ssh hb xen-remus migrate-receive -r --key-file /etc/xen-remus/key"
    # Quoted twice: for the local shell, then for the one ssh starts on HOST.
    rune = receiver_rune("hb", None, False, True, "/k dir/it's")
    argv = shlex.split(rune)
    assert argv[:3] == ["exec", "ssh", "hb"] and shlex.split(" ".join(argv[3:])) == [
        "xen-remus", "migrate-receive", "-r", "-e", "--key-file", "/k dir/it's"]
    assert receiver_rune("my command", "", False, False, "/k") == "my command"
