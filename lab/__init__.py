"""The real-Xen lab: Xen 4.17 hosts under QEMU (TCG), built, booted and driven from Python."""
