"""`xen-remus save DOMAIN FILE` and `xen-remus migrate DOMAIN HOST`: our engine, stock
receivers (`xl restore`, `xl migrate-receive`). `migrate --remus` takes protect's options
here and is handed over to protect by migrate_hook."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from xen_remus.cli import options
from xen_remus.errors import UsageError, XenRemusError
from xen_remus.save.policy import PrecopyPolicy
from xen_remus.save.transport import (
    DirectReceiver,
    MigrationRefused,
    Receiver,
    ReceiverProcess,
    receiver_command,
)
from xen_remus.xlproto import SenderSide

if TYPE_CHECKING:
    from xen_remus.save.engine import SaveStats
    from xen_remus.save.session import SaveSession, Target

log = logging.getLogger(__name__)

SAVE_DESCRIPTION = """Save DOMAIN to FILE, a standard xl save file: restore it with `xl
restore FILE`. As with `xl save`, the domain is suspended, saved, then destroyed (-c and -p
keep it). With --live, memory is first copied while the guest runs, which shortens the time
it is suspended."""


def register(sub: Any) -> None:
    s = sub.add_parser("save", description=SAVE_DESCRIPTION,
                       help="save a domain to a file that `xl restore` can restore")
    s.add_argument("-c", dest="checkpoint", action="store_true",
                   help="leave the domain running after the save (as xl save -c)")
    s.add_argument("-p", dest="paused", action="store_true",
                   help="leave the domain paused after the save (as xl save -p)")
    s.add_argument("--live", action="store_true",
                   help="copy memory while the guest runs first (xl save does not); the "
                   "live copy options below apply")
    options.precopy(s)
    s.add_argument("domain", metavar="DOMAIN", help="the domain's name or id")
    s.add_argument("file", metavar="FILE", help="the save file to write")
    s.set_defaults(func=cmd_save)

    m = sub.add_parser(
        "migrate", help="live-migrate a domain to HOST, which runs stock `xl migrate-receive`",
        description="Move DOMAIN to HOST while it runs. HOST runs stock `xl "
        "migrate-receive`, reached through ssh as `xl migrate` does (or -s CMD), or `xen-remus "
        "migrate-receive --listen` reached with --tcp. On success "
        "the domain here is destroyed; if the move fails before HOST takes the domain over, "
        "it resumes here. With --remus, DOMAIN is protected instead of moved: see "
        "`xen-remus protect --help`.")
    m.add_argument("--remus", action="store_true",
                   help="protect DOMAIN with Remus, a backup on HOST (the same as "
                   "`xen-remus protect`; the Remus options below then apply)")
    options.transport(m)
    options.precopy(m)
    options.remus(m)
    options.heartbeat(m)
    options.authentication(m)
    options.monitoring(m, progress=True)
    options.primary_witness(m)
    m.add_argument("domain", metavar="DOMAIN", help="the domain's name or id")
    m.add_argument("host", metavar="HOST", help="the host to move it to")
    m.set_defaults(func=cmd_migrate)


def config_while_opening(s: SaveSession, domain_config_json: Callable[[int], str]) -> str:
    """The xl config (`xl list -l`, most of a second under TCG) fetched in a thread while
    the guest's p2m and handles are set up (subprocess waits release the GIL)."""
    got: list[str | BaseException] = []

    def fetch() -> None:
        try:
            got.append(domain_config_json(s.target.domid))
        except BaseException as exc:  # re-raised in the caller's thread
            got.append(exc)

    t = threading.Thread(target=fetch, name="xl-list", daemon=True)
    t.start()
    try:
        s.open_guest()
    finally:
        t.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def cmd_save(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    policy = options.precopy_policy(args, args.live)
    # The save engine (numpy, the Xen libraries) only to save, not for --help.
    from xen_remus.save.session import SaveSession, domain_config_json, domain_lock

    t0 = time.monotonic()
    with SaveSession(args.domain) as s, domain_lock(s.target.domid):
        domid = s.target.domid
        t1 = time.monotonic()
        config = config_while_opening(s, domain_config_json)
        t2 = time.monotonic()
        try:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {args.file}: {exc.strerror}") from None
        try:
            stats = s.save(fd, config, policy, what=args.file)
        except BaseException:
            os.close(fd)
            os.unlink(args.file)
            raise
        os.close(fd)
        print(f"Saved domain {domid} ({s.target.name}) to {args.file}: {stats.summary()}",
              file=sys.stderr)
        t3 = time.monotonic()
        if args.checkpoint or args.paused:
            s.resume()
            if args.paused:
                s.xc.pause(domid)
        else:
            s.destroy()
    log.info("save phases: handles %.2f s, config + guest setup %.2f s, stream %.2f s, "
             "%s %.2f s", t1 - t0, t2 - t1, t3 - t2,
             "resume" if args.checkpoint or args.paused else "destroy", time.monotonic() - t3)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    policy = options.precopy_policy(args)
    options.check_tcp(args)
    key = options.read_key(args.key_file) if args.tcp is not None else None
    rune = receiver_command(args.host, args.ssh, ["-e"] if args.no_daemon else [])
    # As for save: the engine only to migrate.
    from xen_remus.save.session import SaveSession, domain_config_json, domain_lock, xl

    with SaveSession(args.domain) as s, domain_lock(s.target.domid):
        domid, name = s.target.domid, s.target.name
        config = domain_config_json(domid)
        recv: Receiver
        if key is not None:  # --tcp: authenticated before the guest is touched
            from xen_remus.direct.conn import connect

            recv = DirectReceiver(connect(args.host, args.tcp, key, args.timeout))
        else:
            recv = ReceiverProcess(rune)
        try:
            migrate(s, recv, config, policy, args.timeout, xl)
        finally:
            rc = recv.close()
            log.info("receiver exited with %s", rc)
    print(f"Migration of domain {domid} ({name}) to {args.host} successful.", file=sys.stderr)
    return 0


class Saver(Protocol):
    """What migrate() needs of a SaveSession (a fake in the unit tests)."""

    target: Target

    def save(self, fd: int, xl_config: str | None, policy: PrecopyPolicy,
             what: str = ..., handover: bool = ...) -> SaveStats: ...

    def resume(self) -> None: ...

    def destroy(self, xl_cmd: Callable[..., str] | None = None) -> None: ...


def migrate(s: Saver, recv: Receiver, config: str, policy: PrecopyPolicy,
            timeout: float, xl: Callable[..., str]) -> None:
    """xl's sender side: banner, stream, ready, rename away, GO, report; destroy on success.
    Before GO any failure resumes the guest here; after GO the receiver owns it, unless it
    reports that it could not unpause and hands the guest back."""
    domid, name = s.target.domid, s.target.name
    proto = SenderSide()
    recv.await_message(proto, "receiver banner", timeout)
    stats = s.save(recv.send_fd, config, policy, what=f"migration stream ({recv.rune})",
                   handover=True)
    print(f"migration sender: stream sent: {stats.summary()}", file=sys.stderr)
    try:
        if not proto.stream_done():
            recv.await_message(proto, "'domain received' message", timeout)
        xl("rename", str(domid), f"{name}--migratedaway")
    except XenRemusError:
        s.resume()
        raise
    recv.send(proto.go())
    report = recv.await_message(proto, "unpause report", timeout)
    if report.status:
        if not proto.expect_resume_permission():
            recv.await_message(proto, "permission to resume", timeout)
        xl("rename", str(domid), name)
        s.resume()
        raise MigrationRefused(f"the receiver could not unpause the domain (status "
                               f"{report.status}); domain {domid} resumed here")
    s.destroy(xl)
