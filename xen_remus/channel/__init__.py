"""The channel between our two ends: negotiation, per-epoch ACK, heartbeats,
lz4-over-XOR checkpoint compression, per-epoch stats. Sans-IO; see ends.py for how the
save engine and the receiver drive it, negotiate.py for why stock xl peers see stock bytes.
"""

# No re-exports: `xen-remus status` imports this package and must not pay for numpy.
