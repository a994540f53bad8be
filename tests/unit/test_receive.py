"""The continuous restore, its decisions carried out on a fake sink (receive.driver.Relay):
whole epochs only, failover, cuts, ceilings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from xen_remus.receive.driver import Relay
from xen_remus.restore_continuous import EpochRefused, EpochTooLarge, Outcome, ReceiveError
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import Buffer, EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream
from xen_remus.xlproto import GO


class FakeSink:
    """Records what reached it, and when, as a restore would see it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.commits: list[tuple[int, int]] = []  # (epoch, bytes received by then)
        self.failed_over: int | None = None
        self.aborted: str | None = None
        self.held: int | None = None

    def send(self, bufs: Sequence[Buffer]) -> None:
        assert self.failed_over is None and self.aborted is None
        for b in bufs:
            self.data += b

    def committed(self, epoch: int) -> None:
        self.commits.append((epoch, len(self.data)))

    def failover(self, epoch: int) -> None:
        self.failed_over = epoch

    def abort(self, why: str) -> None:
        self.aborted = why

    def hold(self, epoch: int) -> None:
        self.held = epoch


XTAB = 0xF  # PFINFO type without page data: keeps the every-offset test small


def stream(epochs: int, end: bool, pv: bool = True, pages: int = 1, first: int = 3,
           data: bool = True) -> bytes:
    t0 = None if data else [XTAB] * first
    eps = [make_epoch(list(range(1, 1 + first)), t0, seed=0)]
    eps += [make_epoch([1 + n % 3 + k for k in range(pages)],
                       None if data else [XTAB] * pages, seed=n) for n in range(1, epochs)]
    return b"".join(bytes(b) for b in synthetic_stream("xl", pv, eps, end=end))


def epoch_ends(data: bytes) -> list[int]:
    """Stream offset just past each epoch's CHECKPOINT_END, from the codec."""
    return [e.offset for e in Decoder().feed(data) if isinstance(e, EpochEnd)]


def run(data: bytes, checkpointed: bool, chunks: Sequence[int] = (),
        ceiling: int = 1 << 30) -> tuple[FakeSink, Outcome]:
    sink = FakeSink()
    rx = Relay(sink, checkpointed, ceiling)
    pos, out = 0, None
    try:
        for n in chunks:
            if out is not None or pos >= len(data):
                break
            out = rx.feed(data[pos:pos + n])
            pos += n
        if out is None and pos < len(data):
            out = rx.feed(data[pos:])
        if out is None:
            out = rx.eof()
    except EpochRefused:
        assert rx.outcome is not None and rx.outcome.kind == "refused"
        return sink, rx.outcome
    return sink, out


