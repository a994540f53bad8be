"""Stream errors: every one names the record, the field and the absolute byte offset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xen_remus.errors import XenRemusError


class FieldError(ValueError):
    """Raised by body/header unpackers; ``rel`` is the offset of ``field`` inside the item.

    The decoder turns it into a StreamError with the absolute offset and record name.
    """

    def __init__(self, field: str, message: str, rel: int = 0) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.rel = rel


class StreamError(XenRemusError):
    """An invalid or truncated migration stream."""

    def __init__(
        self,
        message: str,
        offset: int,
        record: str | None = None,
        field: str | None = None,
        epoch: int | None = None,
    ) -> None:
        self.message = message
        self.offset = offset
        self.record = record
        self.field = field
        self.epoch = epoch
        self.events: Sequence[Any] = ()  # events decoded before the error (same feed)
        where = record or "stream"
        if field:
            where += f".{field}"
        text = f"{where}: {message} at offset {offset}"
        if epoch is not None:
            text += f" (epoch {epoch})"
        super().__init__(text)
