"""xen-remus: Remus high availability for Xen guests."""

__version__ = "0.1.0"
