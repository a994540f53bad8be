"""What the save engine needs from Xen and from the stream, as protocols.

The engine (engine.py) only sees these: the real implementations sit over
`xen_remus.xen` (xenops.py) and `xen_remus.stream` (emit.py); the unit tests use fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from xen_remus.save.pages import Pfns, Types
from xen_remus.stream.events import Buffer


class MappedPages(Protocol):
    """Guest frames mapped contiguously, read-only; ``errors[i]`` is 0 or an errno."""

    @property
    def view(self) -> memoryview: ...

    @property
    def errors(self) -> npt.NDArray[np.int32]: ...

    def close(self) -> None: ...


class DomainOps(Protocol):
    """Xen operations on the domain being saved (frames are GFNs for HVM, MFNs for PV)."""

    domid: int

    def logdirty_enable(self) -> None: ...

    def logdirty_clean(self, final: bool) -> Pfns:
        """Pfns dirtied since the last clean (the bitmap's set bits), then reset them."""
        ...

    def logdirty_off(self) -> None: ...

    def frame_types(self, frames: npt.NDArray[np.uint64]) -> Types:
        """The spec's page type (0..15) of each frame; XTAB for a frame not in the guest."""
        ...

    def map(self, frames: npt.NDArray[np.uint64]) -> MappedPages: ...

    def suspend(self) -> None:
        """Ask the guest to suspend and wait until Xen reports it shut down for suspend."""
        ...

    def resume(self) -> None:
        """Fast resume ("suspend cancelled"): the guest continues where it was."""
        ...

    def pause(self) -> None:
        """Pause the domain (Xen's pause count; suspended or not, it runs no more)."""
        ...


@dataclass
class Normalised:
    """Result of normalising the pagetable pages of one batch."""

    replaced: dict[int, Buffer] = field(default_factory=dict)  # page index -> page to send
    retry: npt.NDArray[np.bool_] | None = None  # per page: not sendable yet (live only)


class GuestSaveOps(Protocol):
    """Per guest type (PV or HVM/PVH) steps of the spec's save sequence."""

    domain_type: int  # DHDR_TYPE_X86_PV (1) or DHDR_TYPE_X86_HVM (2)

    def nr_pfns(self) -> int:
        """Size of the guest's pfn space (PV: max_pfn + 1; HVM: maximum gpfn + 1)."""
        ...

    def static_data(self, out: Emitter) -> None:
        """X86_PV_INFO (PV), then the CPUID and MSR policy records."""
        ...

    def start_of_stream(self, out: Emitter) -> None:
        """X86_PV_P2M_FRAMES for PV; nothing for HVM."""
        ...

    def p2m_changes(self, out: Emitter, live: bool) -> Pfns:
        """Pfns whose frame moved since the last call without the guest writing to them
        (PV: it rebuilt part of its p2m; X86_PV_P2M_FRAMES goes out again); to be sent
        with the next round. None for HVM/PVH, whose pfn is its gfn."""
        ...

    def pfn_to_gfn(self, pfns: Pfns) -> npt.NDArray[np.uint64]:
        """Frames to map for these pfns; INVALID (~0) for ballooned-out pfns."""
        ...

    def normalise(self, types: Types, pages: memoryview, live: bool) -> Normalised:
        """Pagetable pages rewritten MFN -> PFN; ``pages`` holds one page per entry of
        ``types``. A frame not yet in the p2m is ``retry`` while live and an error after."""
        ...

    def end_of_checkpoint(self, out: Emitter) -> None:
        """PV: X86_TSC_INFO, SHARED_INFO, per online vCPU BASIC/EXTENDED/XSAVE/MSRS.
        HVM: X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS."""
        ...

    def close(self) -> None: ...


class DeviceModelOps(Protocol):
    """The device model of an HVM guest (qemu-xen; save/devmodel.py): libxl's part of a
    save, which the libxc layer does not see."""

    def logdirty(self, enable: bool) -> None:
        """Whether the device model marks its own writes into guest memory dirty."""
        ...

    def suspend(self) -> None:
        """Once the guest is suspended: stop the device model and save its state."""
        ...

    def resume(self) -> None:
        """Before the guest resumes: let the device model run again."""
        ...

    def records(self) -> Sequence[Sequence[Buffer]]:
        """The libxl records of the state saved last (EMULATOR_XENSTORE_DATA if any,
        EMULATOR_CONTEXT), framed, for the end of the checkpoint or stream."""
        ...


class Emitter(Protocol):
    """Where records go: frames each record and writes it (writev) at once or buffered.
    Buffers passed in are only valid during the call (pages are unmapped afterwards)."""

    def begin(self, domain_type: int) -> None:
        """[xl header] libxl header, LIBXC_CONTEXT, libxc image and domain headers."""
        ...

    def checkpoint(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        """libxc CHECKPOINT, the ``emulator`` records (whole, framed), then libxl
        CHECKPOINT_END: the end of an epoch (Remus)."""
        ...

    def end(self, emulator: Sequence[Sequence[Buffer]] = ()) -> None:
        """libxc END, the ``emulator`` records (whole, framed), then libxl END."""
        ...

    def libxc_record(self, rtype: int, body: Sequence[Buffer]) -> None: ...

    def libxl_record(self, rtype: int, body: Sequence[Buffer]) -> None: ...

    def page_data(self, pfns: Pfns, types: Types, pages: Sequence[Buffer]) -> None:
        """One PAGE_DATA record: ``pages`` are the data of the pages that carry data, in
        order; a buffer may hold several consecutive pages."""
        ...

    def flush(self) -> None:
        """Push out what is buffered, if anything."""
        ...
