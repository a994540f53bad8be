"""What xen-remus needs of its host, named once: the Xen tool libraries it loads
(xen/libs.py loads them, `xen-remus check` looks for them without importing the xen
package, which needs numpy)."""

from __future__ import annotations

SONAMES = {"xenctrl": "libxenctrl.so.4.17", "xenguest": "libxenguest.so.4.17",
           "xenforeignmemory": "libxenforeignmemory.so.1", "xenevtchn": "libxenevtchn.so.1",
           "xentoollog": "libxentoollog.so.1"}
