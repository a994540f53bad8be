"""The OCF resource agent (protected_guest.py) that `xen-remus service install` puts into
/usr/lib/ocf/resource.d/xen-remus/protected-guest for Pacemaker."""
