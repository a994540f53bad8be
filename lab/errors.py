"""The lab's one error type: what failed, on which host, with the log to read."""

from __future__ import annotations


class LabError(Exception):
    """A lab build, boot or control step failed; the message names the step and the host."""
