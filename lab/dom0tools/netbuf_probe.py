"""The dom0 half of test_netbuf.py: network output buffering of a live guest's vif.

Run inside a lab dom0 as ``python3 netbuf_probe.py DOMID GUEST_IP`` (or ``crash DOMID``:
set up buffering and die by SIGKILL, leaving everything behind). Prints one line
``PROBE-RESULT {json}`` that test_netbuf.py checks; holds no tests itself. Every wait is
bounded. Needs only what dom0 has: stdlib, python3-pyroute2, python3-pyxs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xen_remus.devices.base import DeviceError, DeviceSet
from xen_remus.devices.discover import netbufs_for_domain
from xen_remus.devices.kmod import Modules
from xen_remus.devices.netbuf import NetbufError, NetBuffer
from xen_remus.devices.runstate import StateDir

PORT = 7000
BRIDGE = "xenbr0"
QUIET = 1.5  # s to wait for something that must not come while output is held


class Lines:
    """One TCP connection to the guest's counter service, read line by line."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_connection((ip, PORT), timeout=20)
        self.buf = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def line(self, timeout: float) -> tuple[str, float] | None:
        """The next line and when it arrived, or None within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(4096)
            if not data:
                raise RuntimeError("guest closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(), time.monotonic()


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return int(~s & 0xFFFF)


class Pinger:
    """ICMP (v4) or ICMPv6 echo with our id; replies collected by sequence number."""

    def __init__(self, v6: bool, ident: int) -> None:
        fam, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (
            socket.AF_INET, socket.IPPROTO_ICMP)
        self.v6, self.ident = v6, ident
        self.sock = socket.socket(fam, socket.SOCK_RAW, proto)

    def send(self, addr: Any, seq: int) -> None:
        kind = 128 if self.v6 else 8
        body = struct.pack("!BBHHH", kind, 0, 0, self.ident, seq) + b"xen-remus netbuf"
        if not self.v6:  # the kernel fills in the ICMPv6 checksum itself
            body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        self.sock.sendto(body, addr)

    def replies(self, timeout: float) -> list[int]:
        seqs: list[int] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            pkt = self.sock.recv(2048)
            icmp = pkt if self.v6 else pkt[(pkt[0] & 0xF) * 4:]
            kind, _, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
            if kind == (129 if self.v6 else 0) and ident == self.ident:
                seqs.append(seq)
        return sorted(seqs)


def arp_probe(guest_ip: str, timeout: float, sock: socket.socket | None = None) -> bool:
    """Broadcast who-has GUEST_IP on the bridge; True if the guest's reply came back."""
    own = sock is None
    s = sock or socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        s.bind((BRIDGE, 0x0806))
        mac = bytes.fromhex(Path(f"/sys/class/net/{BRIDGE}/address").read_text().strip()
                            .replace(":", ""))
        src = socket.inet_aton("169.254.10.1")
        tgt = socket.inet_aton(guest_ip)
        frame = (b"\xff" * 6 + mac + b"\x08\x06"
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + src + b"\0" * 6 + tgt)
        s.send(frame)
        return arp_reply(s, guest_ip, timeout)
    finally:
        if own:
            s.close()


def arp_reply(sock: socket.socket, guest_ip: str, timeout: float) -> bool:
    """Whether the guest's reply to a who-has already sent on ``sock`` comes within
    ``timeout`` s (no new request is sent)."""
    tgt = socket.inet_aton(guest_ip)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return False
        pkt = sock.recv(2048)
        if pkt[12:14] == b"\x08\x06" and pkt[20:22] == b"\x00\x02" and pkt[28:32] == tgt:
            return True
    return False


def link_local(mac: str) -> str:
    b = bytearray(bytes.fromhex(mac.replace(":", "")))
    b[0] ^= 2
    eui = bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])
    return "fe80::" + ":".join(f"{eui[i] << 8 | eui[i + 1]:x}" for i in range(0, 8, 2))


