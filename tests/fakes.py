"""In-memory fakes for the save engine and the devices, shared by the unit tests and the
benchmark.

For the tests: FakeDomain, FakeGuest and RecordingEmitter play a Xen domain, a guest type
and a record sink, and let a test misbehave at each step; RecordingDevice and RecordingStub
log the calls made on a checkpointed device and on any other interface of its kind (a
disk's control), and fail where told; ManualClock is a clock the test moves.
LaggingBackup is the epoch loop's link to a backup that ACKs each epoch a given time
after it was sent, on a virtual clock. FakeQmpServer plays qemu-xen's QMP socket;
FakeDeviceModel is the save engine's device model. For the
benchmark: MemDomain and MemGuest cost next to nothing, so what is measured is our code.
The product never imports this module (nor anything under tests/).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from xen_remus.channel.link import BackupLost
from xen_remus.channel.sender import Acked
from xen_remus.channel.stats import EpochStats
from xen_remus.devices.base import Device, DeviceError
from xen_remus.save.hvm import HvmGuest
from xen_remus.save.ops import Emitter, Normalised
from xen_remus.save.pages import Pfns, Types
from xen_remus.stream.consts import PAGE_SIZE, PFINFO_NOTAB, PFINFO_XTAB
from xen_remus.stream.events import Buffer

OFFSET = 0x1000  # frame = pfn + OFFSET, so that a missed pfn->frame translation shows


class FakeMapping:
    def __init__(self, data: bytearray, errors: npt.NDArray[np.int32]) -> None:
        self._data = data
        self.view = memoryview(data).toreadonly()
        self.errors = errors
        self.closed = False

    def close(self) -> None:
        self.view.release()
        self.closed = True


class FakeDomain:
    """Memory is one bytearray of pages by pfn. ``on_clean(round)`` lets a test play the
    guest: write pages (which marks them dirty) between two log-dirty cleans."""

    domid = 7

    def __init__(self, nr_pfns: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.nr_pfns = nr_pfns
        self.mem = bytearray(rng.integers(0, 256, nr_pfns * PAGE_SIZE, dtype=np.uint8))
        self.types = np.full(nr_pfns, PFINFO_NOTAB, dtype=np.uint8)
        self.dirty: set[int] = set()
        self.logdirty = False
        self.suspended = False
        self.resumed = 0
        self.paused = False
        self.cleans = 0
        self.on_clean: Callable[[int], None] | None = None
        self.map_errors: dict[int, int] = {}  # pfn -> errno
        self.mappings: list[FakeMapping] = []
        self.fail_suspend = False
        self.calls: list[str] = []

    def write(self, pfn: int, byte: int) -> None:
        assert not self.suspended, "a suspended guest does not write"
        self.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = bytes([byte]) * PAGE_SIZE
        if self.logdirty:
            self.dirty.add(pfn)

    def logdirty_enable(self) -> None:
        self.calls.append("logdirty_enable")
        self.logdirty = True
        self.dirty.clear()

    def logdirty_clean(self, final: bool) -> Pfns:
        assert self.logdirty
        self.calls.append(f"clean(final={final})")
        if self.on_clean is not None and not self.suspended:
            self.on_clean(self.cleans)
        self.cleans += 1
        out = np.array(sorted(self.dirty), dtype=np.uint64)
        self.dirty.clear()
        return out

    def logdirty_off(self) -> None:
        self.calls.append("logdirty_off")
        self.logdirty = False

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> Types:
        pfns = frames.astype(np.int64) - OFFSET
        out = np.full(len(frames), PFINFO_XTAB, dtype=np.uint8)
        inside = (pfns >= 0) & (pfns < self.nr_pfns)
        out[inside] = self.types[pfns[inside]]
        return out

    def map(self, frames: npt.NDArray[np.uint64]) -> FakeMapping:
        pfns = frames.astype(np.int64) - OFFSET
        buf = bytearray()
        errs = np.zeros(len(frames), dtype=np.int32)
        for i, pfn in enumerate(pfns):
            buf += self.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
            errs[i] = self.map_errors.get(int(pfn), 0)
        m = FakeMapping(buf, errs)
        self.mappings.append(m)
        return m

    def suspend(self) -> None:
        self.calls.append("suspend")
        if self.fail_suspend:
            from xen_remus.xen.errors import SuspendError
            raise SuspendError(f"domain {self.domid} did not suspend")
        self.suspended = True

    def resume(self) -> None:
        self.calls.append("resume")
        self.suspended = False
        self.resumed += 1

    def pause(self) -> None:
        self.calls.append("pause")
        self.paused = True


class FakeGuest:
    """An HVM-like guest type (domain_type 2) with a pfn->frame offset; pfns listed in
    ``ballooned`` have no frame; pages of a type in ``retry_types`` cannot be normalised
    until the guest is suspended; pages of type 1 (L1TAB) are 'normalised' to 0xAA."""

    domain_type = 2

    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom
        self.ballooned: set[int] = set()
        self.retry_live: set[int] = set()  # pfns whose pagetable is not sendable while live
        self.retry_always: set[int] = set()
        self.normalised_pfns: list[int] = []
        self._last_pfns: Pfns = np.zeros(0, dtype=np.uint64)
        self.closed = False

    def nr_pfns(self) -> int:
        return self.dom.nr_pfns

    def static_data(self, out: Emitter) -> None:
        out.libxc_record(0x11, [b"\0" * 24])

    def start_of_stream(self, out: Emitter) -> None:
        pass

    def p2m_changes(self, out: Emitter, live: bool) -> Pfns:
        return np.zeros(0, dtype=np.uint64)

    def pfn_to_gfn(self, pfns: Pfns) -> npt.NDArray[np.uint64]:
        self._last_pfns = pfns
        out = pfns + np.uint64(OFFSET)
        for i, p in enumerate(pfns):
            if int(p) in self.ballooned:
                out[i] = np.uint64(0xFFFFFFFFFFFFFFFF)
        return out

    def normalise(self, types: Types, pages: memoryview, live: bool) -> Normalised:
        # the engine calls pfn_to_gfn then normalise for the same batch
        frames = self.pfn_to_gfn(self._last_pfns)
        data_pfns = [int(p) for p, f in zip(self._last_pfns, frames, strict=True)
                     if int(f) != 0xFFFFFFFFFFFFFFFF
                     and self.dom.types[int(p)] < 0xD]
        assert len(data_pfns) == len(types)
        res = Normalised(retry=np.zeros(len(types), dtype=np.bool_))
        assert res.retry is not None
        for i, t in enumerate(types):
            if t == 1:
                pfn = data_pfns[i]
                if pfn in self.retry_always or (live and pfn in self.retry_live):
                    res.retry[i] = True
                    continue
                res.replaced[i] = b"\xaa" * PAGE_SIZE
                self.normalised_pfns.append(pfn)
        return res

    def end_of_checkpoint(self, out: Emitter) -> None:
        out.libxc_record(0x08, [b"\0" * 24])

    def close(self) -> None:
        self.closed = True


class RecordingEmitter:
    """Records what the engine emits; rebuilds the receiver's view of guest memory.
    ``bodies``: each libxc record other than PAGE_DATA as (index in ``events``, type,
    body)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.bodies: list[tuple[int, int, bytes]] = []
        self.pages: dict[int, bytes] = {}
        self.types: dict[int, int] = {}
        self.batch_sizes: list[int] = []
        self.buffers_per_record: list[int] = []
        self.emulator: list[bytes] = []  # bodies of the emulator records, in order

    def begin(self, domain_type: int) -> None:
        self.events.append(("begin", domain_type))

    def checkpoint(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self.events.append(("checkpoint", 0))
        self._emulator(emulator)

    def end(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        self.events.append(("end", 0))
        self._emulator(emulator)

    def _emulator(self, records: Sequence[Sequence[Buffer]]) -> None:
        """Each whole emulator record as ("libxl", type), its body in ``emulator``."""
        for rec in records:
            raw = b"".join(bytes(b) for b in rec)
            rtype, length = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:8], "little")
            self.events.append(("libxl", rtype))
            self.emulator.append(raw[8:8 + length])

    def flush(self) -> None:
        pass

    def libxc_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self.bodies.append((len(self.events), rtype, b"".join(bytes(b) for b in body)))
        self.events.append(("libxc", rtype))

    def libxl_record(self, rtype: int, body: Sequence[Buffer]) -> None:
        self.events.append(("libxl", rtype))

    def page_data(self, pfns: Pfns, types: Types, pages: Sequence[Buffer]) -> None:
        assert 0 < len(pfns) <= 1024 and len(pfns) == len(types)
        self.events.append(("libxc", 0x01))
        self.batch_sizes.append(len(pfns))
        self.buffers_per_record.append(len(pages))
        data = b"".join(bytes(p) for p in pages)
        assert len(data) % PAGE_SIZE == 0
        n = 0
        for pfn, t in zip(pfns, types, strict=True):
            self.types[int(pfn)] = int(t)
            if t < 0xD:
                self.pages[int(pfn)] = data[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]
                n += 1
        assert n * PAGE_SIZE == len(data), "page data count does not match the types"


