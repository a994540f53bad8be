"""Replicated guest disks in the lab: the block-remus script installed in dom0, images, and
what the guest's sequence blocks (lab/guest/init) on an image say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.host import Host

BLOCKS = "python3 /mnt/project/lab/dom0tools/disk_blocks.py"
SEQ_BLOCKS = 2048  # the guest writes block (i mod 2048) (at most 1 MiB of its disk)
SEQ_SLOTS = 64  # with ext4, lab/guest/dseq's /seq: slot (i mod 64) of 4 KiB
SEQ_BLOCK = 4096


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


    def check_told(self, told: list[int], bootid: str) -> None:
        """The ext4 workload (lab/guest/dseq, ``SEQ_SLOTS`` slots) told clients that
        the numbers ``told`` were durable: each is on disk in its slot, or a later
        number of the same slot replaced it; every block is of boot ``bootid``."""
        if self.other:
            raise LabError(f"blocks of the sequence file that are not sequence blocks: "
                           f"{self.other[:20]}")
        missing = sorted({d for d in told
                          if self.blocks.get(d % SEQ_SLOTS, (-1, ""))[0] < d})
        if missing:
            raise LabError(f"told durable but not on disk: {missing[:20]} (slots hold "
                           f"{[self.blocks.get(d % SEQ_SLOTS) for d in missing[:5]]})")
        foreign = sorted(s for s, b in self.blocks.values() if b != bootid)
        if foreign:
            raise LabError(f"sequence blocks of another boot than {bootid}: {foreign[:20]}")


def seq_blocks(host: Host, path: str, mib: int = 64) -> SeqBlocks:
    """The sequence blocks of ``path``; every other block of its first ``mib`` MiB must be
    zero (``other`` lists those that are not)."""
    r = host.run(f"{BLOCKS} {path} {mib << 11}", timeout=120, check=True)
    return _blocks(r.stdout)


def _blocks(text: str) -> SeqBlocks:
    doc = json.loads(text)
    return SeqBlocks({int(k): (int(v[0]), str(v[1])) for k, v in doc["blocks"].items()},
                     [int(i) for i in doc["other"]])


def parse_seq_blocks(data: bytes, block: int) -> SeqBlocks:
    """What disk_blocks.py says of ``data`` (blocks of ``block`` bytes), run here."""
    tool = Path(__file__).resolve().parent / "dom0tools" / "disk_blocks.py"
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        r = subprocess.run([sys.executable, str(tool), f.name, str(len(data) // block),
                            str(block)], capture_output=True, text=True, check=True)
    return _blocks(r.stdout)


# -- an ext4 disk (the guest mounts it: lab/guest/init with xenlab_disk=ext4) -----------------
def make_ext4_image(host: Host, path: str, mib: int) -> None:
    """An ext4 file system of ``mib`` MiB in the file ``path`` on ``host`` (dom0's own
    e2fsprogs: the guest kernel knows its features); 4 KiB blocks, like dseq's."""
    host.run(f"rm -f {path} && truncate -s {mib}M {path} && mkfs.ext4 -q -F -b 4096 "
             f"-E lazy_itable_init=0,lazy_journal_init=0 {path}", timeout=180, check=True)


def copy_image(src: Host, dst: Host, path: str) -> None:
    """``path`` on ``src`` copied to the same path on ``dst``, through the lab share (a
    replica pre-seeded with the primary's image: the synchronisation skips what matches)."""
    via = f"/mnt/lab/seed-{os.path.basename(path)}"
    src.run(f"cp {path} {via}", timeout=180, check=True)
    dst.run(f"cp {via} {path} && rm -f {via}", timeout=180, check=True)


def ext4_seq_blocks(host: Host, image: str) -> SeqBlocks:
    """dseq's sequence file in the ext4 file system ``image`` (not mounted), read with
    debugfs."""
    tmp = f"/tmp/seq-{os.path.basename(image)}"
    r = host.run(f"rm -f {tmp} && debugfs -R 'dump /seq {tmp}' {image} 2>&1 && "
                 f"{BLOCKS} {tmp} {SEQ_SLOTS} {SEQ_BLOCK}", timeout=120)
    if not r.ok:
        raise LabError(f"host {host.name}: reading /seq of {image}: {r.stdout[-1500:]}"
                       f"{r.stderr[-1500:]}")
    return _blocks(r.stdout.splitlines()[-1])


# What e2fsck fixes on the image of a crashed, journaled ext4 besides replaying the
# journal: the superblock's free counts, which ext4 does not keep exact on disk.
CRASH_BENIGN = re.compile(r"^Free (blocks|inodes) count wrong")


def crash_fsck_problems(output: str) -> list[str]:
    """The problems ``e2fsck -fy`` fixed (each line before a "Fix? yes") other than
    CRASH_BENIGN ones: none on the disk of a crash-consistent file system."""
    lines = output.splitlines()
    fixed = [lines[i - 1] for i, ln in enumerate(lines) if i and ln.startswith("Fix? yes")]
    return [p for p in fixed if not CRASH_BENIGN.match(p)]


def fsck_crashed(host: Host, image: str) -> str:
    """``image`` holds an ext4 as a crash leaves it: ``e2fsck -fy`` on it (it is a copy)
    must replay the journal and fix nothing but CRASH_BENIGN counts; its output."""
    r = host.run(f"e2fsck -fy {image} 2>&1", timeout=300)
    out = str(r.stdout)
    bad = crash_fsck_problems(out)
    if r.rc not in (0, 1) or bad:
        raise LabError(f"host {host.name}: e2fsck -fy {image} (a crash image): exit {r.rc}, "
                       f"fixed {bad[:10]}\n{out[-3000:]}")
    return out


def fsck(host: Host, image: str) -> str:
    """`fsck.ext4 -fn` (forced, read-only) of ``image``; its output, or LabError with it
    if the file system is not clean."""
    r = host.run(f"fsck.ext4 -fn {image} 2>&1", timeout=300)
    if r.rc != 0:
        raise LabError(f"host {host.name}: fsck.ext4 -fn {image}: exit {r.rc}\n"
                       f"{r.stdout[-3000:]}")
    return str(r.stdout)
