"""In-memory stand-ins the benchmark sections share: what is left to measure is our code."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xen_remus.save.ops import Emitter, Normalised
from xen_remus.save.pages import Pfns, Types


class MemGuest:
    """GuestSaveOps of an HVM-type guest with no state records: pfn == gfn, no pagetables."""

    domain_type = 2

    def __init__(self, nr_pfns: int) -> None:
        self._nr = nr_pfns

    def nr_pfns(self) -> int:
        return self._nr

    def static_data(self, out: Emitter) -> None:
        pass

    def start_of_stream(self, out: Emitter) -> None:
        pass

    def pfn_to_gfn(self, pfns: Pfns) -> npt.NDArray[np.uint64]:
        return pfns

    def normalise(self, types: Types, pages: memoryview, live: bool) -> Normalised:
        return Normalised()

    def end_of_checkpoint(self, out: Emitter) -> None:
        pass

    def close(self) -> None:
        pass