class BufferingEmitter(RecordingEmitter):
    """RecordingEmitter as the epoch loop's buffer too (CheckpointEmitter's interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffering = False
        self.transmitted = 0

    def transmit(self) -> int:
        self.transmitted += 1
        return 0


class LaggingBackup:
    """The epoch loop's link (save_continuous.EpochLink) to a backup that ACKs epoch N
    ``lag(N)`` seconds after it was sent, in epoch order (an ACK never overtakes an older
    one), on a virtual clock (``now``, moved by the waits). ``acks`` False: a stock backup.
    From ``lost_at`` on, every wait raises BackupLost. ``delivered`` lists the ACKs handed
    to the loop; ``max_awaiting`` is the most epochs sent and not ACKed at once."""

    def __init__(self, lag: Callable[[int], float], acks: bool = True,
                 lost_at: float | None = None) -> None:
        self.lag, self.acks, self.lost_at = lag, acks, lost_at
        self.now = 0.0
        self.sent: dict[int, float] = {}  # epoch -> when its ACK is due
        self.delivered: list[int] = []
        self.max_awaiting = 0
        self.wrong_epoch: int | None = None  # hand this epoch in the next ACK instead

    def clock(self) -> float:
        return self.now

    def start_heartbeats(self) -> None:
        pass

    def stop_heartbeats(self) -> None:
        pass

    def _check(self) -> None:
        if self.lost_at is not None and self.now >= self.lost_at:
            raise BackupLost(f"backup lost at {self.lost_at} (epochs awaiting: "
                             f"{sorted(self.sent)})")

    def idle(self, until: float) -> None:
        if self.lost_at is not None and until >= self.lost_at:
            self.now = max(self.now, self.lost_at)
        self._check()
        self.now = max(self.now, until)

    def epoch_sent(self, epoch: int, pause_ms: float, dirty_pages: int,
                   send_ms: float) -> EpochStats | None:
        st = EpochStats(epoch, pause_ms, dirty_pages, 0, 0, send_ms)
        if not self.acks:
            return st
        # In order: never before the ACK of the epoch sent before it.
        due = max([self.now + self.lag(epoch), *self.sent.values()])
        self.sent[epoch] = due
        self.max_awaiting = max(self.max_awaiting, len(self.sent))
        return None

    def next_ack(self, until: float | None) -> Acked | None:
        if not self.acks:
            return None
        self._check()
        if not self.sent:
            raise AssertionError("the loop waits for an ACK with no epoch awaiting one")
        epoch = min(self.sent)
        due = self.sent[epoch]
        if self.lost_at is not None and due >= self.lost_at and (
                until is None or until >= self.lost_at):
            self.now = max(self.now, self.lost_at)
            self._check()
        if until is not None and due > until:
            self.now = max(self.now, until)
            return None
        self.now = max(self.now, due)
        del self.sent[epoch]
        if self.wrong_epoch is not None:
            epoch, self.wrong_epoch = self.wrong_epoch, None
        self.delivered.append(epoch)
        return Acked(epoch, EpochStats(epoch, ack_ms=self.lag(epoch) * 1000), 0.0)


# -- devices -------------------------------------------------------------------------------

class Recorder:
    """Logs each call into ``log`` as "op(args) label" (one list for several fakes shows the
    order across them); the op named ``fail`` then raises ``exc``, by default a DeviceError
    naming the call."""

    def __init__(self, log: list[str], label: str, fail: str = "",
                 exc: Exception | None = None) -> None:
        self.log, self.label, self.fail, self.exc = log, label, fail, exc

    @property
    def name(self) -> str:
        return self.label

    def record(self, op: str, *args: int) -> None:
        call = f"{op}({', '.join(map(str, args))})" if args else op
        self.log.append(f"{call} {self.label}")
        if op == self.fail:
            raise self.exc or DeviceError(f"{self.label}: {call} broke")


class RecordingDevice(Recorder, Device):
    """A checkpointed device of commit ``order`` that records every call."""

    def __init__(self, log: list[str], label: str, order: int, fail: str = "") -> None:
        super().__init__(log, label, fail)
        self.order = order

    def setup(self) -> None:
        self.record("setup")

    def postsuspend(self, epoch: int) -> None:
        self.record("postsuspend", epoch)

    def preresume(self) -> None:
        self.record("preresume")

    def commit(self, epoch: int) -> None:
        self.record("commit", epoch)

    def release_all(self) -> None:
        self.record("release_all")

    def teardown(self) -> None:
        self.record("teardown")


class RecordingStub(Recorder):
    """Any interface whose methods take ints and return None (a DiskControl, say): every
    public method call is recorded under the method's name."""

    def __getattr__(self, op: str) -> Callable[..., None]:
        if op.startswith("_"):
            raise AttributeError(op)
        return functools.partial(self.record, op)


