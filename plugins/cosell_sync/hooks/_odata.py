"""Building OData ``$filter`` expressions safely (Partner Center and Dataverse)."""

from __future__ import annotations

from datetime import UTC, datetime


def quote(value: str) -> str:
    """A string literal: single quotes, with embedded quotes doubled. Never splice raw values."""
    if not isinstance(value, str):
        raise TypeError(f"OData string literal expected a str, got {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'"


def datetime_literal(value: datetime) -> str:
    """An unquoted UTC datetime literal, e.g. ``2024-05-01T00:00:00Z``."""
    if value.tzinfo is None:
        raise ValueError("OData datetime literals need an aware datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
