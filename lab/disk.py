"""Replicated guest disks in the lab: the block-remus script installed in dom0, images, and
what the guest's sequence blocks (lab/guest/init) on an image say."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lab.errors import LabError
from lab.host import Host

BLOCKS = "python3 /mnt/project/lab/dom0tools/disk_blocks.py"
SEQ_BLOCKS = 2048  # the guest writes block (i mod 2048) (at most 1 MiB of its disk)


def install(host: Host) -> None:
    """`xen-remus disk install-script`, and the checkout as xen-remus for the script."""
    host.run("python3 -m xen_remus disk install-script && "
             "echo XEN_REMUS_PYTHONPATH=/mnt/project > /etc/default/xen-remus",
             timeout=180, check=True)


def make_image(host: Host, path: str, mib: int, fill: int = 0) -> None:
    """A ``mib`` MiB image at ``path`` on ``host``, every byte ``fill``."""
    byte = f"\\{fill:03o}"  # tr takes octal escapes
    host.run(f"rm -f {path} && head -c {mib << 20} /dev/zero | tr '\\0' '{byte}' > {path}"
             if fill else f"rm -f {path} && truncate -s {mib}M {path}", timeout=120,
             check=True)


def spec_line(path: str, vdev: str = "xvda") -> str:
    return f"vdev={vdev},access=rw,script=block-remus,target={path}"


@dataclass
class SeqBlocks:
    blocks: dict[int, tuple[int, str]]  # block index -> (sequence number, boot id)
    other: list[int]  # blocks that are neither zero nor a sequence block

    def check(self, bootid: str, last: int) -> None:
        """The guest (``bootid``) printed tick ``last`` and is paused: every sequence
        number before it is on disk, none after it, nothing else was written."""
        if self.other:
            raise LabError(f"blocks neither zero nor written by the guest: {self.other[:20]}")
        missing = [j for j in range(max(1, last - SEQ_BLOCKS + 1), last)
                   if self.blocks.get(j % SEQ_BLOCKS) != (j, bootid)]
        if missing:
            raise LabError(f"disk behind the guest: sequence numbers {missing[:20]} "
                           f"(of 1..{last - 1}) are not on disk")
        ahead = sorted(s for s, b in self.blocks.values() if s > last or b != bootid)
        if ahead:
            raise LabError(f"disk ahead of the guest (tick {last}) or from another boot: "
                           f"{ahead[:20]}")


def seq_blocks(host: Host, path: str, mib: int = 64) -> SeqBlocks:
    """The sequence blocks of ``path``; every other block of its first ``mib`` MiB must be
    zero (``other`` lists those that are not)."""
    r = host.run(f"{BLOCKS} {path} {mib << 11}", timeout=120, check=True)
    doc = json.loads(r.stdout)
    return SeqBlocks({int(k): (int(v[0]), str(v[1])) for k, v in doc["blocks"].items()},
                     [int(i) for i in doc["other"]])
