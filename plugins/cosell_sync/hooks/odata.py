"""Building OData ``$filter`` expressions safely (Partner Center and Dataverse)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from urllib.parse import quote as urlquote
from uuid import UUID

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


def quote(value: str) -> str:
    """A string literal: single quotes, with embedded quotes doubled. Never splice raw values."""
    if not isinstance(value, str):
        raise TypeError(f"OData string literal expected a str, got {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'"


def literal(value: object) -> str:
    """Any Python value as an OData literal: strings quoted (quotes doubled), GUIDs and
    datetimes unquoted, booleans and null as keywords. Rejects anything else."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"OData has no literal for {value!r}")
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return datetime_literal(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"no OData literal for {type(value).__name__}")


def eq(column: str, value: object) -> str:
    """``column eq <literal>``; the column name itself must be a plain identifier."""
    if not IDENTIFIER.fullmatch(column):
        raise ValueError(f"not a column name: {column!r}")
    return f"{column} eq {literal(value)}"


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
