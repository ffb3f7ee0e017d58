"""Building SOQL safely: every value is escaped, every name is checked.

String literals escape backslash and quote (and control characters) with a backslash;
in ``LIKE`` patterns the wildcards ``%`` and ``_`` in a value are escaped too, so a
customer called ``100% Pure_Water`` matches literally.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
OPERATORS = frozenset({"=", "!=", "<", "<=", ">", ">=", "IN", "NOT IN", "LIKE"})
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f", '"': '\\"'}


def name(identifier: str) -> str:
    """A field, relationship path (``Account.Name``) or object name; anything else is refused."""
    if not isinstance(identifier, str) or not NAME.fullmatch(identifier):
        raise ValueError(f"not a SOQL name: {identifier!r}")
    return identifier


def string_literal(value: str, *, like: bool = False) -> str:
    escaped = "".join(_ESCAPES.get(ch, ch) for ch in value)
    if like:
        escaped = escaped.replace("%", "\\%").replace("_", "\\_")
    return f"'{escaped}'"


def literal(value: object) -> str:
    """Any Python value as a SOQL literal (datetimes in UTC, unquoted)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | Decimal) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("SOQL datetime literals need an aware datetime")
        utc = value.astimezone(UTC)
        # Millisecond precision, as SystemModstamp has: a watermark must not round down to the second.
        millis = f".{utc.microsecond // 1000:03d}" if utc.microsecond else ""
        return utc.strftime("%Y-%m-%dT%H:%M:%S") + millis + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return string_literal(value)
    raise TypeError(f"no SOQL literal for {value!r}")


@dataclass(frozen=True)
class Condition:
    """``field op value``. For ``LIKE``, ``value`` is matched literally unless ``pattern`` is
    given: ``pattern`` uses ``*`` as the only wildcard (escaped value parts, ``%`` for ``*``)."""

    field: str
    op: str
    value: object = None

    def render(self) -> str:
        op = self.op.upper()
        if op not in OPERATORS:
            raise ValueError(f"unsupported SOQL operator {self.op!r}")
        if op in ("IN", "NOT IN"):
            if isinstance(self.value, str | bytes) or not isinstance(self.value, Iterable):
                raise TypeError(f"{op} needs a collection of values")
            values = list(self.value)
            if not values:
                raise ValueError(f"{op} needs at least one value")
            return f"{name(self.field)} {op} ({', '.join(literal(v) for v in values)})"
        if op == "LIKE":
            if not isinstance(self.value, str):
                raise TypeError("LIKE needs a string")
            return f"{name(self.field)} LIKE {string_literal(self.value, like=True)}"
        return f"{name(self.field)} {op} {literal(self.value)}"


def like_pattern(field: str, *, starts_with: str = "", contains: str = "", ends_with: str = "") -> str:
    """A ``LIKE`` with wildcards only between the given parts, each part escaped."""
    segments = [string_literal(starts_with, like=True)[1:-1]]
    if contains:
        segments.append(string_literal(contains, like=True)[1:-1])
    segments.append(string_literal(ends_with, like=True)[1:-1])
    return f"{name(field)} LIKE '{'%'.join(segments)}'"


def select(
    sobject: str,
    fields: Sequence[str],
    where: Sequence[Condition | str] = (),
    *,
    order_by: Sequence[str] = (),
    limit: int | None = None,
) -> str:
    """``SELECT ... FROM ... WHERE a AND b ORDER BY ... LIMIT n``. A ``str`` in ``where`` must come
    from :func:`like_pattern` or another builder here, never from input."""
    if not fields:
        raise ValueError("select needs at least one field")
    # Every name passes name() and every value goes through literal(): nothing is spliced raw.
    soql = f"SELECT {', '.join(name(f) for f in fields)} FROM {name(sobject)}"  # noqa: S608
    clauses = [c.render() if isinstance(c, Condition) else f"({c})" for c in where]
    if clauses:
        soql += " WHERE " + " AND ".join(clauses)
    if order_by:
        rendered = []
        for item in order_by:
            field, _, direction = item.partition(" ")
            if direction.upper() not in ("", "ASC", "DESC"):
                raise ValueError(f"bad ORDER BY direction in {item!r}")
            rendered.append(f"{name(field)} {direction.upper()}".strip())
        soql += " ORDER BY " + ", ".join(rendered)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive int")
        soql += f" LIMIT {limit}"
    return soql
