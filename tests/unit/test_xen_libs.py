"""Library loading and failure reporting of the Xen layer, on a host without Xen."""

from __future__ import annotations

import os

import pytest

from xen_remus.xen import ForeignMemory, XenCallError, XenCtrl, XenLibraryError, libs


def test_missing_library_is_our_error() -> None:
    with pytest.raises(XenLibraryError, match=r"cannot load libxen-absent\.so\.9"):
        libs._load("libxen-absent.so.9")


def _have_libs() -> bool:
    try:
        libs.xenctrl()
        libs.foreignmemory()
    except XenLibraryError:
        return False
    return True


@pytest.mark.skipif(not _have_libs() or os.path.exists("/dev/xen/privcmd"),
                    reason="needs the Xen 4.17 libraries and a host that is not a Xen dom0")
def test_open_without_xen_names_call_and_errno_quietly(capfd: pytest.CaptureFixture[str]
                                                       ) -> None:
    for cls, call in ((XenCtrl, "xc_interface_open"), (ForeignMemory, "xenforeignmemory_open")):
        with pytest.raises(XenCallError, match=rf"^{call} failed: errno \d+ \(E[A-Z]+") as ei:
            cls()
        assert ei.value.call == call and ei.value.errno > 0
    # libxencall's own "Could not obtain handle" line is kept off stderr.
    assert capfd.readouterr().err == ""
