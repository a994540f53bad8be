"""The continuous restore's decisions, sans-IO: what it asks the driver to do, in order,
for the bytes it is fed (no sink: nothing blocks, nothing is raised for a failed receive)."""

from __future__ import annotations

import pytest

from xen_remus.restore_continuous import (
    Abort,
    Committed,
    Complete,
    ContinuousRestore,
    Decision,
    EpochTooLarge,
    FailOver,
    Forward,
    HeaderSeen,
    PartialDropped,
    ReceiveError,
    Refused,
)
from xen_remus.stream.decoder import Decoder
from xen_remus.stream.errors import StreamError
from xen_remus.stream.events import EpochEnd
from xen_remus.stream.records import Record
from xen_remus.stream.synth import make_epoch, synthetic_stream
from xen_remus.xlproto import GO


def stream(epochs: int, end: bool, pages: int = 1) -> bytes:
    eps = [make_epoch([1, 2, 3], seed=0)]
    eps += [make_epoch([1 + n % 3 + k for k in range(pages)], seed=n) for n in range(1, epochs)]
    return b"".join(bytes(b) for b in synthetic_stream("xl", True, eps, end=end))


def epoch_ends(data: bytes) -> list[int]:
    return [e.offset for e in Decoder().feed(data) if isinstance(e, EpochEnd)]


def forwarded(decisions: list[Decision]) -> bytes:
    return b"".join(bytes(b) for d in decisions if isinstance(d, Forward) for b in d.bufs)


def kinds(decisions: list[Decision]) -> list[str]:
    """The decisions' names, consecutive Forwards as one."""
    out: list[str] = []
    for d in decisions:
        name = type(d).__name__
        if not (out and out[-1] == name == "Forward"):
            out.append(name)
    return out


