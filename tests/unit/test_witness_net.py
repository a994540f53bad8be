"""A real witness (asyncio server in a thread) and real clients: over a socketpair, TCP on
localhost, a Unix socket and a command's pipes; restarts; the primary's lease keeper and
output gate, the backup's failover gate. Every wait is bounded."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.witness_helpers import KEY, WitnessThread
from xen_remus.witness import proto as P
from xen_remus.witness.address import Address, parse
from xen_remus.witness.client import WitnessClient, WitnessUnreachable
from xen_remus.witness.lease import LeaseKeeper, LeaseLost, OutputGate, WitnessGate

TCP = Address(host="127.0.0.1", port=0)


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[WitnessThread]:
    w = WitnessThread(tmp_path / "state", [TCP, Address(unix=str(tmp_path / "w.sock"))])
    yield w
    w.stop()


def acquire(gen: int, holder: str, dur: int = 10_000) -> P.Request:
    return P.Request(P.ACQUIRE, "g1", gen, holder, dur)


def test_tcp_unix_and_socketpair_clients_share_one_witness(witness: WitnessThread) -> None:
    tcp = WitnessClient(KEY, parse(witness.bound[0], "test"), timeout=5)
    unix = WitnessClient(KEY, parse(witness.bound[1], "test"), timeout=5)
    pair = WitnessClient(KEY, opener=lambda deadline: witness.pair(), timeout=5)
    try:
        assert tcp.call(acquire(3, "A")).status == P.GRANTED
        busy = unix.call(acquire(4, "B"))
        assert busy.status == P.BUSY and busy.record is not None
        assert (busy.record.holder, busy.record.generation) == ("A", 3)
        assert pair.call(acquire(3, "B")).status == P.STALE
        # Many requests over one connection, one session.
        for _ in range(5):
            assert tcp.call(P.Request(P.RENEW, "g1", 3, "A", 10_000)).status == P.GRANTED
    finally:
        for c in (tcp, unix, pair):
            c.close()


def test_a_client_through_a_command(witness: WitnessThread, tmp_path: Path) -> None:
    via = f"exec socat - UNIX-CONNECT:{tmp_path / 'w.sock'}"
    c = WitnessClient(KEY, via=via, timeout=5)
    try:
        assert c.call(acquire(1, "A")).status == P.GRANTED
        assert c._proc is not None
        c._proc.kill()  # the command dies: the next call starts it again
        c._proc.wait(5)
        assert c.call(P.Request(P.QUERY, "g1")).record is not None
    finally:
        c.close()


def test_a_client_with_another_key_gets_no_answer(witness: WitnessThread) -> None:
    c = WitnessClient(b"x" * 32, parse(witness.bound[0], "test"), timeout=1)
    t0 = time.monotonic()
    with pytest.raises(WitnessUnreachable, match="timed out waiting for its WELCOME"):
        c.call(acquire(1, "A"))
    assert time.monotonic() - t0 < 3


def test_no_witness_is_unreachable_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = WitnessClient(KEY, Address(host="127.0.0.1", port=port), timeout=2)
    with pytest.raises(WitnessUnreachable, match=f"127.0.0.1:{port}: acquire 'g1'"):
        c.call(acquire(1, "A"))


def test_a_silent_peer_times_out_in_bounded_time() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        c = WitnessClient(KEY, Address(host="127.0.0.1", port=srv.getsockname()[1]),
                          timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(WitnessUnreachable, match="timed out"):
            c.call(acquire(1, "A"))
        assert time.monotonic() - t0 < 2


def test_a_restarted_witness_does_not_hand_the_lease_over(tmp_path: Path) -> None:
    sock = Address(unix=str(tmp_path / "w.sock"))
    w = WitnessThread(tmp_path / "state", [sock], grace_s=0.2)
    c = WitnessClient(KEY, sock, timeout=5)
    try:
        assert c.call(acquire(3, "A", 2000)).status == P.GRANTED
    finally:
        w.stop()
        c.close()
    w = WitnessThread(tmp_path / "state", [sock], grace_s=0.2)
    try:
        # The lease counts again from the restart: B has to wait it out.
        assert c.call(acquire(2, "B")).status == P.STALE
        assert c.call(acquire(4, "B")).status == P.BUSY
        deadline = time.monotonic() + 5
        while c.call(acquire(4, "B")).status != P.GRANTED:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        w.stop()
        c.close()


# -- the primary's lease, the backup's gate -----------------------------------------------
def keeper(w: WitnessThread, holder: str = "A", gen: int = 3) -> LeaseKeeper:
    c = WitnessClient(KEY, parse(w.bound[0], "test"), timeout=1)
    return LeaseKeeper(c, "g1", gen, holder, duration_s=1.2, margin_s=0.4)


def test_the_keeper_renews_and_the_lease_goes_when_the_witness_does(tmp_path: Path) -> None:
    w = WitnessThread(tmp_path / "state", [TCP])
    k = keeper(w)
    k.acquire(5)
    k.start()
    try:
        time.sleep(2.0)  # past the first lease: only renewals keep it
        assert k.valid()
        w.stop()
        t0 = time.monotonic()
        while k.valid():
            assert time.monotonic() - t0 < 1.2, "still valid after the whole lease"
            time.sleep(0.05)
        # It went at most a lease minus the margin after the last grant.
        assert time.monotonic() - t0 <= 0.85
        assert k.lost is None and k.last_error is not None
    finally:
        k.stop()


def test_the_backup_wins_once_the_primary_stops_renewing(witness: WitnessThread) -> None:
    a = keeper(witness)
    a.acquire(5)
    a.start()
    gate = WitnessGate(WitnessClient(KEY, parse(witness.bound[1], "t"), timeout=2), "B",
                       timeout=0.5)
    assert gate.run("g1", 7, 3) is not None  # A renews: B is told to wait, then gives up
    a.stop()  # A dies
    t0 = time.monotonic()
    gate = WitnessGate(gate.client, "B", timeout=10)
    assert gate.run("g1", 7, 3) is None
    took = time.monotonic() - t0
    assert 0.5 <= took < 5  # A's lease (1.2 s) plus the grace (0.5 s) from its last renewal
    # A learns it lost: its renewal is refused for good.
    a.start()
    deadline = time.monotonic() + 5
    while a.lost is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not a.valid() and "generation 4" in a.lost
    a.stop()


def test_the_primary_claims_first_and_the_backups_copy_stays_held(
        witness: WitnessThread) -> None:
    a = keeper(witness)
    a.acquire(5)
    a.start()
    pauses: list[str] = []
    gate = OutputGate(a, lambda: pauses.append("pause"), lambda: pauses.append("unpause"))
    assert gate.claim(5) is None and pauses == []
    b = WitnessGate(WitnessClient(KEY, parse(witness.bound[1], "t"), timeout=2), "B",
                    timeout=5)
    t0 = time.monotonic()
    why = b.run("g1", 7, 3)
    assert why is not None and why.startswith("refused generation 4: stale")
    assert time.monotonic() - t0 < 1  # no waiting for a lease: never this copy's
    assert b.run("g1", 7, None) == ("cannot be asked: the sender's protection carries no "
                                    "generation")


def test_the_output_gate_pauses_until_the_lease_is_back(tmp_path: Path) -> None:
    w = WitnessThread(tmp_path / "state", [TCP])
    port = int(w.bound[0].rsplit(":", 1)[1])
    k = keeper(w)
    k.acquire(5)
    k.start()
    calls: list[str] = []
    gate = OutputGate(k, lambda: calls.append("pause"), lambda: calls.append("unpause"),
                      lambda state, why: calls.append(state))
    try:
        gate(1)
        assert calls == []
        w.stop()
        while k.valid():
            time.sleep(0.05)
        done = threading.Event()
        def commit() -> None:
            gate(2)
            done.set()

        t = threading.Thread(target=commit, daemon=True)
        t.start()
        time.sleep(0.5)
        assert calls == ["pause", "paused"] and not done.is_set()
        w2 = WitnessThread(tmp_path / "state", [Address(host="127.0.0.1", port=port)])
        assert done.wait(10)
        assert calls == ["pause", "paused", "unpause", "protecting"]
        w2.stop()
    finally:
        k.stop()


def test_the_output_gate_raises_when_another_host_has_the_guest(
        witness: WitnessThread) -> None:
    k = keeper(witness)
    k.acquire(5)
    calls: list[str] = []
    gate = OutputGate(k, lambda: calls.append("pause"), lambda: calls.append("unpause"))
    time.sleep(1.3)  # not renewed: expired; B takes generation 4 after the grace
    b = WitnessGate(WitnessClient(KEY, parse(witness.bound[0], "t"), timeout=2), "B", 10)
    assert b.run("g1", 9, 3) is None
    k.start()
    with pytest.raises(LeaseLost, match="generation 3 of 'A' is not the current one"):
        gate(10)
    k.stop()
    assert calls == ["pause"]  # and never let go


def test_the_keeper_refuses_to_start_a_stale_protection(witness: WitnessThread) -> None:
    c = WitnessClient(KEY, parse(witness.bound[0], "t"), timeout=2)
    assert c.call(acquire(5, "B")).status == P.GRANTED
    k = LeaseKeeper(c, "g1", 4, "A")
    with pytest.raises(LeaseLost, match="generation 4 is lower"):
        k.acquire(5)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("Linux only")
