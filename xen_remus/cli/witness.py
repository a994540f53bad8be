"""`xen-remus witness --listen ADDR --key-file F`: the witness service (witness/server.py);
`xen-remus witness --query GUEST --witness ADDR`: what it has on record for a guest.
Also the client side that protect and migrate-receive share (``client_of``)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from xen_remus.cli import options
from xen_remus.errors import UsageError
from xen_remus.witness import proto as P
from xen_remus.witness.address import parse
from xen_remus.witness.client import CALL_TIMEOUT_S, WitnessClient
from xen_remus.witness.core import DURATION_CAP_MS, GRACE_S, WitnessCore

DESCRIPTION = (
    "A third party that both hosts of a protection reach, to decide which of them may run "
    "the guest when they lose each other. The primary (`protect --witness ADDR`) holds a "
    "lease on the guest's current generation and lets the guest's output out only while "
    "it holds it; the backup (`migrate-receive -r --witness ADDR`) resumes its copy only "
    "once the witness gave it the next generation, which it does only after the primary's "
    "lease ran out. Run it on a third machine (or anywhere both hosts reach by another path "
    "than their link to each other). Records are kept under the state directory, so a "
    "restart forgets no lease.")


def register(sub: Any) -> None:
    p = sub.add_parser("witness", help="the witness service that decides, after a "
                       "partition, which host may run a protected guest",
                       description=DESCRIPTION)
    p.add_argument("--listen", action="append", metavar="ADDR", default=[],
                   help="serve on ADDR: HOST:PORT (TCP) or unix:/path; may be repeated")
    p.add_argument("--key-file", metavar="FILE",
                   help="the pre-shared key (the same file as the hosts' --witness-key-file "
                   "or --key-file; at least 16 bytes, readable by its owner only)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the records are kept (default: witness/ under "
                   "XEN_REMUS_STATE_DIR or /var/lib/xen-remus)")
    p.add_argument("--grace", type=float, default=GRACE_S, metavar="S",
                   help="after a holder's lease ran out, wait S more seconds before another "
                   "host may take the guest over (default %(default)g)")
    p.add_argument("--max-lease", type=float, default=DURATION_CAP_MS / 1000, metavar="S",
                   help="grant leases of at most S seconds (default %(default)g)")
    p.add_argument("--query", metavar="GUEST",
                   help="instead of serving: ask the witness (--witness or --witness-via) "
                   "what it has on record for GUEST, print it and exit")
    options.witness(p, "With --query: the witness to ask.")
    p.set_defaults(func=run)


def client_of(args: argparse.Namespace, timeout: float = CALL_TIMEOUT_S
              ) -> WitnessClient | None:
    """The witness client of ``args`` (None without --witness/--witness-via)."""
    if args.witness is None and args.witness_via is None:
        return None
    path = args.witness_key_file or getattr(args, "key_file", None)
    if path is None:
        raise UsageError("--witness and --witness-via need a key: --witness-key-file FILE "
                         "(or --key-file FILE)")
    key = options.read_key(path)
    assert key is not None
    addr = parse(args.witness, "--witness") if args.witness is not None else None
    return WitnessClient(key, addr, args.witness_via, timeout)


def holder_of(args: argparse.Namespace) -> str:
    name = args.witness_id if args.witness_id is not None else socket.gethostname()
    if not name or len(name.encode()) > P.NAME_MAX:
        raise UsageError(f"--witness-id {name!r}: 1..{P.NAME_MAX} bytes")
    return str(name)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="xen-remus witness: %(message)s",
                        level=logging.DEBUG if args.verbose > 1 else logging.INFO)
    if args.query is not None:
        client = client_of(args)
        if client is None:
            raise UsageError("--query needs --witness ADDR or --witness-via CMD")
        try:
            resp = client.call(P.Request(P.QUERY, args.query))
        finally:
            client.close()
        print(f"{args.query}: {resp.record if resp.record is not None else 'no record'}")
        return 0
    if not args.listen:
        raise UsageError("witness: give --listen ADDR (or --query GUEST)")
    if args.key_file is None:
        raise UsageError("witness: --key-file FILE is needed (every frame is authenticated)")
    if args.grace < 0 or not 1 <= args.max_lease <= P.DURATION_MAX_MS / 1000:
        raise UsageError("--grace must be >= 0 and --max-lease 1..4294967 s")
    # The server (asyncio) only to serve: protect and migrate-receive import this module.
    import asyncio

    from xen_remus.witness.server import Witness, serve
    from xen_remus.witness.store import WitnessStore

    addrs = [parse(a, "--listen") for a in args.listen]
    key = options.read_key(args.key_file)
    assert key is not None
    store = WitnessStore(Path(args.state_dir) if args.state_dir else None)
    witness = Witness(key, WitnessCore(args.grace, round(args.max_lease * 1000)), store)
    try:
        asyncio.run(serve(witness, addrs))
    except OSError as exc:
        raise UsageError(f"witness: cannot listen on {', '.join(args.listen)}: {exc}"
                         ) from None
    return 0
