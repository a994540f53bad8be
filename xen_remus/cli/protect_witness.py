"""protect with a witness: the lease taken before anything else and renewed, and the
claim of the next generation when protection ends with the guest running on here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from xen_remus.channel.stats import StatusFile
from xen_remus.save.transport import MigrationRefused
from xen_remus.witness.client import WitnessClient
from xen_remus.witness.lease import LeaseKeeper, LeaseLost, OutputGate


def take_lease(witness: WitnessClient, name: str, generation: int, holder: str,
               timeout: float, pause: Callable[[], None],
               unpause: Callable[[], None]) -> OutputGate:
    """The witness's lease on ``name`` (a witness that gave the guest to another host
    refuses it: this copy is stale), renewed from now on."""
    keeper = LeaseKeeper(witness, name, generation, holder)
    try:
        keeper.acquire(timeout)
    except LeaseLost as exc:
        raise MigrationRefused(f"{exc}: the copy of {name} here is not the current one; "
                               "not protecting it") from None
    keeper.start()
    return OutputGate(keeper, pause, unpause)


def claimed(gate: OutputGate | None, args: argparse.Namespace, name: str,
            status: StatusFile, when: str) -> bool:
    """Protection ends with the guest running on here: with a witness, only once it gave
    this host the next generation (else the guest stays paused here; False)."""
    if gate is None:
        return True
    why = gate.claim(args.witness_timeout)
    if why is None:
        return True
    status.state("held", why)
    print(f"xen-remus protect: {why}\nxen-remus protect: domain {name} stays PAUSED here "
          f"{when}: the backup's copy may be the one running; unpause it (`xl unpause "
          f"{name}`) only if it is not", file=sys.stderr)
    return False
