"""Our NBD server against real clients on this host: libnbd's nbdinfo and nbdcopy, QEMU's
qemu-io, fio's nbd engine (plain and replicated to a backup store).

The tools are host dependencies (Debian: libnbd-bin, qemu-utils, fio). A missing tool
FAILS these tests, it does not skip them: an NBD server nobody else has spoken to is not
tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.disk_helpers import Replicated, ServerThread
from xen_remus.disk.device import ReplicatedDisk

SIZE = 16 * 1024 * 1024
TOOL_TIMEOUT = 120  # seconds for one tool run
PACKAGES = {"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "qemu-io": "qemu-utils",
            "fio": "fio"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y {PACKAGES[name]}"
                    " (the Makefile's host-deps target installs it)")
    return path


def run_tool(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args[0]} did not finish in {TOOL_TIMEOUT} s: {exc}")
    assert out.returncode == 0, f"{' '.join(args)}: rc {out.returncode}\n{out.stdout}\n" \
                                f"{out.stderr}"
    return out.stdout


def uri(sock: str) -> str:
    return f"nbd+unix:///?socket={sock}"


@pytest.fixture
def served(tmp: str) -> Iterator[ServerThread]:
    img = os.path.join(tmp, "img")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    with ServerThread(img, os.path.join(tmp, "s")) as st:
        yield st


def test_nbdinfo_sees_size_flush_and_fua(served: ServerThread) -> None:
    info = json.loads(run_tool(tool("nbdinfo"), "--json", uri(served.server.socket_path)))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is False
    [exp] = info["exports"]
    assert exp["export-size"] == SIZE
    assert (exp["can_flush"], exp["can_fua"], exp["is_read_only"]) == (True, True, False)
    assert (exp["can_trim"], exp["can_zero"], exp["can_multi_conn"]) == (False, False, False)
    assert exp["block_size_maximum"] == 32 * 1024 * 1024


def test_qemu_io_writes_flushes_fua_and_reads_back(served: ServerThread) -> None:
    out = run_tool(tool("qemu-io"), "-f", "raw", f"nbd:unix:{served.server.socket_path}",
                   "-c", "write -P 0xab 0 64k", "-c", "write -f -P 0xcd 64k 4k",
                   "-c", "flush", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xcd 64k 4k",
                   "-c", "read -P 0 68k 4k", "-c", "write -P 0xef 16380k 4k")
    assert "verification failed" not in out.lower() and "error" not in out.lower(), out
    assert out.count("wrote ") == 3 and out.count("read ") == 3, out
    data = Path(served.server.image).read_bytes()
    assert data[:65536] == b"\xab" * 65536 and data[65536:69632] == b"\xcd" * 4096
    assert data[-4096:] == b"\xef" * 4096
    assert served.server.stats.syncs >= 2  # the FUA write and the flush each reached fdatasync
    # Past the end: qemu-io itself refuses or the server answers ENOSPC; never a hang.
    bad = subprocess.run([tool("qemu-io"), "-f", "raw",
                          f"nbd:unix:{served.server.socket_path}", "-c",
                          f"write -P 1 {SIZE - 512} 4k"], capture_output=True, text=True,
                         timeout=TOOL_TIMEOUT, check=False)
    assert "wrote" not in bad.stdout


def test_nbdcopy_round_trip(served: ServerThread, tmp: str) -> None:
    src, back = os.path.join(tmp, "src"), os.path.join(tmp, "back")
    Path(src).write_bytes(os.urandom(SIZE))
    run_tool(tool("nbdcopy"), "--flush", src, uri(served.server.socket_path))
    assert Path(served.server.image).read_bytes() == Path(src).read_bytes()
    run_tool(tool("nbdcopy"), uri(served.server.socket_path), back)
    assert Path(back).read_bytes() == Path(src).read_bytes()


def _fio(sock: str, *extra: str) -> dict[str, object]:
    out = run_tool(tool("fio"), "--name=t", "--ioengine=nbd", f"--uri={uri(sock)}",
                   "--output-format=json", *extra)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return dict(job)


def test_fio_nbd_engine_random_writes_verify_at_queue_depth_16(served: ServerThread) -> None:
    _fio(served.server.socket_path, "--rw=randwrite", "--bs=4k", "--iodepth=16",
         "--size=4m", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
         "--fsync=64")
    assert served.server.stats.writes >= 1024 and served.server.stats.syncs >= 16


def test_fio_through_a_replicated_disk_leaves_the_backup_equal(tmp: str) -> None:
    with Replicated(tmp, SIZE, memory_ceiling=2 * 1024 * 1024) as rep:  # spills, too
        disk = ReplicatedDisk(rep.control())
        disk.setup()
        for epoch, rw in enumerate(("randwrite", "write")):
            _fio(rep.st.server.socket_path, f"--rw={rw}", "--bs=4k", "--iodepth=16",
                 "--size=8m", "--fsync=32")
            disk.postsuspend(epoch)
            assert rep.store.wait_sealed(epoch, timeout=30), f"SEAL({epoch}) never arrived"
            disk.commit(epoch)
            rep.store.commit(epoch)
            assert Path(rep.backup).read_bytes() == Path(rep.primary).read_bytes()
        disk.teardown()
    rep.store.close()
