"""`xen-remus protect` / `migrate --remus`: arguments, xl's rules for -n/-d/-F, the rune."""

from __future__ import annotations

import argparse

import pytest

from xen_remus.cli.protect import check_args, cmd_protect, receiver_rune
from xen_remus.errors import UsageError
from xen_remus.migrate_hook import build_parser, command_func, main


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_migrate_remus_is_protect() -> None:
    more = ("--key-file", "/k", "--metrics-file", "/m.prom", "--no-progress")
    args = parse("migrate", "--remus", "-i", "25", "-u", "-n", "-d", "-F", *more, "g1",
                 "hostb")
    p = parse("protect", "-i", "25", "-u", "-n", "-d", "-F", *more, "g1", "hostb")
    assert set(vars(p)) - set(vars(args)) == set()  # protect reads none migrate lacks
    for key in ("interval_ms", "uncompressed", "no_netbuf", "no_disk", "unsafe", "domain",
                "host", "ssh", "no_daemon", "blackhole", "stock_backup", "key_file",
                "metrics_file", "no_progress"):
        assert getattr(args, key) == getattr(p, key), key
    assert p.func is cmd_protect and args.remus
    assert command_func(p) is cmd_protect and command_func(args) is cmd_protect


@pytest.mark.parametrize("argv,msg", [
    (["-n", "-d"], "add -F"),
    (["-i", "0", "-d", "-F"], "interval"),
    (["-d", "-F", "--heartbeat-timeout", "5"], "heartbeat"),
])
def test_refused_arguments(argv: list[str], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        check_args(parse("protect", *argv, "g1", "hostb"))


def test_refusal_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protect", "-n", "g1", "hostb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xen-remus protect: ") and "Traceback" not in err


def test_receiver_rune() -> None:
    assert receiver_rune("hb", None, False, False) == "exec ssh hb xen-remus migrate-receive -r"
    assert receiver_rune("hb", None, True, True) == "exec ssh hb xl migrate-receive -r -e"
    assert receiver_rune("hb", "rsh -p 2", False, False).startswith("exec rsh -p 2 hb ")
    assert receiver_rune("socat - TCP:b:1", "", False, False) == "socat - TCP:b:1"



def test_pipeline_depth_is_parsed_and_checked() -> None:
    args = parse("protect", "--pipeline", "3", "-d", "-F", "g1", "hostb")
    check_args(args)
    assert args.pipeline == 3
    assert parse("protect", "-d", "-F", "g1", "hostb").pipeline == 1  # today's loop
    for bad in ("0", "9"):
        with pytest.raises(UsageError, match=f"--pipeline {bad}: the depth must be 1..8"):
            check_args(parse("protect", "--pipeline", bad, "-d", "-F", "g1", "hostb"))
    assert parse("migrate", "--remus", "--pipeline", "2", "g1", "hostb").pipeline == 2