def test_the_header_comes_first_then_the_initial_copy_streams_through() -> None:
    data = stream(3, end=False)
    ends = epoch_ends(data)
    core = ContinuousRestore(checkpointed=True)
    half = core.feed(data[:ends[0] // 2])
    assert isinstance(half[0], HeaderSeen) and half[0].header.config_json()["c_info"]
    assert kinds(half) == ["HeaderSeen", "Forward"]  # epoch 0 goes on as it comes
    rest = core.feed(data[ends[0] // 2:ends[0]])
    assert kinds(rest) == ["Forward", "Committed"] and rest[-1] == Committed(0)
    assert forwarded(half + rest) == data[:ends[0]]
    assert core.committed == 0 and not core.finished


def test_on_header_runs_before_any_record_of_the_same_bytes_is_rewritten() -> None:
    """The rewrite of a disk's records needs the guest's config: with the header and the
    records in one read, the header must be known before the first record is taken."""
    seen: list[str] = []

    def rewrite(rec: Record, room: int) -> None:
        seen.append(rec.name)

    core = ContinuousRestore(checkpointed=True, rewrite=rewrite)
    core.on_header = lambda hdr: seen.append("header")
    data = stream(2, end=False)
    core.feed(data)  # all of it in one read
    assert seen[0] == "header" and len(seen) > 1 and seen.count("header") == 1


def test_a_later_epoch_is_forwarded_only_whole_then_committed() -> None:
    data = stream(3, end=False)
    ends = epoch_ends(data)
    core = ContinuousRestore(checkpointed=True)
    core.feed(data[:ends[0]])
    assert core.feed(data[ends[0]:ends[1] - 1]) == []  # held: nothing to do yet
    last = core.feed(data[ends[1] - 1:ends[1]])
    assert kinds(last) == ["Forward", "Committed"] and last[-1] == Committed(1)
    assert forwarded(last) == data[ends[0]:ends[1]]


def test_eof_mid_epoch_drops_the_partial_epoch_and_fails_over() -> None:
    data = stream(4, end=False)
    ends = epoch_ends(data)
    cut = ends[1] + 100
    core = ContinuousRestore(checkpointed=True)
    core.feed(data[:cut])
    out = core.eof()
    assert out[0] == PartialDropped(2, cut - ends[1], ends[1])
    assert isinstance(out[1], FailOver) and len(out) == 2
    assert (out[1].epoch, out[1].offset, out[1].error) == (1, cut, None)
    assert "EOF mid-epoch" in out[1].reason
    assert core.finished and core.eof() == []


def test_eof_at_a_boundary_fails_over_with_nothing_dropped() -> None:
    data = stream(3, end=False)
    core = ContinuousRestore(checkpointed=True)
    core.feed(data)
    out = core.eof("no word from the primary for more than the heartbeat timeout")
    assert kinds(out) == ["FailOver"]
    assert isinstance(out[0], FailOver) and out[0].epoch == 2
    assert "heartbeat timeout at an epoch boundary" in out[0].reason


def test_an_invalid_epoch_is_refused_not_failed_over() -> None:
    """The primary sent it, so it is alive: the epoch is dropped and the last committed
    one kept, without resuming it (Refused, not FailOver)."""
    data = bytearray(stream(4, end=False))
    ends = epoch_ends(bytes(data))
    data[ends[1]:ends[1] + 4] = (0x7777).to_bytes(4, "little")  # unknown record type
    core = ContinuousRestore(checkpointed=True)
    out = core.feed(bytes(data))
    assert kinds(out)[-2:] == ["PartialDropped", "Refused"] and core.finished
    last = out[-1]
    assert isinstance(last, Refused) and isinstance(last.error, StreamError)
    assert last.epoch == 1 and last.reason.startswith("epoch 2 refused: ")
    assert f"offset {ends[1]}" in last.reason and "0x00007777" in last.reason
    assert forwarded(out) == bytes(data[:ends[1]])
    assert [d.epoch for d in out if isinstance(d, Committed)] == [0, 1]


def test_an_epoch_over_the_ceiling_is_refused() -> None:
    eps = [make_epoch([1, 2, 3])] + [make_epoch(range(1, 41), seed=n) for n in (1, 2)]
    data = b"".join(bytes(b) for b in synthetic_stream("xl", True, eps, end=False, batch=4))
    ends = epoch_ends(data)
    # Epoch 0's 3 pages fit (fed in chunks: what a feed holds counts too, and the
    # decoder's reassembly buffers), epoch 1's 40 pages (10 records) do not.
    core = ContinuousRestore(checkpointed=True, max_epoch_bytes=80_000)
    out = [d for i in range(0, len(data), 1000) if not core.finished
           for d in core.feed(data[i:i + 1000])]
    last = out[-1]
    assert isinstance(last, Refused) and isinstance(last.error, EpochTooLarge)
    assert last.epoch == 0 and forwarded(out) == data[:ends[0]]
    assert "epoch 1:" in last.reason and "PAGE_DATA" in last.reason


def test_eof_mid_epoch_after_an_error_free_epoch_still_fails_over() -> None:
    """Only a bad epoch is refused: the primary dying mid-send is a failover."""
    data = stream(3, end=False)
    ends = epoch_ends(data)
    core = ContinuousRestore(checkpointed=True)
    core.feed(data[:ends[1] + 20])
    out = core.eof()
    assert isinstance(out[-1], FailOver) and out[-1].epoch == 1 and out[-1].error is None


def test_a_break_before_any_epoch_is_an_abort_decision_not_an_exception() -> None:
    data = stream(2, end=False)
    core = ContinuousRestore(checkpointed=True)
    first = core.feed(data[:epoch_ends(data)[0] - 1])
    assert data.startswith(forwarded(first)) and "Committed" not in kinds(first)
    out = core.eof()
    assert isinstance(out[-1], Abort) and core.finished
    assert "stream broken before any complete epoch" in out[-1].why
    assert isinstance(out[-1].error, StreamError)


def test_end_completes_and_leaves_the_go_in_trailing() -> None:
    data = stream(2, end=True)
    core = ContinuousRestore(checkpointed=True)
    out = core.feed(data + GO)
    assert out[-1] == Complete(len(epoch_ends(data)) - 1, len(data))  # last CHECKPOINT_END
    assert forwarded(out) == data and core.trailing == GO
    with pytest.raises(ReceiveError, match="after the stream ended"):
        core.feed(b"more")


def test_rewrite_replaces_what_is_forwarded() -> None:
    data = stream(2, end=False)
    core = ContinuousRestore(checkpointed=True, rewrite=lambda rec, room: [b"R"])
    out = core.feed(data)
    want = b"".join(b"R" if isinstance(e, Record) else bytes(e.wire)
                    for e in Decoder().feed(data))
    assert forwarded(out) == want and b"R" in want
    assert [d.epoch for d in out if isinstance(d, Committed)] == [0, 1]
