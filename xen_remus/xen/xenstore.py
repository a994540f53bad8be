"""XenStore access through pyxs (Debian's python3-pyxs), with our errors.

Connects to xenstored's Unix socket when it exists (dom0 running xenstored), else to the
xenbus device. Paths and values are str here; pyxs speaks bytes.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from xen_remus.xen.errors import XenError
from xen_remus.xen.libs import Closing

UNIX_SOCKET = "/run/xenstored/socket"
XENBUS = "/dev/xen/xenbus"


class XenStoreError(XenError):
    """A xenstore operation failed: names the operation, the path and errno."""

    def __init__(self, op: str, path: str, err: int, detail: str = "") -> None:
        self.op, self.path, self.errno = op, path, err
        name = errno.errorcode.get(err, "?")
        super().__init__(f"xenstore {op} {path} failed: errno {err} ({name})"
                         + (f": {detail}" if detail else ""))


class XenStore(Closing):
    """A connected xenstore client. Use as a context manager, or call close()."""

    def __init__(self, unix_socket_path: str | None = None, xen_bus_path: str | None = None
                 ) -> None:
        try:
            import pyxs
        except ImportError:
            raise XenError("xenstore: python3-pyxs is not installed") from None
        if unix_socket_path is None and xen_bus_path is None:
            if os.path.exists(UNIX_SOCKET):
                unix_socket_path = UNIX_SOCKET
            else:
                xen_bus_path = XENBUS
        where = unix_socket_path or xen_bus_path or "?"
        self._client: Any = pyxs.Client(unix_socket_path=unix_socket_path,
                                        xen_bus_path=xen_bus_path)
        try:
            self._client.connect()
        except (pyxs.PyXSError, OSError) as exc:
            raise XenStoreError("connect", where, _errno_of(exc), str(exc)) from None

    def _do(self, op: str, path: str, fn: Any, *args: bytes) -> Any:
        import pyxs

        try:
            return fn(path.encode(), *args)
        except (pyxs.PyXSError, OSError, ValueError) as exc:
            raise XenStoreError(op, path, _errno_of(exc)) from None

    def read(self, path: str) -> str | None:
        """Value at ``path``, or None if it does not exist."""
        import pyxs

        try:
            value: bytes = self._client.read(path.encode())
        except pyxs.PyXSError as exc:
            if _errno_of(exc) == errno.ENOENT:
                return None
            raise XenStoreError("read", path, _errno_of(exc)) from None
        return value.decode(errors="replace")

    def write(self, path: str, value: str) -> None:
        if value:
            self._do("write", path, self._client.write, value.encode())
            return
        # pyxs rejects an empty value (its ASCII check needs one character), yet "" is
        # what cancels a shutdown request: send WRITE with the payload "path\0" ourselves.
        from pyxs._internal import Op

        self._do("write", path, lambda p: self._client.ack(Op.WRITE, p + b"\0"))

    def remove(self, path: str) -> None:
        self._do("rm", path, self._client.delete)

    def list(self, path: str) -> list[str]:
        """Children of ``path``; [] if it does not exist."""
        import pyxs

        try:
            names: list[bytes] = self._client.list(path.encode())
        except pyxs.PyXSError as exc:
            if _errno_of(exc) == errno.ENOENT:
                return []
            raise XenStoreError("directory", path, _errno_of(exc)) from None
        return [n.decode() for n in names if n]

    def domain_path(self, domid: int) -> str:
        """/local/domain/DOMID as xenstored reports it."""
        import pyxs

        try:
            p: bytes = self._client.get_domain_path(domid)
        except (pyxs.PyXSError, OSError) as exc:
            raise XenStoreError("get-domain-path", str(domid), _errno_of(exc)) from None
        return p.decode()

    def close(self) -> None:
        self._client.close()


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return errno.EIO
