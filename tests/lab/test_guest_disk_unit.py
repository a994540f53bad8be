"""The lab guest's ext4 disk workload (lab/guest/dseq, dsrv) run on this host with busybox,
and the lab's reading of its blocks (lab/disk.py): no QEMU. Its verify must pass on what
it wrote and fail on a disk behind its memory, ahead of it, or from another boot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import build, disk, guest
from lab.errors import LabError

GUEST = Path(build.HERE) / "guest"
SLOTS = 64
BOOT = "ab12cd34"


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """A PATH of busybox applets only (as in the guest), and dseq's mount and tmp dirs."""
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is not installed: apt-get install -y busybox"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for name in applets:
        (bin_ / name).symlink_to(bb)
    for name in ("dseq", "dsrv"):
        shutil.copy(GUEST / name, bin_ / name)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp/bootid").write_text(BOOT + "\n")
    return {"PATH": str(bin_), "DSEQ_MNT": str(tmp_path / "mnt"),
            "DSEQ_TMP": str(tmp_path / "tmp"), "DSEQ_IFLAG": ""}


def dseq(env: dict[str, str], rounds: int, *args: str) -> str:
    r = subprocess.run(["sh", "-c", 'exec dseq "$@"', "dseq", *args],
                       env={**env, "DSEQ_ROUNDS": str(rounds)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def verify(env: dict[str, str]) -> str:
    (Path(env["DSEQ_TMP"]) / "verify.req").touch()
    out = dseq(env, -1)
    assert not (Path(env["DSEQ_TMP"]) / "verify.req").exists()
    return (Path(env["DSEQ_TMP"]) / "verify.out").read_text().strip() + " | " + out


def put(env: dict[str, str], slot: int, text: bytes) -> None:
    with open(Path(env["DSEQ_MNT"]) / "seq", "r+b") as f:
        f.seek(slot * 4096)
        f.write(text.ljust(4096, b"\0"))


def test_dseq_writes_what_it_remembers_and_its_verify_agrees(
        sandbox: dict[str, str]) -> None:
    out = dseq(sandbox, SLOTS + 6, "8")
    assert f"XRGUEST dseq start slots={SLOTS} bulk=8k" in out
    assert out.count("XRGUEST dflush begin") == out.count("XRGUEST dflush end") == SLOTS + 6
    assert (Path(sandbox["DSEQ_TMP"]) / "durable").read_text().strip() == str(SLOTS + 6)
    res = verify(sandbox)
    assert res.startswith(f"verify ok slots={SLOTS}"), res
    blocks = disk.parse_seq_blocks((Path(sandbox["DSEQ_MNT"]) / "seq").read_bytes(), 4096)
    assert sorted(s for s, _ in blocks.blocks.values()) == list(range(7, SLOTS + 7))
    blocks.check_told(list(range(1, SLOTS + 7)), BOOT)  # told 1..70: each on disk or newer


@pytest.mark.parametrize("slot,text,why", [
    (6, b"", "behind: a write memory knows is not on the disk"),
    (6, b"xrseq 70 bootid=ab12cd34 r=00000000\n", "another write of the same number"),
    (9, b"xrseq 137 bootid=ab12cd34 r=11111111\n", "ahead: a number memory never wrote"),
    (6, b"xrseq 6 bootid=ffffffff r=00000000\n", "from another boot"),
])
def test_dseq_verify_fails_a_disk_that_is_not_its_memory(
        sandbox: dict[str, str], slot: int, text: bytes, why: str) -> None:
    dseq(sandbox, SLOTS + 6)
    put(sandbox, slot, text)
    res = verify(sandbox)
    assert res.startswith("verify bad"), f"{why}: {res}"


def test_dsrv_answers_durable_and_relays_requests(sandbox: dict[str, str]) -> None:
    tmp = Path(sandbox["DSEQ_TMP"])
    (tmp / "durable").write_text("41\n")
    (tmp / "verify.out").write_text("stale\n")
    # dseq answers at once here (a file written before the request is removed by dsrv, so
    # the stale one does not count): the request must be made, then answered.
    proc = subprocess.Popen(["sh", "-c", "exec dsrv"], env=sandbox, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("x\nverify\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == f"durable=41 bootid={BOOT}"
    assert proc.stdout.readline().strip() == f"durable=41 bootid={BOOT}"
    for _ in range(100):
        if (tmp / "verify.req").exists():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert (tmp / "verify.req").exists() and not (tmp / "verify.out").exists()
    (tmp / "verify.out").write_text("verify ok slots=3 seq=41\n")
    assert proc.stdout.readline().strip() == "verify ok slots=3 seq=41"
    proc.stdin.close()
    assert proc.wait(10) == 0


def test_told_numbers_missing_from_the_disk_are_named() -> None:
    data = bytearray(SLOTS * 4096)
    for seq in range(60, 70):
        line = f"xrseq {seq} bootid={BOOT} r=0\n".encode()
        data[(seq % SLOTS) * 4096:(seq % SLOTS) * 4096 + len(line)] = line
    blocks = disk.parse_seq_blocks(bytes(data), 4096)
    blocks.check_told([60, 65, 69], BOOT)
    with pytest.raises(LabError, match=r"told durable but not on disk: \[70\]"):
        blocks.check_told([65, 70], BOOT)
    with pytest.raises(LabError, match="another boot"):
        blocks.check_told([60], "ffffffff")


def test_ext4_guest_config_carries_the_workload_arguments() -> None:
    spec = guest.GuestSpec(name="dk", disk=disk.spec_line("/root/dk.img"),
                           cmdline="xenlab_disk=ext4 xenlab_dbulk=512")
    assert ('extra = "console=hvc0 quiet xenlab_ip=169.254.20.1/16 xenlab_disk=ext4 '
            'xenlab_dbulk=512"') in spec.config()
    mods = [Path(m).stem for m in build.GUEST_MODULES]
    init = (GUEST / "init").read_text()
    order = init[init.index("for m in crc16"):].split(";")[0].split()[3:]
    assert order == ["crc16", "mbcache", "crc32c_generic", "jbd2", "ext4"]
    assert set(order) <= set(mods), "init loads a module the build does not put in the guest"
    assert os.access(GUEST / "dseq", os.X_OK) and os.access(GUEST / "dsrv", os.X_OK)


CRASHED = """crash.img: recovering journal
Pass 1: Checking inodes, blocks, and sizes
Pass 5: Checking group summary information
Free blocks count wrong (6643, counted=6443).
Fix? yes

Free inodes count wrong (8181, counted=8131).
Fix? yes

crash.img: ***** FILE SYSTEM WAS MODIFIED *****
"""


def test_a_crash_image_may_need_its_free_counts_fixed_and_nothing_else() -> None:
    assert disk.crash_fsck_problems(CRASHED) == []  # as e2fsck 1.47 said of a crash copy
    torn = CRASHED.replace("Pass 5", "Inode 12 has EXTENTS_FL flag set on filesystem "
                           "without extents support.\nFix? yes\n\nPass 5")
    assert disk.crash_fsck_problems(torn) == [
        "Inode 12 has EXTENTS_FL flag set on filesystem without extents support."]
