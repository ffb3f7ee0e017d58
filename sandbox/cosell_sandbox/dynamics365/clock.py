"""The Dynamics 365 emulator's clock, in one place so that a test can stop it (patch ``_now``)."""

from __future__ import annotations

from datetime import UTC, datetime


def _now() -> datetime:
    return datetime.now(UTC)
