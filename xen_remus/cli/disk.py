"""`xen-remus disk serve IMAGE --nbd SOCK --replica SOCK`: one replicated guest disk.

Started by the block-remus hotplug script (`xen-remus disk install-script` puts it in
/etc/xen/scripts) for each disk configured with `script=block-remus`; it runs until the
script's remove step stops it (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from xen_remus.disk.replica import DEFAULT_CAP
from xen_remus.errors import UsageError
from xen_remus.paths import XEN_SCRIPTS_DIR as SCRIPTS_DIR

DESCRIPTION = """Replicated guest disks. A disk line such as `disk = ['vdev=xvda,
access=rw, script=block-remus, target=/srv/guest.img']` makes xl run the block-remus hotplug
script, which starts `xen-remus disk serve` for the image and attaches it as /dev/nbdN for
the guest. `xen-remus protect` then replicates every write to the backup, committed with the
checkpoint it belongs to. The backup host needs the same configuration and an image of the
same size at the same path."""
SCRIPT = "block-remus"


def register(sub: Any) -> None:
    p = sub.add_parser("disk", description=DESCRIPTION,
                       help="serve a replicated guest disk (run by the block-remus script)")
    cmds = p.add_subparsers(dest="disk_command", metavar="ACTION")
    s = cmds.add_parser("serve", help="serve IMAGE over NBD and replicate it on request",
                        description="Serve IMAGE over NBD on the Unix socket --nbd (for "
                        "nbd-client) and take the epoch loop's replication connection on "
                        "--replica. Runs until SIGTERM.")
    s.add_argument("image", metavar="IMAGE", help="the disk image (a file or block device)")
    s.add_argument("--nbd", required=True, metavar="SOCK", help="NBD Unix socket path")
    s.add_argument("--replica", required=True, metavar="SOCK",
                   help="replication Unix socket path")
    s.add_argument("--max-unacked", type=_mib, default=DEFAULT_CAP >> 20, metavar="MIB",
                   help="replicated bytes the backup has not ACKed at which guest I/O waits"
                        f" (default {DEFAULT_CAP >> 20} MiB; block-remus passes "
                        "XEN_REMUS_DISK_MAX_UNACKED_MIB from /etc/default/xen-remus)")
    s.set_defaults(func=cmd_serve)
    i = cmds.add_parser("install-script", help=f"install the {SCRIPT} hotplug script",
                        description=f"Copy the {SCRIPT} block hotplug script into DIR "
                        f"(default {SCRIPTS_DIR}), where xl looks for `script=` names.")
    i.add_argument("--dir", default=SCRIPTS_DIR, metavar="DIR")
    i.set_defaults(func=cmd_install_script)
    p.set_defaults(func=lambda args: p.print_help(sys.stderr) or 2)


def cmd_serve(args: argparse.Namespace) -> int:
    # The server (asyncio and all) only to serve: not for --help or install-script.
    import asyncio

    from xen_remus.disk.daemon import serve

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s xen-remus disk: %(message)s")
    asyncio.run(serve(args.image, args.nbd, args.replica, cap=args.max_unacked << 20))
    return 0


def _mib(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB (1 or more)")
    return n


def cmd_install_script(args: argparse.Namespace) -> int:
    print(f"installed {install_script(Path(args.dir))}")
    return 0


def packaged_script() -> bytes:
    """The block-remus script this version ships."""
    return (resources.files("xen_remus.hotplug") / SCRIPT).read_bytes()


def install_script(dest: Path) -> Path:
    """Put block-remus into ``dest`` (xl's scripts directory), executable."""
    if not dest.is_dir():
        raise UsageError(f"{dest}: no such directory (is Xen's toolstack installed?)")
    tmp = dest / f".{SCRIPT}.new"
    tmp.write_bytes(packaged_script())
    tmp.chmod(0o755)
    tmp.replace(dest / SCRIPT)  # a hotplug run meanwhile sees the old or the new one
    return dest / SCRIPT
