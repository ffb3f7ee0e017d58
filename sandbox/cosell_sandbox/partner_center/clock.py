"""The Partner Center emulator's clock, in one place so that a test can stop it (patch ``datetime``)."""

from __future__ import annotations

from datetime import UTC, datetime

from ..seed import iso


def now() -> datetime:
    return datetime.now(UTC)


def stamp() -> str:
    """Now as the API writes its stamps."""
    return iso(now())
