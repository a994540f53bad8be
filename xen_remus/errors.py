"""The one exception family the CLI turns into a one-line message (never a traceback)."""

from __future__ import annotations


class XenRemusError(Exception):
    """Base of every error a user may see. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(XenRemusError):
    """Bad arguments or an unusable input/output path (xl-style exit code 2)."""

    exit_code = 2


class GuestHeld(XenRemusError):
    """Protection ends with the guest already paused by whoever raised this (the witness
    gave it to the backup): the epoch loop must not pause it a second time."""
