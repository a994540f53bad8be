"""protect with a witness: the lease taken before anything else and renewed, the claim
of the next generation when protection ends with the guest running on here, and the
refusal of a backup whose failovers a witness decides when this protect has none."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from xen_remus.channel.negotiate import Extensions
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


def refuse_unwitnessed(offer: Extensions | None, witnessed: bool, peer: str,
                       name: str) -> None:
    """A backup that asks the witness before it resumes, and a primary that holds no
    lease: the witness would give the guest to the backup at once while it runs on here
    (two copies). Refused before anything of the guest is sent."""
    if offer is not None and offer.witness and not witnessed:
        raise MigrationRefused(
            f"the backup on {peer} fails over when a witness lets it (migrate-receive "
            f"--witness), but this protect has no --witness: the witness would give it "
            f"{name} at once while {name} runs on here. Give protect the same --witness "
            "and --witness-key-file; not protecting")


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
