"""The state store's vocabularies and value helpers, shared by its table modules.

Timestamps are stored in UTC and always come back timezone-aware; JSON is stored as canonical
text, so dicts round-trip on any backend. Read frames keep text and JSON columns as ``object``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import pandas as pd

from cosell_sync import crms

T = TypeVar("T")

CRMS = frozenset(crms.NAMES)  # the registry's
SIDES = frozenset({"partner_center", "crm", "inbox", "full_sync"})
# "inbox": the newest webhook event signalled to a DAG; "full_sync": when a window sync (not a
# dry run, backfill or referral_ids run) last committed: the first one is the initial load
DIRECTIONS = frozenset({"pc_to_crm", "crm_to_pc"})
ACTIONS = frozenset({"create", "update", "conflict", "skip", "fail", "win", "lose", "deferred", "dismiss"})

IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit


def now() -> datetime:
    """The store's clock (tests replace it): every table module reads the time through here."""
    return datetime.now(UTC)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def hash_values(values: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``values`` (sorted keys, compact separators, ``default=str``)."""
    return hashlib.sha256(canonical_json(dict(values)).encode()).hexdigest()


def as_utc(value: Any, what: str) -> datetime:
    """An aware datetime in UTC; naive values are rejected."""
    if isinstance(value, pd.Timestamp):
        if value is pd.NaT:
            raise ValueError(f"{what} is missing (NaT)")
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got the naive datetime {value.isoformat()}")
    return value.astimezone(UTC)


def missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA (never true for containers)."""
    if value is None or value is pd.NaT or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def opt_str(value: Any) -> str | None:
    return None if missing(value) else str(value)


def req_str(value: Any, what: str) -> str:
    if missing(value) or str(value) == "":
        raise ValueError(f"{what} is required")
    return str(value)


def check(value: str, allowed: frozenset[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")
    return value


def ids(values: Iterable[Any]) -> list[str]:
    """The ids as strings, without duplicates, in their first order."""
    return list(dict.fromkeys(str(v) for v in values if not missing(v)))


def chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def records(data: pd.DataFrame | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if data is None:
        return []
    if isinstance(data, pd.DataFrame):
        return data.to_dict("records") if len(data) else []
    return [dict(row) for row in data]


def utc_column(values: Sequence[Any]) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values), utc=True), dtype="datetime64[us, UTC]")


def frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, times: Sequence[str] = ()) -> pd.DataFrame:
    """A frame with exactly ``columns``; text and JSON columns stay ``object`` (None kept as None)."""
    out = pd.DataFrame([[row[c] for c in columns] for row in rows], columns=list(columns), dtype=object)
    for column in times:
        out[column] = utc_column(out[column].tolist())
    return out


def json_text(value: Any) -> str | None:
    return None if missing(value) else canonical_json(value)


def json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text)
