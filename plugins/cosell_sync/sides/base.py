"""The contract between the sync stages and each system (Partner Center, a CRM).

Stages, as in dlt: **extract** (raw records from a system, through its hook) ->
**normalize** (:mod:`cosell_sync.engine.normalize`) -> **plan**
(:mod:`cosell_sync.engine.plan`) -> **load** (batched writes back through the hooks) ->
**commit** (:class:`cosell_sync.state.StateStore`). A system is a small class with clear
override points, in the manner of the Singer SDK's streams and sinks.

Every write reports one :class:`WriteResult` per record, so a rejected record never
hides the others: it goes to the dead letter with the system's own error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

import pandas as pd

from cosell_sync.errors import AuthenticationError, ConfigurationError, CosellError

Action = Literal["create", "update", "win", "lose", "link"]
AUDIT_MAX_CHARS = 4000  # the CRM audit field keeps the newest entries within this budget


def missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT: a frame cell with nothing in it."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def plain(value: Any) -> Any:
    """A frame cell as plain JSON-able Python: missing -> None, numpy scalars unwrapped,
    dates as ISO text, Decimal as float."""
    if missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return value
        if missing(value):
            return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def same_value(a: Any, b: Any) -> bool:
    """Whether two canonical values are the same (values that went through the staging area
    as JSON: 1000 and 1000.0 are the same)."""
    a, b = plain(a), plain(b)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def fails_the_task(exc: BaseException) -> bool:
    """Errors that are not about one record: a refused token or session (401), a broken
    connection setting. A 403 on one referral (a Referral User outside its team) is about
    that referral; anything else that is not a cosell error is a bug. Both fail the task."""
    if isinstance(exc, ConfigurationError):
        return True
    if isinstance(exc, AuthenticationError):
        return exc.status != 403
    return not isinstance(exc, CosellError)


def match_key(name: Any, postal_code: Any) -> str:
    """How an account is matched: name + postal code, case- and space-insensitive."""

    def norm(text: Any) -> str:
        return "" if missing(text) else re.sub(r"\s+", "", str(text)).lower()

    return f"{norm(name)}|{norm(postal_code)}"


@dataclass
class WriteResult:
    """The outcome of writing one record."""

    key: str  # the record the write is about: the referral id (writes to the CRM are keyed by it too) or CRM id
    action: Action
    ok: bool
    referral_id: str | None = None
    crm_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # canonical field -> value written
    error: str | None = None
    error_code: str | None = None
    etag: str | None = None
    # Canonical fields planned for this record that were *not* written because the target
    # changed since it was read (a re-merge after 412, or a Salesforce record modified during
    # the run: ``changed_during_run``). They keep their old base and are planned again.
    deferred: list[str] = field(default_factory=list)
    # A create that found the record made already (by an earlier try, or a run that died before
    # its commit) and linked it instead of writing: no write was made.
    adopted: bool = False
    # Other records found for the same counterpart (duplicates made before; the oldest is kept).
    duplicates: list[str] = field(default_factory=list)
    # Partner Center: this write also asked Microsoft to co-sell (a request referral was POSTed).
    asked_microsoft: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def results_frame(results: list[WriteResult]) -> pd.DataFrame:
    columns = [
        "key",
        "action",
        "ok",
        "referral_id",
        "crm_id",
        "fields",
        "error",
        "error_code",
        "etag",
        "deferred",
        "adopted",
        "duplicates",
        "asked_microsoft",
    ]
    # Column by column, from the attributes (dataclasses.asdict deep-copies every result: the
    # largest part of a Partner Center load's own CPU); the containers are copied one level.
    if not results:
        return pd.DataFrame([], columns=columns)
    data: dict[str, list[Any]] = {name: [getattr(r, name) for r in results] for name in columns}
    for name in ("fields", "deferred", "duplicates"):
        data[name] = [type(value)(value) for value in data[name]]
    return pd.DataFrame(data, columns=columns)


@dataclass(frozen=True)
class RunContext:
    """What a load needs to know about the run it belongs to."""

    dag_id: str
    run_id: str
    dry_run: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    referral_url_template: str = "https://partner.microsoft.com/dashboard/referrals/v2/leads/{referral_id}"

    def referral_link(self, referral_id: str) -> str:
        return self.referral_url_template.format(referral_id=referral_id)


def audit_line(ctx: RunContext, direction: str, fields: dict[str, Any]) -> str:
    """One line of the CRM audit field: when, which run, which way, what changed."""
    changed = json.dumps(fields, default=str, separators=(",", ":"), ensure_ascii=False)
    return f"{ctx.now:%Y-%m-%dT%H:%M:%SZ} {ctx.run_id} {direction} {changed}"


def prepend_audit(existing: str | None, line: str, limit: int = AUDIT_MAX_CHARS) -> str:
    """Newest first, bounded: older lines fall off the end."""
    text = line if not existing else f"{line}\n{existing}"
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind("\n")] if "\n" in cut else cut
