"""XenStore (pyxs) and the xenstore suspend path against a fake xenstored on a Unix socket."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from pyxs._internal import Op

from xen_remus.xen import structs as S
from xen_remus.xen.ctrl import XenCtrl
from xen_remus.xen.domain import DomainInfo
from xen_remus.xen.errors import SuspendError
from xen_remus.xen.suspend import Suspender
from xen_remus.xen.xenstore import XenStore, XenStoreError

HDR = struct.Struct("<IIII")  # xsd_sockmsg: type, req_id, tx_id, len


class FakeXenstored:
    """Enough of xenstored's wire protocol for XenStore: read/write/directory/rm/domain path."""

    def __init__(self, path: Path) -> None:
        self.store: dict[str, str] = {}
        self.on_write: Callable[[str, str], None] = lambda p, v: None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(5)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            while True:
                head = conn.recv(HDR.size, socket.MSG_WAITALL)
                if len(head) < HDR.size:
                    return
                op, rq, tx, n = HDR.unpack(head)
                body = conn.recv(n, socket.MSG_WAITALL) if n else b""
                rop, reply = self._handle(op, body)
                conn.sendall(HDR.pack(rop, rq, tx, len(reply)) + reply)

    def _handle(self, op: int, body: bytes) -> tuple[int, bytes]:
        args = body.split(b"\0")
        path = args[0].decode()
        if path.startswith("/forbidden"):
            return Op.ERROR, b"EACCES\0"
        if op == Op.READ:
            if path not in self.store:
                return Op.ERROR, b"ENOENT\0"
            return op, self.store[path].encode()
        if op == Op.WRITE:
            value = body[len(args[0]) + 1:].decode()
            self.store[path] = value
            self.on_write(path, value)
            return op, b"OK\0"
        if op == Op.DIRECTORY:
            kids = sorted({k[len(path) + 1:].split("/")[0] for k in self.store
                           if k.startswith(path + "/")})
            return op, b"\0".join(k.encode() for k in kids) + b"\0"
        if op == Op.RM:
            for k in [k for k in self.store if k == path or k.startswith(path + "/")]:
                del self.store[k]
            return op, b"OK\0"
        if op == Op.GET_DOMAIN_PATH:
            return op, f"/local/domain/{path}".encode() + b"\0"
        return Op.ERROR, b"ENOSYS\0"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def xsd(tmp_path: Path) -> Iterator[FakeXenstored]:
    srv = FakeXenstored(tmp_path / "socket")
    yield srv
    srv.close()


@pytest.fixture
def xs(xsd: FakeXenstored, tmp_path: Path) -> Iterator[XenStore]:
    store = XenStore(unix_socket_path=str(tmp_path / "socket"))
    yield store
    store.close()


def test_read_write_list_remove(xs: XenStore, xsd: FakeXenstored) -> None:
    assert xs.domain_path(7) == "/local/domain/7"
    assert xs.read("/local/domain/7/name") is None
    xs.write("/local/domain/7/name", "g1")
    xs.write("/local/domain/7/control/shutdown", "")
    assert xs.read("/local/domain/7/name") == "g1"
    assert xs.list("/local/domain/7") == ["control", "name"]
    assert xs.list("/local/domain/9") == []
    xs.remove("/local/domain/7/name")
    assert xs.read("/local/domain/7/name") is None


def test_errors_name_operation_path_errno(xs: XenStore) -> None:
    with pytest.raises(XenStoreError, match=r"xenstore write /forbidden/x failed: errno 13"):
        xs.write("/forbidden/x", "1")
    with pytest.raises(XenStoreError, match=r"xenstore read /forbidden/y failed: errno 13"):
        xs.read("/forbidden/y")


def test_connect_failure_is_our_error(tmp_path: Path) -> None:
    with pytest.raises(XenStoreError, match="connect"):
        XenStore(unix_socket_path=str(tmp_path / "absent"))


class FakeXc:
    """domain_info() of one domain whose shutdown code the test sets."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.resumed = 0

    def resume(self, domid: int, fast: bool = True) -> None:
        self.code, self.resumed = None, self.resumed + 1

    def domain_info(self, domid: int) -> DomainInfo:
        flags = S.DOMINF_RUNNING
        if self.code is not None:
            flags = S.DOMINF_SHUTDOWN | (self.code << S.DOMINF_SHUTDOWNSHIFT)
        return DomainInfo.from_struct(S.XenDomctlGetDomainInfo(domain=domid, flags=flags))


def _guest(xsd: FakeXenstored, xc: FakeXc, code: int | None) -> None:
    """A guest that acks control/shutdown=suspend by clearing it, then shuts down with code."""
    def on_write(path: str, value: str) -> None:
        if path.endswith("/control/shutdown") and value == "suspend":
            xsd.store[path] = ""
            xc.code = code
    xsd.on_write = on_write


def test_suspend_via_xenstore(xs: XenStore, xsd: FakeXenstored) -> None:
    xc = FakeXc()
    _guest(xsd, xc, S.SHUTDOWN_SUSPEND)
    with Suspender(cast(XenCtrl, xc), xs, 3) as sus:
        assert sus.method == "xenstore"  # no device/suspend/event-channel
        info = sus.suspend(timeout=5)
    assert info.suspended and xsd.store["/local/domain/3/control/shutdown"] == ""


def test_suspend_not_acknowledged_is_undone(xs: XenStore, xsd: FakeXenstored) -> None:
    with Suspender(cast(XenCtrl, FakeXc()), xs, 4) as sus, \
            pytest.raises(SuspendError, match="domain 4 did not acknowledge"):
        sus.suspend(timeout=0.3)
    assert xsd.store["/local/domain/4/control/shutdown"] == ""


def test_a_guest_suspending_after_the_deadline_is_resumed(xs: XenStore,
                                                          xsd: FakeXenstored) -> None:
    """It read the request just before we withdrew it: it must not stay suspended."""
    xc = FakeXc()

    def on_write(path: str, value: str) -> None:
        if path.endswith("/control/shutdown") and value == "":
            xc.code = S.SHUTDOWN_SUSPEND
    xsd.on_write = on_write
    with Suspender(cast(XenCtrl, xc), xs, 6) as sus, \
            pytest.raises(SuspendError, match="domain 6 did not acknowledge .* within 0 s"):
        sus.suspend(timeout=0.3)
    assert xc.resumed == 1 and xc.code is None


def test_suspend_crash_instead_is_an_error(xs: XenStore, xsd: FakeXenstored) -> None:
    xc = FakeXc()
    _guest(xsd, xc, S.SHUTDOWN_CRASH)
    with Suspender(cast(XenCtrl, xc), xs, 5) as sus, \
            pytest.raises(SuspendError, match="shut down with reason 3 instead of suspending"):
        sus.suspend(timeout=5)
