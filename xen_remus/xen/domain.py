"""Domain information as returned by XEN_DOMCTL_getdomaininfo, as a plain value."""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.xen import structs as S


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

    @property
    def hvm(self) -> bool:
        """True for HVM containers, i.e. both HVM and PVH guests."""
        return bool(self.flags & S.DOMINF_HVM_GUEST)

    @property
    def pvh(self) -> bool:
        """PVH: an HVM container whose only emulated device is the local APIC."""
        return self.hvm and self.emulation_flags == S.X86_EMU_LAPIC

    @property
    def pv(self) -> bool:
        return not self.hvm

    @property
    def dying(self) -> bool:
        return bool(self.flags & S.DOMINF_DYING)

    @property
    def paused(self) -> bool:
        return bool(self.flags & S.DOMINF_PAUSED)

    @property
    def running(self) -> bool:
        return bool(self.flags & S.DOMINF_RUNNING)

    @property
    def hap(self) -> bool:
        return bool(self.flags & S.DOMINF_HAP)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & S.DOMINF_SHUTDOWN)

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
