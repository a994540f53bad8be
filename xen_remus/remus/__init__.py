"""The channel between our two ends (issue 5): negotiation, per-epoch ACK, heartbeats,
lz4-over-XOR checkpoint compression, per-epoch stats. Sans-IO; see channel.py for how the
save engine and the receiver drive it, negotiate.py for why stock xl peers see stock bytes.
"""

from xen_remus.remus.channel import (
    Acked,
    BackEvent,
    Closed,
    Config,
    Offered,
    ReceiverChannel,
    SenderChannel,
)
from xen_remus.remus.errors import ChannelError, CompressionError
from xen_remus.remus.heartbeat import FailureDetector, HeartbeatTimer
from xen_remus.remus.negotiate import Extensions
from xen_remus.remus.stats import EpochStats, StatusFile

__all__ = [
    "Acked", "BackEvent", "Closed", "Config", "Offered", "ReceiverChannel", "SenderChannel",
    "ChannelError", "CompressionError", "FailureDetector", "HeartbeatTimer", "Extensions",
    "EpochStats", "StatusFile",
]
