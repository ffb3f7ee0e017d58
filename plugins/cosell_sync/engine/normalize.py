"""Referrals and CRM records -> canonical deal frames (and canonical values -> side values).

Work is done column by column over whole frames. A value that cannot be normalized is
not guessed at: the record goes to the ``errors`` frame (record key, side, field, value,
message) and is left out of the plan, while every other record carries on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, SyncMapping

_INDEX = re.compile(r"^(?P<key>[^\[\]]+)(?:\[(?P<index>\d*)\])?$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ERROR_COLUMNS = ["key", "side", "field", "value", "message"]
PC_META = ["referral_id", "crm_ref", "etag", "updated_at", "status", "substatus", "direction"]
CRM_META = ["crm_id", "referral_ref", "etag", "modified_at", "sync_flag", "closed"]


def compile_path(path: str) -> Callable[[Any], Any]:
    """A getter for ``a.b[0].c``, ``a.b[].c`` (a list of every element's c) or ``x/y`` (joined)."""
    if "/" in path:
        getters = [compile_path(p) for p in path.split("/")]

        def joined(doc: Any) -> Any:
            parts = [g(doc) for g in getters]
            return None if all(p is None for p in parts) else "/".join("" if p is None else str(p) for p in parts)

        return joined
    steps: list[tuple[str, str | None]] = []
    for segment in path.split("."):
        match = _INDEX.match(segment)
        if not match:
            raise ValueError(f"bad path segment {segment!r} in {path!r}")
        steps.append((match.group("key"), match.group("index")))

    def get(doc: Any, start: int = 0) -> Any:
        cur = doc
        for i in range(start, len(steps)):
            key, index = steps[i]
            if not isinstance(cur, Mapping):
                return None
            cur = cur.get(key)
            if index is None:
                continue
            if not isinstance(cur, list):
                return None
            if index == "":  # every element
                return [v for v in (get(item, i + 1) for item in cur) if v is not None]
            cur = cur[int(index)] if int(index) < len(cur) else None
        return cur

    return get


def _enum_key(value: Any) -> str | None:
    """Enum values compare as text; 1 and 1.0 (Dataverse choices) both read as "1"."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


@dataclass(frozen=True)
class Normalized:
    frame: pd.DataFrame  # one row per good record
    errors: pd.DataFrame  # one row per bad value (ERROR_COLUMNS)


def _normalize_column(raw: pd.Series, fm: FieldMapping, side: str) -> tuple[pd.Series, pd.Series]:
    """(canonical values, error message or None) for one field over all records."""
    present = raw.map(lambda v: not _is_missing(v) and v != "" and v != [])
    values = raw.where(present, None).astype(object)
    errors = pd.Series(None, index=raw.index, dtype=object)

    def bad(mask: pd.Series, message: str) -> None:
        errors.loc[mask & errors.isna()] = message

    ftype = fm.type
    if ftype == "string":
        bad(present & ~raw.map(lambda v: isinstance(v, str)), "must be text")
        values = values.map(lambda v: v.strip() or None if isinstance(v, str) else None)
    elif ftype == "decimal":
        numeric = pd.to_numeric(values.map(lambda v: None if isinstance(v, bool) else v), errors="coerce")
        bad(present & numeric.isna(), "must be a number")
        bad(present & (numeric < 0), "must not be negative")
        values = numeric.round(2).astype(object).where(numeric.notna(), None)
    elif ftype == "date":
        text = values.map(lambda v: v if isinstance(v, str) else None)
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        bad(present & parsed.isna(), "must be an ISO 8601 date")
        values = parsed.dt.strftime("%Y-%m-%d").astype(object).where(parsed.notna(), None)
    elif ftype in ("currency", "country"):
        pattern, what = (
            (_CURRENCY, "an ISO 4217 currency code")
            if ftype == "currency"
            else (_COUNTRY, "an ISO 3166 alpha-2 country code")
        )
        upper = values.map(lambda v: v.strip().upper() if isinstance(v, str) else None)
        bad(present & ~upper.map(lambda v: isinstance(v, str) and bool(pattern.match(v))), f"must be {what}")
        values = upper
    elif ftype == "email":
        lower = values.map(lambda v: v.strip().lower() if isinstance(v, str) else None)
        bad(present & ~lower.map(lambda v: isinstance(v, str) and bool(_EMAIL.match(v))), "must be an email address")
        values = lower
    elif ftype == "id_list":

        def ids(v: Any) -> str | None:
            items = v if isinstance(v, list) else str(v).split(";") if v is not None else []
            cleaned = sorted({str(i).strip() for i in items if str(i).strip()})
            return ";".join(cleaned) or None

        values = values.map(ids)
    elif ftype == "enum":
        vmap = fm.referral_values if side == "referral" else fm.crm_values
        assert vmap is not None
        keys = values.map(_enum_key)
        mapped = keys.map(vmap.read)
        bad(present & mapped.isna(), f"has no mapping (allowed: {', '.join(sorted(vmap.read))})")
        values = mapped
    values = values.astype(object).where(values.notna(), None)  # one missing marker: None, never NaN
    if fm.blank == "keep":  # no value is no opinion: the field keeps its last synced value
        values = values.where(values.notna(), KEEP)
    return values, errors


def _normalize(
    docs: Sequence[Mapping[str, Any]],
    mapping: SyncMapping,
    side: str,
    key_getter: Callable[[Any], Any],
    meta: Mapping[str, Callable[[Any], Any]],
) -> Normalized:
    keys = [key_getter(d) for d in docs]
    frame = pd.DataFrame({name: [get(d) for d in docs] for name, get in meta.items()})
    error_rows: list[pd.DataFrame] = []
    missing_key = pd.Series([k is None for k in keys], dtype=bool)
    if missing_key.any():
        error_rows.append(
            pd.DataFrame(
                {"key": "<unknown>", "side": side, "field": "id", "value": None, "message": "the record has no id"},
                index=missing_key[missing_key].index,
            )
        )
    for fm in mapping.fields.values():
        getter = compile_path(fm.referral if side == "referral" else fm.crm)
        raw = pd.Series([getter(d) for d in docs], dtype=object)
        values, errors = _normalize_column(raw, fm, side)
        frame[fm.name] = values
        failed = errors.notna()
        if failed.any():
            shown = raw[failed].map(lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 63 else repr(v))
            error_rows.append(
                pd.DataFrame(
                    {
                        "key": pd.Series(keys, dtype=object)[failed],
                        "side": side,
                        "field": fm.referral if side == "referral" else fm.crm,
                        "value": shown,
                        "message": errors[failed],
                    }
                )
            )
    errors = pd.concat(error_rows, ignore_index=False) if error_rows else pd.DataFrame(columns=ERROR_COLUMNS)
    bad_index = errors.index.unique()
    good = frame.drop(index=bad_index).reset_index(drop=True)
    return Normalized(good, errors.reset_index(drop=True)[ERROR_COLUMNS])


def referrals_frame(docs: Sequence[Mapping[str, Any]], mapping: SyncMapping) -> Normalized:
    """Partner Center referral documents -> canonical rows keyed by ``referral_id``."""
    meta = {
        "referral_id": compile_path("id"),
        "crm_ref": compile_path("externalReferenceId"),
        "etag": compile_path("eTag"),
        "updated_at": compile_path("updatedDateTime"),
        "status": compile_path("status"),
        "substatus": compile_path("substatus"),
        "direction": compile_path("direction"),
    }
    result = _normalize(docs, mapping, "referral", meta["referral_id"], meta)
    frame = result.frame
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True, errors="coerce", format="ISO8601")
    return Normalized(frame, result.errors)


def crm_frame(records: Sequence[Mapping[str, Any]], mapping: SyncMapping, id_field: str) -> Normalized:
    """CRM opportunity records (with ``Account``/``Contact`` or ``account``/``contact`` nested
    by the extract step) -> canonical rows keyed by ``crm_id``."""
    r = mapping.records
    closed_getter = compile_path(r["closed_field"])
    meta = {
        "crm_id": compile_path(id_field),
        "referral_ref": compile_path(r["link_field"]),
        "etag": compile_path("@odata.etag"),
        "modified_at": compile_path(r["modified_field"]),
        "sync_flag": compile_path(r["sync_flag_field"]),
        "closed": lambda d: bool(closed_getter(d)) and closed_getter(d) not in (0, "0", False),
    }
    result = _normalize(records, mapping, "crm", meta["crm_id"], meta)
    frame = result.frame
    frame["modified_at"] = pd.to_datetime(frame["modified_at"], utc=True, errors="coerce", format="ISO8601")
    frame["sync_flag"] = frame["sync_flag"].map(lambda v: v is True or v == "true" or v == 1)
    frame["referral_ref"] = frame["referral_ref"].map(lambda v: v or None)
    return Normalized(frame, result.errors)


def side_value(fm: FieldMapping, side: str, canonical: Any, held: Any = None) -> Any:
    """A canonical value as the side stores it (enums through the ``write`` map, or its
    ``write_from`` entry for what the record ``held`` until now)."""
    if canonical is None or canonical == KEEP:
        return None
    if fm.type == "enum":
        vmap = fm.referral_values if side == "referral" else fm.crm_values
        assert vmap is not None
        return vmap.write_for(str(canonical), None if held is None else str(held))
    return canonical


def empty_errors() -> pd.DataFrame:
    return pd.DataFrame(columns=ERROR_COLUMNS)


def concat_errors(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else empty_errors()
