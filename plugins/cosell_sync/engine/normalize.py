"""Referrals and CRM records -> canonical deal frames (and canonical values -> side values).

Work is done column by column over whole frames. A value that cannot be normalized is
not guessed at: the record goes to the ``errors`` frame (record key, side, field, value,
message) and is left out of the plan, while every other record carries on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pandas as pd
from babel import Locale
from babel.numbers import list_currencies

from cosell_sync import crms
from cosell_sync.engine.mapping import KEEP, FieldMapping, SyncMapping

_INDEX = re.compile(r"^(?P<key>[^\[\]]+)(?:\[(?P<index>\d*)\])?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ERROR_COLUMNS = ["key", "side", "field", "value", "message"]
PC_META = ["referral_id", "crm_ref", "etag", "updated_at", "status", "substatus", "direction"]
CRM_META = ["crm_id", "referral_ref", "etag", "modified_at", "sync_flag", "closed"]
# The largest amount each CRM stores: a Salesforce currency field holds 18 digits, 2 of them
# decimals (below 1e16); a Dataverse money column at most 922,337,203,685,477.
MONEY_LIMITS = {
    "salesforce": (math.nextafter(1e16, 0), "less than 10,000,000,000,000,000 (18 digits, 2 of them decimals)"),
    "dynamics365": (922_337_203_685_477.0, "at most 922,337,203,685,477"),
}
# The objects every referral has: null (not just absent) is a broken document, not "no values".
REFERRAL_OBJECTS = ("details", "customerProfile")
# C0 and C1 controls and DEL; TAB is allowed everywhere, CR and LF in multi-line fields only.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class ShapeError:
    """What a strict getter returns when the document's shape is wrong at some step of a path
    (an object where a list is expected, text where an object is, a null required object)."""

    message: str
    value: Any

    def __repr__(self) -> str:
        return repr(self.value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def compile_path(path: str, *, strict: bool = False, objects: Sequence[str] = ()) -> Callable[[Any], Any]:
    """A getter for ``a.b[0].c``, ``a.b[].c`` (a list of every element's c) or ``x/y`` (joined).

    A step that meets the wrong shape reads as None; ``strict`` makes it a :class:`ShapeError`
    naming the path instead, and so is a null at any of the (dotted) ``objects`` paths."""
    if "/" in path:
        getters = [compile_path(p, strict=strict, objects=objects) for p in path.split("/")]

        def joined(doc: Any) -> Any:
            parts = [g(doc) for g in getters]
            for part in parts:
                if isinstance(part, ShapeError):
                    return part
            return None if all(p is None for p in parts) else "/".join("" if p is None else str(p) for p in parts)

        return joined
    steps: list[tuple[str, str | None]] = []
    for segment in path.split("."):
        match = _INDEX.match(segment)
        if not match:
            raise ValueError(f"bad path segment {segment!r} in {path!r}")
        steps.append((match.group("key"), match.group("index")))

    def get(doc: Any, start: int = 0, trail: str = "") -> Any:
        cur = doc
        for i in range(start, len(steps)):
            key, index = steps[i]
            if type(cur) is not dict and not isinstance(cur, Mapping):  # (JSON objects are dicts: no ABC check)
                if strict and cur is not None:
                    return ShapeError(f"{trail or 'the document'} must be an object, not {_kind(cur)}", cur)
                return None
            present = key in cur
            cur = cur.get(key)
            trail = f"{trail}.{key}" if trail else key
            if strict and cur is None and present and trail in objects:
                return ShapeError(f"{trail} must be an object, not null", None)
            if index is None:
                continue
            if not isinstance(cur, list):
                if strict and cur is not None:
                    return ShapeError(f"{trail} must be a list, not {_kind(cur)}", cur)
                return None
            if index == "":  # every element
                values = [get(item, i + 1, f"{trail}[{n}]") for n, item in enumerate(cur)]
                if strict:
                    for value in values:
                        if isinstance(value, ShapeError):
                            return value
                return [v for v in values if v is not None and not isinstance(v, ShapeError)]
            cur = cur[int(index)] if int(index) < len(cur) else None
            trail = f"{trail}[{index}]"
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
    """No value. An explicit NaN is a value (a bad one), not a missing one."""
    return value is None or (isinstance(value, str) and value == "") or (isinstance(value, list) and not value)


# Two-letter CLDR regions that are not countries of ISO 3166-1: the exceptionally reserved
# codes (AC, CP, CQ, DG, EA, EU, EZ, IC, TA, UN) and the private-use ones (QO, XA, XB, ZZ).
# XK stays: Kosovo has no ISO code, and CLDR and Microsoft both use XK for it.
NOT_COUNTRIES = frozenset({"AC", "CP", "CQ", "DG", "EA", "EU", "EZ", "IC", "TA", "UN", "QO", "XA", "XB", "ZZ"})


@cache
def iso_countries() -> frozenset[str]:
    """The ISO 3166-1 alpha-2 country codes (and XK), from the CLDR data Babel maintains."""
    regions = Locale("en").territories
    return frozenset(c for c in regions if len(c) == 2 and c.isalpha() and c not in NOT_COUNTRIES)


@cache
def iso_currencies() -> frozenset[str]:
    """The ISO 4217 codes, from the CLDR data Babel maintains."""
    return frozenset(list_currencies())


def _number(value: Any) -> float | None:
    """A number as a float (inf for one too large), None for something that is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


# The spellings a boolean field reads (text compared without case and surrounding blanks). JSON
# true/false, the 1/0 some CRMs and exports use (a Dataverse Two Options column's option values are
# 1 and 0), and their text forms; anything else is a bad value, never guessed at.
_BOOLEAN_TEXT = {"true": True, "false": False, "1": True, "0": False}


def as_boolean(value: Any) -> bool | None:
    """A boolean field's value as True/False; None for one that is not a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _BOOLEAN_TEXT.get(value.strip().lower())
    return None


def _control_problem(text: str, multiline: bool) -> str | None:
    found = _CONTROL.search(text)
    if found:
        return f"must not contain control character U+{ord(found.group()):04X}"
    if not multiline and _LINE_BREAK.search(text):
        return "must not contain a line break (CR or LF) in a single-line field"
    return None


@dataclass(frozen=True)
class Normalized:
    frame: pd.DataFrame  # one row per good record
    errors: pd.DataFrame  # one row per bad value (ERROR_COLUMNS)
    # One row per good record lacking a ``required:`` field (ERROR_COLUMNS): such a record syncs
    # with its counterpart, but must not create one (see :func:`incomplete_creates`).
    create_errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ERROR_COLUMNS))


def normalize_column(
    raw: pd.Series, fm: FieldMapping, side: str, crm: str | None = None
) -> tuple[pd.Series, pd.Series]:
    """(canonical values, error message or None) for one field over all records; ``crm`` (the
    mapping's CRM) bounds amounts by what that CRM stores."""
    errors = pd.Series(None, index=raw.index, dtype=object)
    shape = raw.map(lambda v: isinstance(v, ShapeError))
    if shape.any():
        errors.loc[shape] = raw[shape].map(lambda e: e.message)
        raw = raw.where(~shape, None)
    present = raw.map(lambda v: not _is_missing(v))
    values = raw.where(present, None).astype(object)

    def bad(mask: pd.Series, message: str | pd.Series) -> None:
        target = mask & errors.isna()
        errors.loc[target] = message if isinstance(message, str) else message[target]

    def text_ok(v: Any) -> str | None:
        items = v if isinstance(v, list) else [v]
        for item in items:
            if isinstance(item, str):
                problem = _control_problem(item.strip(), fm.multiline)
                if problem:
                    return problem
        return None

    if fm.type in ("string", "email", "id_list"):
        bad(present, values.map(text_ok))

    ftype = fm.type
    if ftype == "string":
        bad(present & ~raw.map(lambda v: isinstance(v, str)), "must be text")
        values = values.map(lambda v: v.strip() or None if isinstance(v, str) else None)
    elif ftype == "decimal":
        numbers = values.map(_number)
        bad(present & numbers.map(lambda v: v is None), "must be a number")
        finite = numbers.map(lambda v: v is not None and math.isfinite(v))
        bad(present & ~finite, values.map(lambda v: f"must be a finite number, not {v!r}"))
        numeric = pd.to_numeric(numbers.where(finite, None), errors="coerce").astype(float)
        bad(present & (numeric < 0), "must not be negative")
        if crm in MONEY_LIMITS:
            limit, what = MONEY_LIMITS[crm]
            bad(
                present & (numeric.round(2).abs() > limit),
                f"is out of range: {_store(crm)} stores amounts {what}",
            )
        values = numeric.round(2).astype(object).where(numeric.notna(), None)
    elif ftype == "date":
        text = values.map(lambda v: v if isinstance(v, str) else None)
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        bad(present & parsed.isna(), "must be an ISO 8601 date")
        values = parsed.dt.strftime("%Y-%m-%d").astype(object).where(parsed.notna(), None)
    elif ftype in ("currency", "country"):
        if ftype == "currency":
            codes = iso_currencies()
            valid: Callable[[Any], bool] = lambda v: isinstance(v, str) and v in codes  # noqa: E731
            what = "an ISO 4217 currency code"
        else:
            countries = iso_countries()
            valid = lambda v: isinstance(v, str) and v in countries  # noqa: E731
            what = "an ISO 3166 alpha-2 country code"
        upper = values.map(lambda v: v.strip().upper() if isinstance(v, str) else None)
        bad(present & ~upper.map(valid), f"must be {what}")
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
    elif ftype == "boolean":
        flags = values.map(as_boolean).astype(object)
        bad(present & flags.isna(), "must be true or false")
        values = flags
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


def _store(crm: str) -> str:
    """The system storing ``crm``'s records, as messages name it (the name itself if unknown)."""
    known = crms.CRMS.get(crm)
    return known.store if known else crm


def _length_problems(values: pd.Series, fm: FieldMapping, side: str, target: str, crm_name: str) -> pd.Series:
    """Per record, why its text is too long for where it goes (or None): the target's limit when
    the field flows there, and its own side's limit (a value that side cannot hold is corrupt)."""
    own = "partner_center" if side == "referral" else "crm"
    flows = not fm.synced or fm.direction in ("both", "pc_to_crm" if side == "referral" else "crm_to_pc")
    limits = []
    names = {"crm": crm_name, "partner_center": "Partner Center"}
    if target in fm.max_length and flows:
        limits.append((fm.max_length[target], names[target]))
    if own in fm.max_length:
        limits.append((fm.max_length[own], names[own]))
    if not limits:
        return pd.Series(None, index=values.index, dtype=object)
    limit, where = min(limits)

    def problem(v: Any) -> str | None:
        if isinstance(v, str) and v != KEEP and len(v) > limit:
            return f"is too long: {len(v):,} characters, {where} stores at most {limit:,}"
        return None

    return values.map(problem).astype(object)


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
    create_rows: list[pd.DataFrame] = []
    target = "crm" if side == "referral" else "partner_center"
    target_name = _store(mapping.crm) if target == "crm" else "Partner Center"
    objects = REFERRAL_OBJECTS if side == "referral" else ()
    for fm in mapping.fields.values():
        getter = compile_path(fm.referral if side == "referral" else fm.crm, strict=True, objects=objects)
        raw = pd.Series([getter(d) for d in docs], dtype=object)
        values, errors = normalize_column(raw, fm, side, mapping.crm)
        frame[fm.name] = values
        field_name = fm.referral if side == "referral" else fm.crm
        too_long = _length_problems(values, fm, side, target, _store(mapping.crm))
        errors = errors.where(errors.notna(), too_long)
        if target in fm.required:
            lacking = values.map(lambda v: v is None or v == KEEP) & errors.isna()
            if lacking.any():
                create_rows.append(
                    pd.DataFrame(
                        {
                            "key": pd.Series(keys, dtype=object)[lacking],
                            "side": side,
                            "field": field_name,
                            "value": None,
                            "message": f"is required to create a {target_name} record",
                        }
                    )
                )
        failed = errors.notna()
        if failed.any():
            shown = raw[failed].map(lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 63 else repr(v))
            error_rows.append(
                pd.DataFrame(
                    {
                        "key": pd.Series(keys, dtype=object)[failed],
                        "side": side,
                        "field": field_name,
                        "value": shown,
                        "message": errors[failed],
                    }
                )
            )
    errors = pd.concat(error_rows, ignore_index=False) if error_rows else pd.DataFrame(columns=ERROR_COLUMNS)
    bad_index = errors.index.unique()
    good = frame.drop(index=bad_index).reset_index(drop=True)
    create_errors = pd.concat(create_rows, ignore_index=False) if create_rows else pd.DataFrame(columns=ERROR_COLUMNS)
    create_errors = create_errors.drop(index=[i for i in bad_index if i in create_errors.index])
    return Normalized(good, errors.reset_index(drop=True)[ERROR_COLUMNS], create_errors.reset_index(drop=True))


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
    return Normalized(frame, result.errors, result.create_errors)


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
    return Normalized(frame, result.errors, result.create_errors)


def incomplete_creates(
    creates: pd.DataFrame, key: str, create_errors: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Planned creates (``key``: ``referral_id`` or ``crm_id``) split by the ``required:`` fields:
    (the creates that have them all, the error rows of those that do not). A record that lacks
    one still syncs with a counterpart it already has; it only must not create one."""
    if not len(create_errors) or not len(creates):
        return creates, empty_errors()
    lacking = {str(k).casefold() for k in create_errors["key"]}
    blocked = creates[key].map(lambda k: str(k).casefold() in lacking)
    planned = {str(k).casefold() for k in creates.loc[blocked, key]}
    rows = create_errors[create_errors["key"].map(lambda k: str(k).casefold() in planned)]
    return creates[~blocked].reset_index(drop=True), rows.reset_index(drop=True)[ERROR_COLUMNS]


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
