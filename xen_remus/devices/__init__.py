"""Checkpointed devices: the interface (base.Device, base.DeviceSet) and network output
buffering (netbuf.NetBuffer; discover.netbufs_for_domain finds a domain's vifs)."""
