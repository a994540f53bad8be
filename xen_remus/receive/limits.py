"""The receiver's default limits, apart from the code that applies them: `xen-remus
migrate-receive --help` shows them and must not load the stream decoder (numpy) to do so."""

DEFAULT_MAX_EPOCH_BYTES = 512 << 20  # the largest checkpoint held whole (--max-epoch-mib)
FENCE_TIMEOUT_S = 60.0  # --fence CMD is killed and counts as failed after this
PROMOTE_TIMEOUT_S = 300.0  # --failover-on-promote: fencing by IPMI can take a minute