def test_plain_stream_is_relayed_exactly_and_go_is_left_over() -> None:
    data = stream(1, end=True)
    sink = FakeSink()
    rx = Relay(sink, checkpointed=False)
    out = rx.feed(data + GO)
    assert out is not None and out.kind == "complete"
    assert bytes(sink.data) == data
    assert rx.trailing == GO


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_checkpointed_eof_at_boundary_fails_over_to_last_epoch(chunk: int) -> None:
    data = stream(4, end=False)
    ends = epoch_ends(data)
    assert len(ends) == 4
    sink, out = run(data, True, [chunk] * (len(data) // chunk + 1))
    assert out.kind == "failover" and out.epoch == 3 and out.error is None
    assert sink.failed_over == 3
    assert bytes(sink.data) == data
    # Every commit happened exactly at an epoch boundary.
    assert [c for c in sink.commits] == list(enumerate(ends))


@pytest.mark.parametrize("cut_into", [0, 100])
def test_failover_reason_names_what_ended_the_input(cut_into: int) -> None:
    """A heartbeat timeout (or idle timeout) is named in the failover's reason, not
    reported as a plain EOF; both at an epoch boundary and mid-epoch."""
    data = stream(3, end=False)
    cut = epoch_ends(data)[1] + cut_into
    rx = Relay(FakeSink(), checkpointed=True)
    assert rx.feed(data[:cut]) is None
    out = rx.eof("no word from the primary for more than the heartbeat timeout")
    assert out.kind == "failover" and out.epoch == 1
    where = "at an epoch boundary" if cut_into == 0 else "mid-epoch"
    assert f"heartbeat timeout {where}" in out.reason, out.reason
    assert "EOF" not in out.reason


def test_cut_at_every_offset() -> None:
    """Whatever byte the stream stops at, the sink holds exactly the stream up to the last
    whole epoch (after epoch 0), and fails over from that epoch; before epoch 0 is whole
    the receive aborts and nothing is resumed."""
    data = stream(4, end=False, pv=False, data=False)
    ends = epoch_ends(data)
    assert len(ends) == 4
    for cut in range(1, len(data)):
        sink = FakeSink()
        rx = Relay(sink, checkpointed=True)
        if cut < ends[0]:
            with pytest.raises(ReceiveError, match="before any complete epoch"):
                rx.feed(data[:cut])
                rx.eof()
            assert sink.aborted and sink.failed_over is None
            assert data.startswith(bytes(sink.data))
            continue
        out = rx.feed(data[:cut]) or rx.eof()
        last = max(i for i, e in enumerate(ends) if e <= cut)
        assert out.kind == "failover" and out.epoch == last, cut
        assert sink.failed_over == last
        assert bytes(sink.data) == data[:ends[last]], cut


def test_random_chunking_gives_the_same_bytes() -> None:
    data = stream(5, end=False, pages=3)
    rnd = random.Random(6)
    for _ in range(20):
        chunks = [rnd.randint(1, 9000) for _ in range(len(data))]
        sink, out = run(data, True, chunks)
        assert out.kind == "failover" and out.epoch == 4
        assert bytes(sink.data) == data


def test_invalid_record_mid_epoch_keeps_last_good_epoch() -> None:
    data = bytearray(stream(4, end=False))
    ends = epoch_ends(bytes(data))
    bad = ends[1] + 4  # inside epoch 2's first record header: its length field
    data[bad:bad + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    sink, out = run(bytes(data), True, [1000] * 100)
    assert out.kind == "refused" and out.epoch == 1
    assert sink.held == 1 and sink.failed_over is None and sink.aborted is None
    assert isinstance(out.error, StreamError)
    assert f"offset {bad}" in str(out.error)  # the length field of the bad header
    assert "epoch 2 refused" in out.reason
    assert bytes(sink.data) == bytes(data[:ends[1]])


def test_epoch_over_the_ceiling_is_refused_with_a_clear_error() -> None:
    eps = [make_epoch([1, 2, 3])] + [make_epoch(range(1, 41), seed=n) for n in (1, 2, 3)]
    # epochs 1.. hold 40 pages in records of 4, epoch 0 three
    data = b"".join(bytes(b) for b in synthetic_stream("xl", True, eps, end=False, batch=4))
    sink, out = run(data, True, [8192] * 100, ceiling=100_000)
    assert out.kind == "refused" and out.epoch == 0 and sink.held == 0
    assert isinstance(out.error, EpochTooLarge)
    assert "epoch 1" in str(out.error) and "ceiling" in str(out.error)
    assert bytes(sink.data) == data[:epoch_ends(data)[0]]


def test_checkpoint_in_a_plain_receive_aborts() -> None:
    data = stream(3, end=False)
    sink = FakeSink()
    rx = Relay(sink, checkpointed=False)
    with pytest.raises(ReceiveError, match="CHECKPOINT"):
        rx.feed(data)
    assert sink.aborted is not None and sink.failed_over is None


def test_plain_stream_cut_aborts() -> None:
    data = stream(1, end=True)
    sink = FakeSink()
    rx = Relay(sink, checkpointed=False)
    assert rx.feed(data[:len(data) // 2]) is None
    with pytest.raises(ReceiveError, match="truncated"):
        rx.eof()
    assert sink.aborted is not None


def test_checkpointed_stream_with_final_end_completes() -> None:
    data = stream(3, end=True)
    sink, out = run(data, True, [512] * 1000)
    assert out.kind == "complete" and sink.failed_over is None
    assert bytes(sink.data) == data


def test_bad_last_record_of_an_epoch_keeps_all_of_that_epoch_out() -> None:
    """Validation is per whole epoch: a flaw in the epoch's final record (its
    CHECKPOINT_END) means none of the epoch's earlier, valid records reach the sink."""
    data = bytearray(stream(4, end=False))
    ends = epoch_ends(bytes(data))
    last = ends[2] - 8  # CHECKPOINT_END header of epoch 2 (an empty record)
    assert int.from_bytes(data[last:last + 4], "little") == 4  # LIBXL_CHECKPOINT_END
    data[last + 4:last + 8] = (3).to_bytes(4, "little")  # length 3: body + bad padding
    sink, out = run(bytes(data), True, [4096] * 100)
    assert out.kind == "refused" and out.epoch == 1 and sink.held == 1
    assert isinstance(out.error, StreamError)
    assert bytes(sink.data) == bytes(data[:ends[1]])


def test_undecodable_channel_record_is_refused_keeping_the_last_good_epoch() -> None:
    """A compressed-pages record of ours that does not decode (the channel's rewrite raises)
    spoils its epoch like an invalid standard record: refused, the copy held, the reason
    given to the primary (on_stop), never an escaping error of another kind."""
    from xen_remus.channel.errors import CompressionError

    data = stream(4, end=False)
    ends = epoch_ends(data)
    sink = FakeSink()

    def rewrite(rec: Record, room: int) -> None:
        if rec.offset >= ends[1] and rec.name == "PAGE_DATA":
            raise CompressionError("checksum mismatch", rec.epoch, 1, rec.offset)
        return None

    rx = Relay(sink, True, rewrite=rewrite)
    told: list[str] = []

    def stop(why: str) -> bool:
        told.append(why)
        return True

    rx.on_stop = stop
    with pytest.raises(EpochRefused, match="epoch 2 refused.*checksum.*was told why") as exc:
        rx.feed(data)
    out = rx.outcome
    assert out is not None and out.kind == "refused" and out.epoch == 1 and sink.held == 1
    assert isinstance(exc.value.__cause__, CompressionError)
    assert len(told) == 1 and told[0].startswith("epoch 2 refused") and "checksum" in told[0]
    assert bytes(sink.data) == data[:ends[1]]


HVM_CONFIG = '{"c_info": {"name": "h1", "type": "hvm"}, "b_info": {"type.hvm": {}}}'


def emulator_state_per_epoch(data: bytes) -> dict[int, list[tuple[str, bytes]]]:
    """The emulator records of each whole epoch: (name, blob), in stream order, checked
    to lie between libxc's CHECKPOINT and libxl's CHECKPOINT_END."""
    out: dict[int, list[tuple[str, bytes]]] = {}
    current: list[tuple[str, bytes]] = []
    inside = False
    for ev in Decoder(checkpointed=True, relay=True).feed(data):
        if isinstance(ev, Record) and ev.name == "CHECKPOINT":
            inside = True
        elif isinstance(ev, Record) and ev.name.startswith("EMULATOR_"):
            assert inside, f"{ev.name} outside CHECKPOINT .. CHECKPOINT_END"
            current.append((ev.name, bytes(ev.parse().data)))
        elif isinstance(ev, EpochEnd):
            out[ev.epoch], current, inside = current, [], False
    return out


@pytest.mark.parametrize("chunk", [1, 4096])
def test_stock_hvm_epochs_carry_their_device_state_into_the_sink(chunk: int) -> None:
    """Stock `xl remus` of an HVM guest puts QEMU's state (EMULATOR_XENSTORE_DATA and
    EMULATOR_CONTEXT) after each epoch's CHECKPOINT: each committed epoch reaches the
    sink with its own, byte for byte; the cut epoch's never does."""
    eps = [make_epoch([1, 2, 3], seed=0)] + [make_epoch([1 + n], seed=n) for n in range(1, 4)]
    data = b"".join(bytes(b) for b in synthetic_stream("xl", False, eps, end=False,
                                                       config_json=HVM_CONFIG))
    ends = epoch_ends(data)
    cut = ends[2] + 40  # into epoch 3
    sink, out = run(data[:cut], True, [chunk] * (cut // chunk + 1))
    assert out.kind == "failover" and out.epoch == 2
    assert bytes(sink.data) == data[:ends[2]]
    assert emulator_state_per_epoch(bytes(sink.data)) == {
        n: [("EMULATOR_XENSTORE_DATA", b"physmap/1/size\0abc\0"),
            ("EMULATOR_CONTEXT", b"QEVM-ctx-%d" % n)] for n in range(3)}


def test_stock_hvm_migration_stream_is_relayed_whole() -> None:
    """Stock `xl migrate` of an HVM guest: the emulator records after libxc's END reach
    the sink (stock libxl needs them to start QEMU with the guest's device state)."""
    data = b"".join(bytes(b) for b in synthetic_stream(
        "xl", False, [make_epoch([1, 2, 3])], config_json=HVM_CONFIG))
    sink, out = run(data, checkpointed=False)
    assert out.kind == "complete" and bytes(sink.data) == data
    names = [e.name for e in Decoder(relay=True).feed(data) if isinstance(e, Record)]
    assert names[-4:] == ["END", "EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT", "END"]
