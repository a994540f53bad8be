"""Disk replication: every guest write mirrored to the backup and committed with its epoch.

The data path, primary to backup::

    guest (blkfront) -> blkback (phy:/dev/nbdN) -> /dev/nbdN -> nbd-client's socket
      -> Unix socket -> DiskServer (server.py, over the sans-IO nbd.py)
           -> pwrite into the local image, then the same write, in the same order,
              as W(epoch, offset, data) on the replication stream (replica.py, link.py)
           -> between checkpoints, ReplicatedDisk.idle() (device.py) streams the open
              epoch's writes on towards the backup as they come
           -> at each checkpoint's suspend, ReplicatedDisk.postsuspend(N) has the server
              seal epoch N (answered at once, remote.py): SEAL(N) goes into the stream
              behind N's writes, and with the last of them into checkpoint N, read as the
              checkpoint is sent (the guest running again)
      -> backup: BackupStream feeds an EpochStore (store.py), which holds each epoch's
         writes apart (last writer wins, spilled to a file past a memory ceiling) and
         ACKs SEAL(N) ("disk sealed through N")
      -> the backup ACKs memory checkpoint N only once disk seal N is in too; then
         EpochStore.commit(N) applies epoch N to the backup's image
      -> failover: EpochStore.failover(last committed) drops every uncommitted write.

Before epoch 0, while the guest runs, the replica is synchronised in the same stream
(sync.py: the blocks of the primary's persistent dirty bitmap, persist.py, if the replica
is still at its base; else every chunk whose SHA-256 differs), relayed by protect before
the pre-copy; a replica that fails later is a lost backup (device.ReplicaLost).

The guest never waits for the backup (output commit already holds back its effects);
only a full replication backlog (unACKed bytes at the cap) makes the server stop taking
requests until the backup catches up.
"""
