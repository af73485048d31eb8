"""The wall clock. `core` reads no clock: the adapters and runtimes read this one and hand
the time in, and tests hand in their own."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(UTC)
