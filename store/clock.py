"""The store's one time format."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> str:
    """The current UTC time as ISO 8601 text with milliseconds, as every table stores it."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