def tx_packets(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_packets").read_text())


def tc_state(nb: NetBuffer) -> dict[str, Any]:
    """Whether the vif has our ingress hook (and its filters), and the IFB's qdiscs."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        vif = ip.link_lookup(ifname=nb.vif)[0]
        kinds = [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index=vif)]
        filters = []
        if "ingress" in kinds:
            filters = sorted({f.get_attr("TCA_KIND") for f in
                              ip.get_filters(index=vif, parent=0xFFFF0000)} - {None})
        idx = ip.link_lookup(ifname=nb.ifb)
        ifb = [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index=idx[0])] if idx else None
        return {"ingress": "ingress" in kinds, "filters": filters, "ifb": ifb}


def rtts(conn: Lines, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.monotonic()
        conn.send(f"rtt{i}")
        got = conn.line(10)
        if got is None:
            raise RuntimeError(f"no reply to rtt{i} within 10 s")
        out.append(round((got[1] - t) * 1000, 1))
    return out


class Cadence(threading.Thread):
    """postsuspend + commit every ``interval`` s, as the epoch loop would (zero ACK time)."""

    def __init__(self, ds: DeviceSet, first: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.ds, self.epoch, self.interval = ds, first, interval
        self.stop = threading.Event()
        self.op_ms: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.interval):
                t = time.monotonic()
                self.ds.postsuspend(self.epoch)
                self.ds.commit(self.epoch)
                self.op_ms.append((time.monotonic() - t) * 1000)
                self.epoch += 1
        except Exception as exc:
            self.error = repr(exc)


def pyroute2_version() -> str:
    """Debian's package lacks the metadata pyroute2.__version__ reads ("unknown")."""
    import subprocess

    import pyroute2

    version = str(getattr(pyroute2, "__version__", "unknown"))
    if version == "unknown":
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "python3-pyroute2"],
                           capture_output=True, text=True, timeout=60, check=False)
        version = f"python3-pyroute2 {r.stdout.strip()}" if r.returncode == 0 else version
    return version


