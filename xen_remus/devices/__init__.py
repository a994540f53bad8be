"""Checkpointed devices of a protected domain.

- ``base.Device``: setup / postsuspend(epoch) / preresume / commit(epoch) / release_all /
  teardown. ``base.DeviceSet`` drives a list of them: commit in order (disks before nets),
  teardown in reverse, exception-safe; a context manager.
- ``netbuf.NetBuffer``: output commit for one vif (IFB + plug qdisc, through pyroute2).
- ``discover.device_set(domid, net=True)``: the DeviceSet of a domain, from xenstore.

The epoch loop uses it so (epochs increase; at most ``depth`` sealed epochs await their
commit, 1 unless epochs are pipelined, committed oldest first)::

    with device_set(domid, net=not no_netbuf) as devs:   # output held from here on
        while protecting:
            suspend(); devs.postsuspend(n); copy dirty pages
            devs.preresume(); resume(); send epoch n; wait for ACK of n
            devs.commit(n)                                # epoch n's packets go out
        devs.release_all()   # backup lost: the guest goes on here, unprotected
"""