# -- for the benchmark ----------------------------------------------------------------------

class MemMapping:
    def __init__(self, view: memoryview, n: int) -> None:
        self.view = view
        self.errors = np.zeros(n, dtype=np.int32)

    def close(self) -> None:
        pass


class MemDomain:
    """DomainOps over guest memory held as one (n x PAGE_SIZE) array: every page NOTAB,
    nothing fails, ``dirty`` is what the caller wrote since the last clean. A batch of
    consecutive frames maps as a view of the array (a foreign mapping is one view of guest
    memory, no copy); any other batch is gathered into a new array (one copy)."""

    domid = 0

    def __init__(self, mem: npt.NDArray[np.uint8]) -> None:
        self.mem = mem.reshape(-1, PAGE_SIZE)
        self.dirty = np.zeros(0, dtype=np.uint64)

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> Types:
        return np.zeros(len(frames), dtype=np.uint8)

    def map(self, frames: npt.NDArray[np.uint64]) -> MemMapping:
        first, n = int(frames[0]), len(frames)
        if int(frames[-1]) == first + n - 1:  # sorted and distinct, so consecutive
            pages = self.mem[first:first + n]
        else:
            pages = self.mem[frames.astype(np.int64)]
        return MemMapping(memoryview(pages.reshape(-1).data), n)

    def suspend(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def logdirty_enable(self) -> None:
        pass

    def logdirty_clean(self, final: bool) -> Pfns:
        out, self.dirty = self.dirty, np.zeros(0, dtype=np.uint64)
        return out

    def logdirty_off(self) -> None:
        pass


class MemGuest(HvmGuest):
    """An HVM-type guest with nothing of Xen behind it: HvmGuest's pfn == gfn and no
    pagetables, and no state records at all."""

    def __init__(self, nr_pfns: int) -> None:  # no XenCtrl to ask
        self._nr = nr_pfns

    def static_data(self, out: Emitter) -> None:
        pass

    def end_of_checkpoint(self, out: Emitter) -> None:
        pass


class NoDevices:
    """EpochDevices of a guest without devices to protect."""

    def postsuspend(self, epoch: int) -> None:
        pass

    def preresume(self) -> None:
        pass

    def idle(self) -> None:
        pass

    def commit(self, epoch: int) -> None:
        pass


def swallow(sock: socket.socket, stop: threading.Event,
            on_data: Callable[[], None] | None = None) -> threading.Thread:
    """A peer that reads (and drops) everything ``sock`` receives until ``stop`` or EOF,
    calling ``on_data`` after each chunk: a backup that never answers, or one that
    injects frames of its own."""

    def run() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if not sock.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return
            if on_data is not None:
                on_data()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class ManualClock:
    """A monotonic clock that moves only when told (for code that takes ``clock``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- device model --------------------------------------------------------------------------

class FakeQmpServer:
    """qemu-xen's QMP socket, as far as the save path uses it: greeting, qmp_capabilities,
    stop / cont (a STOP / RESUME event before the reply), xen-set-global-dirty-log, add-fd
    (takes the fd passed with it), xen-save-devices-state into "/dev/fdset/N" (writes
    ``state``, truncating first) and remove-fd. ``fail`` maps a command to the (class,
    desc) of the error it gets; ``chunk`` cuts every message QEMU sends into pieces of
    that many bytes. One connection at a time, each logged in ``connections``; every
    command in ``commands`` as (name, arguments)."""

    def __init__(self, path: str, state: bytes = b"QEVM\x00\x00\x00\x03dev-state",
                 chunk: int = 0) -> None:
        self.path, self.state, self.chunk = path, state, chunk
        self.fail: dict[str, tuple[str, str]] = {}
        self.commands: list[tuple[str, dict[str, object]]] = []
        self.connections = 0
        self.running = True
        self.dirty_log = False
        self.fdsets: dict[int, int] = {}  # fdset-id -> our dup of the fd QEMU was given
        self._next_fdset = 0
        self._stop = threading.Event()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(4)
        self._srv.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()
        for fd in self.fdsets.values():
            os.close(fd)
        self.fdsets.clear()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                self._session(conn)

    def _send(self, conn: socket.socket, obj: dict[str, object]) -> None:
        data = json.dumps(obj).encode() + b"\r\n"
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            conn.sendall(data[i:i + step])

    def _session(self, conn: socket.socket) -> None:
        self._send(conn, {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                              "package": ""}, "capabilities": ["oob"]}})
        buf, fds = b"", []
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, got, _flags, _addr = socket.recv_fds(conn, 65536, 4)
            except TimeoutError:
                continue
            if not data:
                return
            buf += data
            fds += got
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    fds = self._command(conn, json.loads(line), fds)

    def _command(self, conn: socket.socket, msg: dict[str, object],
                 fds: list[int]) -> list[int]:
        name = str(msg["execute"])
        args = msg.get("arguments") or {}
        assert isinstance(args, dict)
        self.commands.append((name, args))
        reply: dict[str, object] = {"id": msg.get("id")}
        if name in self.fail:
            cls, desc = self.fail[name]
            reply["error"] = {"class": cls, "desc": desc}
            self._send(conn, reply)
            return fds
        value: object = {}
        if name == "stop":
            self.running = False
            self._send(conn, {"event": "STOP", "data": {}})
        elif name == "cont":
            self.running = True
            self._send(conn, {"event": "RESUME", "data": {}})
        elif name == "xen-set-global-dirty-log":
            self.dirty_log = bool(args["enable"])
        elif name == "add-fd":
            fdset, self._next_fdset = self._next_fdset, self._next_fdset + 1
            self.fdsets[fdset] = fds.pop(0)
            value = {"fdset-id": fdset, "fd": 40 + fdset}
        elif name == "remove-fd":
            os.close(self.fdsets.pop(int(str(args["fdset-id"]))))
        elif name == "xen-save-devices-state":
            fd = self.fdsets[int(str(args["filename"]).removeprefix("/dev/fdset/"))]
            os.ftruncate(fd, 0)
            os.write(fd, self.state)
        elif name != "qmp_capabilities":
            reply["error"] = {"class": "CommandNotFound",
                              "desc": f"The command {name} has not been found"}
            self._send(conn, reply)
            return fds
        reply["return"] = value
        self._send(conn, reply)
        return fds


class FakeDeviceModel:
    """The save engine's device model (save/ops.py DeviceModelOps): logs each call in
    ``calls`` (one list shared with a FakeDomain shows the order across both); ``fail``
    names the call that raises; ``running`` is QEMU's run state; each suspend saves the
    state ``b"dm-state-<n>"``."""

    def __init__(self, calls: list[str] | None = None, fail: str = "") -> None:
        self.calls = [] if calls is None else calls
        self.fail = fail
        self.running = True
        self.dirty_log = False
        self.saves = 0

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            from xen_remus.xen.qmp import QmpCommandError

            raise QmpCommandError(name, "GenericError", "broken on purpose", "fake")

    def logdirty(self, enable: bool) -> None:
        self._call(f"dm_logdirty({enable})")
        self.dirty_log = enable

    def suspend(self) -> None:
        self._call("dm_stop")
        self.running = False
        self._call("dm_save")
        self.saves += 1

    def resume(self) -> None:
        self._call("dm_cont")
        self.running = True

    def records(self) -> list[list[Buffer]]:
        from xen_remus.stream import consts as C
        from xen_remus.stream import encoder
        from xen_remus.stream.libxl_bodies import Emulator

        return [encoder.record(C.LIBXL_EMULATOR_CONTEXT,
                               Emulator(data=b"dm-state-%d" % self.saves))]


# -- a PV guest behind Xen's bindings -------------------------------------------------------

P2M_VADDR = 0xFFFFC90000000000  # where the fake guest's linear p2m lives
INVALID_P2M = 0xFFFFFFFFFFFFFFFF


class PvMapping:
    """A foreign mapping of the fake: a copy of the frames taken when mapped."""

    def __init__(self, domid: int, frames: npt.NDArray[np.uint64], data: bytes,
                 errors: npt.NDArray[np.int32]) -> None:
        self.domid, self.frames, self.errors = domid, frames, errors
        self.view = memoryview(data)

    def page(self, i: int) -> memoryview:
        return self.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    def raise_on_error(self) -> None:
        from xen_remus.xen.errors import MappingError

        bad = np.flatnonzero(self.errors)
        if len(bad):
            raise MappingError(self.domid, [(int(self.frames[i]), int(self.errors[i]))
                                            for i in bad])

    def close(self) -> None:
        pass

    def __enter__(self) -> PvMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakePvXen:
    """XenCtrl and ForeignMemory (duck-typed; cast them) over one small 64-bit PV guest,
    laid out as Linux lays one out: a linear p2m of ``nr_pfns`` entries mapped at
    P2M_VADDR through 4-level page tables; pfns outside ``populated`` have no frame, and a
    p2m page none of whose pfns has one is a single shared all-invalid page (the ``missing``
    page). Machine frames are random and distinct; each populated page is filled with its
    pfn (``content``). pfn 0 is the start_info page (vcpu0's rdx), pfn 1 the GDT, pfn 2 the
    top page table (every vCPU's cr3); the p2m's own pages come from a pool of populated
    pfns. ``vcpus`` vCPUs, those in ``down`` down (no VGCF_online); ``epoch`` goes into
    each vCPU context read (its first 8 bytes) so a test can tell epochs apart.
    ``balloon_in`` populates pfns as Linux does (a p2m page of its own replaces the missing
    page, and the p2m generation goes up)."""

    domid = 5
    MACHINE = 8192  # machine frames
    M2P_BASE = 1 << 36  # the m2p's frames (DOMID_XEN), never a guest frame
    SHARED_INFO_MFN = 7
    ARCH = 3088  # shared_info.arch, 64-bit layout

    def __init__(self, nr_pfns: int = 2048, populated: range | None = None, vcpus: int = 2,
                 down: tuple[int, ...] = (), seed: int = 3) -> None:
        self.nr_pfns = nr_pfns
        self.populated_at_start = populated if populated is not None else range(nr_pfns)
        self.vcpus, self.down = vcpus, set(down)
        self.epoch = 0
        self.mem = np.zeros((self.MACHINE, PAGE_SIZE // 8), dtype=np.uint64)
        self.m2p = np.full(self.MACHINE, 0x5555555, dtype=np.uint64)  # junk for frames not
        self.p2m = np.full(nr_pfns, INVALID_P2M, dtype=np.uint64)     # the guest's
        self.rng = np.random.default_rng(seed)
        self._free = [int(m) for m in self.rng.permutation(np.arange(64, self.MACHINE))]
        self._tables: dict[tuple[int, int], int] = {}
        self.l4 = self._take()
        self.generation = 0
        for pfn in self.populated_at_start:
            self._populate(pfn)
        per = PAGE_SIZE // 8
        n_leaves = -(-nr_pfns // per)
        self.leaf_pool = [p for p in self.populated_at_start if p >= 3][:n_leaves + 5]
        self.p2m_pfns: set[int] = set()
        self.missing = self._leaf_page()  # a page of the guest's kernel, as Linux's
        self.mem[self.missing] = INVALID_P2M
        self.leaves: list[int] = []
        for i in range(n_leaves):
            own = (self.p2m[i * per:(i + 1) * per] != INVALID_P2M).any()
            self.leaves.append(self._leaf_page() if own else self.missing)
            self._map_leaf(i)
        self._write_leaves()
        self._write_shared_info()

    # -- the layout ----------------------------------------------------------------------
    def _take(self) -> int:
        return self._free.pop()

    def _populate(self, pfn: int) -> None:
        mfn = self._take()
        self.p2m[pfn] = mfn
        self.m2p[mfn] = pfn
        self.mem[mfn] = self.content(pfn)

    @staticmethod
    def content(pfn: int) -> npt.NDArray[np.uint64]:
        return np.full(PAGE_SIZE // 8, 0x1000_0000 + pfn, dtype=np.uint64)

    def _leaf_page(self) -> int:
        """A populated pfn of the pool becomes a p2m page (its frame holds p2m entries);
        ``p2m_pfns`` lists those taken."""
        pfn = self.leaf_pool.pop(0)
        self.p2m_pfns.add(pfn)
        return int(self.p2m[pfn])

    def _map_leaf(self, i: int) -> None:
        """The page table entries that map p2m page ``i`` at its virtual address."""
        va = P2M_VADDR + i * PAGE_SIZE
        table = self.l4
        for level, shift in ((3, 39), (2, 30), (1, 21)):
            key = (level, va >> shift)
            if key not in self._tables:
                self._tables[key] = self._take()
            self.mem[table, (va >> shift) & 511] = (self._tables[key] << 12) | 0x3
            table = self._tables[key]
        self.mem[table, (va >> 12) & 511] = (self.leaves[i] << 12) | 0x3

    def _write_leaves(self) -> None:
        per = PAGE_SIZE // 8
        for i, leaf in enumerate(self.leaves):
            if leaf != self.missing:
                chunk = self.p2m[i * per:(i + 1) * per]
                self.mem[leaf] = INVALID_P2M
                self.mem[leaf, :len(chunk)] = chunk

    def _write_shared_info(self) -> None:
        from xen_remus.xen.vcpu import mfn_to_cr3

        words = [self.nr_pfns, 0, 0, mfn_to_cr3(self.l4, 8), P2M_VADDR, self.generation]
        self.mem[self.SHARED_INFO_MFN, self.ARCH // 8:self.ARCH // 8 + 6] = words

    def balloon_in(self, pfns: Sequence[int]) -> None:
        """Populate ``pfns`` (the guest writes nothing to them): a p2m page that was the
        missing page becomes a page of its own, and the p2m generation goes up."""
        per = PAGE_SIZE // 8
        for pfn in pfns:
            self._populate(pfn)
            self.mem[int(self.p2m[pfn])] = 0  # Xen hands out scrubbed pages
            if self.leaves[pfn // per] == self.missing:
                self.leaves[pfn // per] = self._leaf_page()
                self._map_leaf(pfn // per)
                self.generation += 1
        self._write_leaves()
        self._write_shared_info()

    def balloon_out(self, pfns: Sequence[int]) -> None:
        """Give ``pfns`` back to Xen: their p2m entries become invalid in place."""
        for pfn in pfns:
            self.m2p[int(self.p2m[pfn])] = 0x5555555
            self.p2m[pfn] = INVALID_P2M
        self._write_leaves()

    # -- ForeignMemory -------------------------------------------------------------------
    def map(self, domid: int, frames: npt.ArrayLike) -> PvMapping:
        from xen_remus.xen.structs import DOMID_XEN

        fr = np.ascontiguousarray(frames, dtype=np.uint64)
        if domid == DOMID_XEN:
            table = np.zeros(len(fr) * PAGE_SIZE // 8, dtype=np.uint64)
            table[:self.MACHINE] = self.m2p
            ok = (fr >= np.uint64(self.M2P_BASE)) & (fr < np.uint64(self.M2P_BASE + 512))
            return PvMapping(domid, fr, table.tobytes(), np.where(ok, 0, 14).astype(np.int32))
        inside = fr < np.uint64(self.MACHINE)
        idx = np.where(inside, fr, 0).astype(np.intp)
        return PvMapping(domid, fr, self.mem[idx].tobytes(),
                         np.where(inside, 0, 22).astype(np.int32))

    # -- XenCtrl -------------------------------------------------------------------------
    def domain_info(self, domid: int) -> Any:
        from xen_remus.xen.domain import DomainInfo

        return DomainInfo(domid, 0, len(self.populated_at_start), self.nr_pfns,
                          self.SHARED_INFO_MFN, 0, self.vcpus - len(self.down), self.vcpus - 1,
                          0, bytes(16))

    def guest_width(self, domid: int) -> int:
        return 8

    def maximum_ram_page(self) -> int:
        return self.MACHINE - 1

    def machphys_mfn_list(self, chunks: int) -> npt.NDArray[np.uint64]:
        return np.array([self.M2P_BASE], dtype=np.uint64)[:chunks]

    def cpu_policy(self, domid: int) -> Any:
        from xen_remus.xen.state import CpuPolicy

        return CpuPolicy(b"", b"", 0, 0)

    def tsc_info(self, domid: int) -> Any:
        from xen_remus.xen.state import TscInfo

        return TscInfo(0, 0, 1_000_000, 0)

    def vcpu_context(self, domid: int, vcpu: int) -> bytes:
        from xen_remus.xen.vcpu import VGCF_ONLINE, VcpuContext, mfn_to_cr3

        ctx = VcpuContext(bytes(5168), 8)
        ctx.raw[0:8] = self.epoch.to_bytes(8, "little")
        ctx.raw[8:16] = vcpu.to_bytes(8, "little")
        flags = 0 if vcpu in self.down else VGCF_ONLINE
        ctx.raw[ctx.layout.flags:ctx.layout.flags + 8] = flags.to_bytes(8, "little")
        ctx.dx = int(self.p2m[0]) if vcpu == 0 else 0xD0D0
        ctx.raw[ctx.layout.gdt_ents:ctx.layout.gdt_ents + 8] = (512).to_bytes(8, "little")
        ctx.set_gdt_frame(0, int(self.p2m[1]))
        ctx.set_ctrlreg(3, mfn_to_cr3(int(self.p2m[2]), 8))
        return bytes(ctx.raw)

    def vcpu_extended_context(self, domid: int, vcpu: int) -> bytes:
        return bytes([0xE0 + vcpu]) * 24

    def vcpu_extstate_raw(self, domid: int, vcpu: int) -> bytes:
        return bytes([0xA0 + vcpu]) * 576

    def vcpu_msrs(self, domid: int, vcpu: int) -> bytes:
        return b"" if vcpu % 2 else bytes([0x30 + vcpu]) * 16  # odd vCPUs: no MSRs to save


class FakePvDomain:
    """The save engine's DomainOps over a FakePvXen: frames are machine frames; a frame is
    NOTAB if the guest owns it, else XTAB; ``dirty`` is what the next clean reports;
    ``on_clean(n)`` plays the running guest before the n-th clean."""

    def __init__(self, xen: FakePvXen) -> None:
        self.xen = xen
        self.domid = xen.domid
        self.dirty: set[int] = set()
        self.suspended = False
        self.calls: list[str] = []
        self.cleans = 0
        self.on_clean: Callable[[int], None] | None = None  # the guest, between rounds

    def logdirty_enable(self) -> None:
        self.calls.append("logdirty_enable")

    def logdirty_clean(self, final: bool) -> Pfns:
        if self.on_clean is not None and not self.suspended:
            self.on_clean(self.cleans)
        self.cleans += 1
        out = np.array(sorted(self.dirty), dtype=np.uint64)
        self.dirty.clear()
        return out

    def logdirty_off(self) -> None:
        self.calls.append("logdirty_off")

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> Types:
        fr = frames.astype(np.uint64)
        inside = fr < np.uint64(self.xen.MACHINE)
        pfn = self.xen.m2p[np.where(inside, fr, 0).astype(np.intp)]
        owned = inside & (pfn < np.uint64(self.xen.nr_pfns))
        owned[owned] &= self.xen.p2m[pfn[owned].astype(np.intp)] == fr[owned]
        return np.where(owned, PFINFO_NOTAB, PFINFO_XTAB).astype(np.uint8)

    def map(self, frames: npt.NDArray[np.uint64]) -> PvMapping:
        return self.xen.map(self.domid, frames)

    def suspend(self) -> None:
        self.suspended = True
        self.calls.append("suspend")

    def resume(self) -> None:
        self.suspended = False
        self.calls.append("resume")

    def pause(self) -> None:
        self.calls.append("pause")
