"""What stock libxl's stream reader accepts of each libxl-layer record: one table.

Our receiver relays the stream into stock `xl migrate-receive`, and an epoch that libxl
would refuse must be refused before it is ACKed. The spec (libxl-migration-stream.pandoc)
reserves a range for optional records, but libxl's reader (libxl_stream_read.c) takes
only the types below, each only where the row says, and refuses every other type, the
optional bit notwithstanding. The decoder applies this table when it decodes for a relay
(``Decoder(relay=True)``); ``stream verify`` keeps to the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.stream import consts as C

# Where in the libxl layer a record may come.
OUTSIDE = "outside a checkpoint"  # the top level: before LIBXC_CONTEXT, after libxc END
INSIDE = "inside a checkpoint"  # between libxc CHECKPOINT and CHECKPOINT_END
ANYWHERE = "anywhere"
NEVER = "never in a migration stream"


@dataclass(frozen=True)
class Rule:
    where: str
    hvm_only: bool = False  # libxl: only when the guest's b_info.type is HVM


LIBXL_ACCEPTS: dict[int, Rule] = {
    C.LIBXL_END: Rule(OUTSIDE),
    C.LIBXL_LIBXC_CONTEXT: Rule(OUTSIDE),
    C.LIBXL_EMULATOR_XENSTORE_DATA: Rule(ANYWHERE, hvm_only=True),
    C.LIBXL_EMULATOR_CONTEXT: Rule(ANYWHERE, hvm_only=True),
    C.LIBXL_CHECKPOINT_END: Rule(INSIDE),
    C.LIBXL_CHECKPOINT_STATE: Rule(NEVER),  # COLO's back channel only
}


def refusal(rtype: int, in_checkpoint: bool, guest: str | None) -> str | None:
    """Why stock libxl would refuse a libxl record of ``rtype`` here (None: it takes it).
    ``guest``: the guest's type as libxl knows it ("pv", "hvm", "pvh"), None if unknown
    (then the emulator records get the benefit of the doubt)."""
    rule = LIBXL_ACCEPTS.get(rtype)
    if rule is None:
        return (f"libxl record type 0x{rtype:08x}: stock libxl refuses any type it does "
                "not know, optional or not")
    if rule.where == NEVER:
        return "valid only on COLO's back channel; stock libxl refuses it in this stream"
    here = INSIDE if in_checkpoint else OUTSIDE
    if rule.where not in (ANYWHERE, here):
        return f"{here}: stock libxl takes it only {rule.where}"
    if rule.hvm_only and guest is not None and guest != "hvm":
        return f"emulator record for a {guest.upper()} guest: stock libxl takes it only for HVM"
    return None
