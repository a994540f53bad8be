"""The systemd units `xen-remus service install` puts into /etc/systemd/system."""
