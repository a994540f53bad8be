"""The witness on the command line: `xen-remus witness --listen/--query`, and
`migrate-receive -r --witness` holding its copy when the witness does not let it resume
(the same hold as a failed --fence); the driver asks the gate with the sender's
generation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_cli_receive import ROOT, finish, make_stream, read_exact, start
from tests.unit.witness_helpers import KEY, WitnessThread
from xen_remus import xlproto as X
from xen_remus.channel.ends import Config
from xen_remus.channel.negotiate import Extensions
from xen_remus.cli.protect import receiver_rune, witness_rune
from xen_remus.cli.protect_witness import refuse_unwitnessed
from xen_remus.migrate_hook import build_parser
from xen_remus.receive.driver import _gate
from xen_remus.receive.fence import FenceFailed
from xen_remus.receive.timeline import FailoverTimeline
from xen_remus.save.transport import MigrationRefused
from xen_remus.witness import proto as P
from xen_remus.witness.address import Address
from xen_remus.witness.client import WitnessClient
from xen_remus.witness.lease import WitnessGate


def key_file(tmp: str) -> str:
    path = os.path.join(tmp, "key")
    with open(path, "wb") as f:
        f.write(KEY)
    os.chmod(path, 0o600)
    return path


def test_serve_and_query_from_the_command_line(tmp: str) -> None:
    key, sock = key_file(tmp), os.path.join(tmp, "w.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    srv = subprocess.Popen([sys.executable, "-m", "xen_remus", "witness", "--listen",
                            f"unix:{sock}", "--key-file", key, "--state-dir",
                            os.path.join(tmp, "state")], env=env,
                           stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert srv.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        c = WitnessClient(KEY, Address(unix=sock), timeout=5)
        assert c.call(P.Request(P.ACQUIRE, "g1", 2, "hostA", 10_000)).status == P.GRANTED
        c.close()
        q = subprocess.run([sys.executable, "-m", "xen_remus", "witness", "--query", "g1",
                            "--witness", f"unix:{sock}", "--witness-key-file", key],
                           env=env, capture_output=True, text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        assert q.stdout.startswith("g1: generation 2 held by 'hostA' (")
        assert os.path.exists(os.path.join(tmp, "state", "g1.lease"))
    finally:
        srv.terminate()
        _, err = srv.communicate(timeout=30)
    assert b"acquire 'g1' generation 2 for 'hostA': granted" in err


@pytest.mark.parametrize("argv,msg", [
    (["migrate-receive", "--witness", "h:1", "--witness-key-file", "K"], "needs -r"),
    (["migrate-receive", "-r", "--witness", "h:1"], "need a key"),
    (["migrate-receive", "-r", "--witness", "nope", "--witness-key-file", "K"],
     "--witness nope: expected HOST:PORT or unix:/path"),
    (["migrate-receive", "-r", "--fence", "true", "--witness", "h:1",
      "--witness-key-file", "K"], "give one"),
    (["witness", "--key-file", "K"], "give --listen"),
])
def test_bad_witness_options_are_named(argv: list[str], msg: str, tmp: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from xen_remus.migrate_hook import main

    k = key_file(tmp)
    assert main([k if a == "K" else a for a in argv]) == 2
    assert msg in capsys.readouterr().err


def test_a_receiver_the_witness_cannot_decide_for_holds_its_copy(tmp_path: Path) -> None:
    """A stock sender's stream carries no generation: the witness cannot be asked, and
    the copy stays paused exactly as with a failed fence."""
    sock = str(tmp_path / "w.sock")
    w = WitnessThread(tmp_path / "state", [Address(unix=sock)])
    try:
        p = start(tmp_path, "-r", "--witness", f"unix:{sock}", "--witness-key-file",
                  key_file(str(tmp_path)), "--witness-id", "B",
                  XEN_REMUS_RUN_DIR=str(tmp_path), XEN_REMUS_STATE_DIR=str(tmp_path))
        assert p.stdin is not None
        read_exact(p, len(X.BANNER))
        p.stdin.write(make_stream(3, end=False))
        p.stdin.flush()
        rc, err = finish(p, timeout=60)
    finally:
        w.stop()
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"xen-remus migrate-receive: failover from epoch 2 refused: the witness unix:{sock} "
        "cannot be asked: the sender's protection carries no generation; the primary may "
        "still be running, so this host did not resume its copy: it stays paused as "
        "guest--incoming (epoch 2 held)"), err
    # held: xl never saw the EOF that makes it resume, and nothing was destroyed
    assert not (tmp_path / "resumed").exists() and not (tmp_path / "destroyed").exists()
    assert "warning: no --fence" not in err


class GateSink:
    def __init__(self) -> None:
        self.domain_name: str | None = "g1"
        self.held: int | None = None

    def hold(self, epoch: int) -> None:
        self.held = epoch

    def incoming_name(self) -> str:
        return "g1--incoming"


def test_the_driver_asks_the_gate_for_the_senders_generation_plus_one(
        tmp_path: Path) -> None:
    w = WitnessThread(tmp_path / "state", [Address(host="127.0.0.1", port=0)], grace_s=0)
    try:
        host, port = w.bound[0].rsplit(":", 1)
        client = WitnessClient(KEY, Address(host=host, port=int(port)), timeout=2)
        assert client.call(P.Request(P.ACQUIRE, "g1", 6, "A", 1000)).status == P.GRANTED
        sink = GateSink()
        gate = _gate(sink, WitnessGate(client, "B", timeout=5), [], FailoverTimeline(), lambda: 6)  # type: ignore[arg-type]
        gate(4)  # B gets generation 7 once A's 1 s lease ran out
        rec = client.call(P.Request(P.QUERY, "g1")).record
        assert rec is not None and (rec.holder, rec.generation) == ("B", 7)
        assert sink.held is None
        sink2 = GateSink()
        with pytest.raises(FenceFailed, match="refused generation 7: stale"):
            _gate(sink2, WitnessGate(client, "A", timeout=5), [],  # type: ignore[arg-type]
                  FailoverTimeline(), lambda: 6)(4)
        assert sink2.held == 4
    finally:
        w.stop()


def test_protect_passes_the_witness_on_to_its_receiver() -> None:
    args = build_parser("protect").parse_args(
        ["protect", "--witness-via", "socat - /dev/virtio-ports/x", "--witness-key-file",
         "/k", "--witness-id", "A", "g", "hostb"])
    rune = receiver_rune("hostb", None, False, False, None, witness_rune(args))
    assert rune == ("exec ssh hostb xen-remus migrate-receive -r --witness-via "
                    "''\"'\"'socat - /dev/virtio-ports/x'\"'\"'' --witness-key-file /k "
                    "--witness-timeout 120.0")


def test_a_receiver_with_a_witness_says_so_in_its_offer(tmp_path: Path) -> None:
    p = start(tmp_path, "-r", "--witness-via", "cat", "--witness-key-file",
              key_file(str(tmp_path)), "--witness-id", "B",
              XEN_REMUS_RUN_DIR=str(tmp_path), XEN_REMUS_STATE_DIR=str(tmp_path))
    read_exact(p, len(X.BANNER))
    line = b""
    while not line.endswith(b"\n"):
        line += read_exact(p, 1)
    finish(p)
    tokens = line.decode().split()
    assert "witness" in tokens and "fence" in tokens  # a gate, with no bound to offer
    offer = Extensions.parse(line.decode().removeprefix("xen-remus-ext offer "), "offer")
    assert offer.witness and offer.fence and offer.fence_ms is None


@pytest.mark.parametrize("witness,fence,witnessed,refused", [
    (True, False, False, True),  # the witness would give B the guest at once: two copies
    (True, False, True, False),  # both ends ask the same witness
    (False, True, False, False),  # a fence (or a cluster) on B: not the witness's rules
    (False, False, False, False),  # no gate: protect warns (test_trust_cli)
])
def test_protect_without_a_witness_refuses_a_backup_that_asks_one(
        witness: bool, fence: bool, witnessed: bool, refused: bool) -> None:
    offer = Config(fence=witness or fence, witness=witness).extensions()
    if not refused:
        refuse_unwitnessed(offer, witnessed, "hb", "g1")
        return
    with pytest.raises(MigrationRefused, match=(
            r"the backup on hb fails over when a witness lets it \(migrate-receive "
            r"--witness\), but this protect has no --witness: the witness would give it g1 "
            r"at once while g1 runs on here. Give protect the same --witness")):
        refuse_unwitnessed(offer, witnessed, "hb", "g1")
    refuse_unwitnessed(None, False, "hb", "g1")  # a stock backup offers nothing
