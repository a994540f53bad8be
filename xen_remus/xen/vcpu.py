"""Typed view of a PV vCPU's vcpu_guest_context (x86_64 and x86_32 layouts), over raw bytes.

Only the fields the save/restore path reads or rewrites are exposed: flags, the start_info
register (rdx/edx), the GDT frames and the control registers. Offsets are those of Xen 4.17's
xen/foreign/x86_64.h and x86_32.h (asserted in tests/test_xen_structs.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5


@dataclass(frozen=True)
class Layout:
    width: int  # guest word size in bytes
    size: int
    flags: int
    dx: int  # user_regs.rdx / edx: start_info frame on vcpu0
    gdt_frames: int
    gdt_ents: int
    ctrlreg: int


LAYOUT_X86_64 = Layout(width=8, size=5168, flags=512, dx=616, gdt_frames=4832, gdt_ents=4960,
                       ctrlreg=4984)
LAYOUT_X86_32 = Layout(width=4, size=2800, flags=512, dx=524, gdt_frames=2640, gdt_ents=2704,
                       ctrlreg=2716)
NR_GDT_FRAMES = 16


def cr3_to_mfn(cr3: int, width: int) -> int:
    """xen_cr3_to_pfn: 32-bit PAE guests fold MFN bits 20+ into cr3's low bits."""
    if width == 8:
        return cr3 >> 12
    return ((cr3 >> 12) | (cr3 << 20)) & 0xFFFFFFFF


def mfn_to_cr3(mfn: int, width: int) -> int:
    """xen_pfn_to_cr3, the inverse of cr3_to_mfn."""
    if width == 8:
        return mfn << 12
    return ((mfn << 12) | (mfn >> 20)) & 0xFFFFFFFF


class VcpuContext:
    """A mutable copy of one vCPU's basic context; ``raw`` is what the stream record carries."""

    def __init__(self, raw: bytes, width: int) -> None:
        self.layout = LAYOUT_X86_64 if width == 8 else LAYOUT_X86_32
        if width not in (4, 8):
            raise ValueError(f"vCPU context: guest width {width} is neither 4 nor 8 bytes")
        if len(raw) < self.layout.size:
            raise ValueError(f"vCPU context: {len(raw)} bytes, the x86_{width * 8} layout "
                             f"needs {self.layout.size}")
        self.raw = bytearray(raw[: self.layout.size])
        self._fmt = "<Q" if width == 8 else "<I"

    def _get(self, off: int) -> int:
        return int(struct.unpack_from(self._fmt, self.raw, off)[0])

    def _set(self, off: int, value: int) -> None:
        struct.pack_into(self._fmt, self.raw, off, value)

    @property
    def width(self) -> int:
        return self.layout.width

    @property
    def flags(self) -> int:
        return self._get(self.layout.flags)

    @property
    def online(self) -> bool:
        return bool(self.flags & VGCF_ONLINE)

    @property
    def dx(self) -> int:
        """user_regs.rdx (edx): on vcpu0 of a suspended PV guest, the start_info frame."""
        return self._get(self.layout.dx)

    @dx.setter
    def dx(self, value: int) -> None:
        self._set(self.layout.dx, value)

    @property
    def gdt_ents(self) -> int:
        return self._get(self.layout.gdt_ents)

    def gdt_frame(self, i: int) -> int:
        return self._get(self.layout.gdt_frames + i * self.width)

    def set_gdt_frame(self, i: int, value: int) -> None:
        self._set(self.layout.gdt_frames + i * self.width, value)

    @property
    def nr_gdt_frames(self) -> int:
        """Frames in use by the GDT: 512 descriptors of 8 bytes per frame."""
        return min(NR_GDT_FRAMES, -(-self.gdt_ents // 512))

    def ctrlreg(self, i: int) -> int:
        return self._get(self.layout.ctrlreg + i * self.width)

    def set_ctrlreg(self, i: int, value: int) -> None:
        self._set(self.layout.ctrlreg + i * self.width, value)
