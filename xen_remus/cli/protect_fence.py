"""protect with a fencing backup: what a primary that lost such a backup does before its
guest goes on here alone.

A backup started with `--fence CMD` resumes its copy once it has declared this host dead
(the heartbeat timeout of our silence, or the stream's end) and CMD has powered this host
off. If this host released its guest's output as soon as it lost the backup, and the
backup then fenced it and resumed from its last committed epoch, clients would have seen
a state that no copy has any more (a counter going back). So the primary first holds the
output (the guest runs, its plugs keep what it says) for as long as the backup may take
to decide and fence: the agreed heartbeat timeout, the fence command's bound (the offer's
``fence=MS``, its --fence-timeout) and a margin. A host still up after that was not
fenced: the backup is dead, or its fence failed and its copy stays paused; the output
goes out and the guest goes on here. A backup that said it stops (a CLOSE frame) will not
resume: no hold.

The hold is counted from the moment this side stopped sending. Bytes the transport still
held then and delivers later (a link that comes back within the backup's heartbeat
timeout) restart the backup's count: the margin covers a short one, not a link that
flaps for longer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from xen_remus.channel.negotiate import Extensions
from xen_remus.channel.stats import StatusFile

HOLD_MARGIN_S = 10.0  # a busy backup notices the silence late (its loop, under load)


def fence_hold_s(offer: Extensions | None, agreed: Extensions | None, closed: bool
                 ) -> float:
    """How long the output stays held once the backup is lost (0: not at all).
    ``offer``: the backup's; ``agreed``: what the two ends use; ``closed``: the backup
    said it stops."""
    if closed or offer is None or not offer.fence or offer.fence_ms is None:
        return 0.0
    hb = agreed.heartbeat if agreed is not None and agreed.heartbeat else offer.heartbeat
    return (hb[1] / 1000 if hb else 0.0) + offer.fence_ms / 1000 + HOLD_MARGIN_S


def hold_for_fence(seconds: float, name: str, peer: str, status: StatusFile,
                   end_stream: Callable[[], None],
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """End the stream (a backup that still reads it decides now, not after its
    heartbeat timeout), then keep ``name``'s output held ``seconds``."""
    end_stream()
    why = (f"the backup on {peer} fences this host before it resumes its copy: the "
           f"output of {name} stays held {seconds:.0f} s (its heartbeat timeout, its fence "
           f"command's bound and {HOLD_MARGIN_S:.0f} s), so that no client sees what that "
           "copy would lack; if this host is still up then, the guest goes on here")
    status.state("held", why)
    print(f"xen-remus protect: {why}", file=sys.stderr, flush=True)
    sleep(seconds)