def main(domid: int, guest_ip: str, guest_mac: str, out: dict[str, Any]) -> None:
    out["pyroute2"] = pyroute2_version()
    conn = Lines(guest_ip)
    out["greeting"] = conn.line(10) is not None
    out["rtt_before_ms"] = rtts(conn, 10)
    v6addr = (link_local(guest_mac), 0, 0, socket.if_nametoindex(BRIDGE))
    ping4, ping6 = Pinger(False, 0x4242), Pinger(True, 0x4343)
    ping4.send((guest_ip, 0), 100)
    ping6.send(v6addr, 100)  # also fills dom0's neighbour cache for the guest
    out["unbuffered_ping"] = [ping4.replies(3), ping6.replies(3)]
    out["unbuffered_arp"] = arp_probe(guest_ip, 3)

    nbs = netbufs_for_domain(domid)
    out["devices"] = [nb.name for nb in nbs]
    ds = DeviceSet(nbs)
    ds.setup()
    nb = nbs[0]
    out["tc_after_setup"] = tc_state(nb)
    out["state_files"] = StateDir("netbuf").keys()

    # Epoch 1: a TCP request and 3 pings; all replies must be held.
    conn.send("e1")
    for seq in (1, 2, 3):
        ping4.send((guest_ip, 0), seq)
    out["held_tcp_e1"] = conn.line(QUIET) is None
    out["held_ping_e1"] = ping4.replies(0.1) == []
    tx0 = tx_packets(nb.ifb)
    ds.postsuspend(1)
    # Epoch 2: 2 more pings; their replies belong to epoch 2.
    for seq in (4, 5):
        ping4.send((guest_ip, 0), seq)
    out["held_ping_e2_before_commit1"] = ping4.replies(QUIET) == []
    t_commit = time.monotonic()
    ds.commit(1)
    got = conn.line(5)
    out["tcp_e1_after_commit_ms"] = None if got is None else round((got[1] - t_commit) * 1000, 1)
    out["ping_after_commit1"] = ping4.replies(QUIET)
    out["ifb_tx_commit1"] = tx_packets(nb.ifb) - tx0
    ds.postsuspend(2)
    tx1 = tx_packets(nb.ifb)
    ds.commit(2)
    out["ping_after_commit2"] = ping4.replies(QUIET)
    out["ifb_tx_commit2"] = tx_packets(nb.ifb) - tx1

    # IPv6 and ARP go through the IFB too: held until the next commit.
    ping6.send(v6addr, 7)
    out["held_ping6"] = ping6.replies(QUIET) == []
    arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    out["held_arp"] = not arp_probe(guest_ip, QUIET, arp)
    ds.postsuspend(3)
    ds.commit(3)
    out["ping6_after_commit3"] = ping6.replies(QUIET)
    out["arp_after_commit3"] = arp_reply(arp, guest_ip, QUIET)  # to the request held
    arp.close()

    # Out-of-order commit is refused and changes nothing.
    try:
        ds.commit(3)
        out["recommit_refused"] = False
    except NetbufError as exc:
        out["recommit_refused"] = str(exc)

    # Added latency at a 100 ms commit cadence, and the cost of each postsuspend+commit.
    cad = Cadence(ds, 4, 0.1)
    cad.start()
    try:
        out["rtt_cadence100_ms"] = rtts(conn, 20)
    finally:
        cad.stop.set()
        cad.join(10)
    out["cadence_error"] = cad.error
    out["cadence_epochs"] = cad.epoch - 4
    out["postsuspend_commit_ms"] = sorted(round(x, 2) for x in cad.op_ms)

    # Teardown never releases: what is held then (the backup lacks it) is dropped.
    # ICMP, since TCP would send it again.
    ping4.send((guest_ip, 0), 8)
    out["held_ping_before_teardown"] = ping4.replies(QUIET) == []
    ds.teardown()
    out["ping_after_teardown"] = ping4.replies(QUIET)
    out["tc_after_teardown"] = tc_state(nb)
    out["state_after_teardown"] = StateDir("netbuf").keys()
    out["rtt_after_teardown_ms"] = rtts(conn, 10)

    # A crashed run: another process sets up and dies by SIGKILL; traffic is then held.
    t = time.monotonic()
    child = os.spawnv(os.P_WAIT, sys.executable,
                      [sys.executable, __file__, "crash", str(domid)])
    out["crash_child"] = {"status": child, "seconds": round(time.monotonic() - t, 1)}
    out["state_after_crash"] = StateDir("netbuf").keys()
    out["tc_after_crash"] = tc_state(nb)
    conn.send("during-crash")
    out["held_after_crash"] = conn.line(QUIET) is None
    nbs = netbufs_for_domain(domid)
    ds = DeviceSet(nbs)
    ds.setup()  # drops the dead run's held (uncommitted) output, sets up anew
    out["tc_after_recovery_setup"] = tc_state(nbs[0])
    # The dropped reply comes again as the guest's TCP retransmits it, through the new plug.
    cad = Cadence(ds, 1, 0.1)
    cad.start()
    try:
        got = conn.line(20)
    finally:
        cad.stop.set()
        cad.join(10)
    out["reply_after_recovery"] = None if got is None else got[0]
    out["recovery_cadence_error"] = cad.error
    # release_all (the guest goes on here) lets the held reply out before the teardown.
    ping4.send((guest_ip, 0), 9)
    out["held_ping_before_release"] = ping4.replies(QUIET) == []
    ds.release_all()
    ds.teardown()
    out["ping_after_release_teardown"] = ping4.replies(QUIET)
    out["rtt_final_ms"] = rtts(conn, 5)
    out["tc_final"] = tc_state(nbs[0])

    try:
        Modules().require("netbuf", ["sch_nonexistent_xr"])
        out["missing_module"] = None
    except DeviceError as exc:
        out["missing_module"] = str(exc)
    except Exception as exc:
        out["missing_module"] = f"wrong type {type(exc).__name__}: {exc}"


def crash(domid: int) -> None:
    ds = DeviceSet(netbufs_for_domain(domid))
    ds.setup()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        try:
            crash(int(sys.argv[2]))
        finally:
            os._exit(3)  # only if setup failed: SIGKILL ends the process otherwise
    result: dict[str, Any] = {}
    try:
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3], result)
    except Exception:
        result["fatal"] = traceback.format_exc()
    print("PROBE-RESULT " + json.dumps(result), flush=True)
