"""Runs in a lab dom0: the lab guest's sequence blocks in a disk image, as JSON.

The guest (lab/guest/init) writes block (i mod N) = "xrseq i bootid=B" every tick and
fsyncs it (with an ext4 disk, lab/guest/dseq writes 4 KiB ones into a file). Prints
{"blocks": {index: [seq, bootid]}, "other": [indexes of blocks that are neither zero nor
a sequence block]} for the first N blocks of BLOCK bytes (default 512).
usage: python3 disk_blocks.py FILE [N [BLOCK]]
"""

from __future__ import annotations

import json
import re
import sys

SEQ = re.compile(rb"^xrseq (\d+) bootid=(\w+)")


def main(argv: list[str]) -> int:
    path, n = argv[0], int(argv[1]) if len(argv) > 1 else 2048
    size = int(argv[2]) if len(argv) > 2 else 512
    blocks: dict[int, tuple[int, str]] = {}
    other: list[int] = []
    with open(path, "rb") as f:
        data = f.read(size * n)
    for i in range(len(data) // size):
        blk = data[size * i:size * (i + 1)]
        m = SEQ.match(blk)
        if m:
            blocks[i] = (int(m[1]), m[2].decode())
        elif any(blk):
            other.append(i)
    print(json.dumps({"blocks": blocks, "other": other}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
