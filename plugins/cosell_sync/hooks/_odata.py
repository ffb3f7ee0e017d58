"""Building OData ``$filter`` expressions safely (Partner Center and Dataverse)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote as urlquote


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


def with_query(url: str, params: Mapping[str, str]) -> str:
    """Append OData query options (``$filter`` ...), percent-encoding the values: spaces as
    %20, ``&``/``#``/``+`` escaped, quotes and parentheses kept readable."""
    if not params:
        return url
    return url + "?" + "&".join(f"{k}={urlquote(v, safe=chr(39) + ',/:()')}" for k, v in params.items())
