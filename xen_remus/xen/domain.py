"""Domain information as returned by XEN_DOMCTL_getdomaininfo, as a plain value."""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.xen import structs as S


class _Flag:
    """A bool attribute of DomainInfo: whether ``mask`` is set in its ``flags``."""

    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __get__(self, info: DomainInfo, owner: type[DomainInfo]) -> bool:
        return bool(info.flags & self.mask)


@dataclass(frozen=True)
class DomainInfo:
    """One domain's xc_domaininfo_t. ``shared_info_frame`` is an MFN for PV, a GFN otherwise."""

    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    shared_info_frame: int
    cpu_time: int
    nr_online_vcpus: int
    max_vcpu_id: int
    emulation_flags: int
    handle: bytes

    @classmethod
    def from_struct(cls, s: S.XenDomctlGetDomainInfo) -> DomainInfo:
        return cls(int(s.domain), int(s.flags), int(s.tot_pages), int(s.max_pages),
                   int(s.shared_info_frame), int(s.cpu_time), int(s.nr_online_vcpus),
                   int(s.max_vcpu_id), int(s.arch_config.emulation_flags), bytes(s.handle))

    # XEN_DOMINF_* flags; hvm is true for HVM containers, i.e. both HVM and PVH guests.
    hvm = _Flag(S.DOMINF_HVM_GUEST)
    hap = _Flag(S.DOMINF_HAP)
    dying = _Flag(S.DOMINF_DYING)
    paused = _Flag(S.DOMINF_PAUSED)
    running = _Flag(S.DOMINF_RUNNING)
    shutdown = _Flag(S.DOMINF_SHUTDOWN)

    @property
    def pvh(self) -> bool:
        """PVH: an HVM container whose only emulated device is the local APIC."""
        return self.hvm and self.emulation_flags == S.X86_EMU_LAPIC

    @property
    def pv(self) -> bool:
        return not self.hvm

    @property
    def shutdown_reason(self) -> int | None:
        """SHUTDOWN_* code when the domain has shut down (2 = suspend), else None."""
        if not self.shutdown:
            return None
        return (self.flags >> S.DOMINF_SHUTDOWNSHIFT) & S.DOMINF_SHUTDOWNMASK

    @property
    def suspended(self) -> bool:
        return self.shutdown_reason == S.SHUTDOWN_SUSPEND

    @property
    def vcpus(self) -> int:
        """Number of vCPU slots (max_vcpu_id + 1); online ones are ``nr_online_vcpus``."""
        return self.max_vcpu_id + 1 if self.max_vcpu_id != 0xFFFFFFFF else 0
