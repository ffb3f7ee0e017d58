"""The audit log: one row per field a run changed, conflict it resolved or record it failed.

Append-only, written in one bulk insert (an ``executemany``) inside the run's commit, so a
run's audit lands together with its links or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import UsesDatabase
from cosell_sync.state.schema import audit_t
from cosell_sync.state.values import ACTIONS, CRMS, DIRECTIONS, check, missing, opt_str, req_str

AUDIT_COLUMNS = [
    "id",
    "at",
    "dag_id",
    "run_id",
    "crm",
    "direction",
    "referral_id",
    "crm_id",
    "action",
    "field",
    "old_value",
    "new_value",
    "detail",
]


def prepare_audit(
    entries: pd.DataFrame | Sequence[Mapping[str, Any]] | None, defaults: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows to insert, checked; ``defaults`` fill what an entry leaves out (its run's ids)."""
    now = values.now()
    rows: list[dict[str, Any]] = []
    for i, entry in enumerate(values.records(entries)):
        if defaults:
            entry = {**defaults, **{k: v for k, v in entry.items() if not missing(v)}}
        at = entry.get("at")
        detail = entry.get("detail")
        if not missing(detail) and not isinstance(detail, str):
            detail = values.canonical_json(detail) if isinstance(detail, Mapping | list | tuple) else str(detail)
        rows.append(
            {
                "at": now if missing(at) else values.as_utc(at, f"audit entry {i} 'at'"),
                "dag_id": req_str(entry.get("dag_id"), f"audit entry {i} dag_id"),
                "run_id": req_str(entry.get("run_id"), f"audit entry {i} run_id"),
                "crm": check(req_str(entry.get("crm"), f"audit entry {i} crm"), CRMS, f"audit entry {i} crm"),
                "direction": check(
                    req_str(entry.get("direction"), f"audit entry {i} direction"),
                    DIRECTIONS,
                    f"audit entry {i} direction",
                ),
                "referral_id": opt_str(entry.get("referral_id")),
                "crm_id": opt_str(entry.get("crm_id")),
                "action": check(
                    req_str(entry.get("action"), f"audit entry {i} action"), ACTIONS, f"audit entry {i} action"
                ),
                "field": opt_str(entry.get("field")),
                "old_value": values.json_text(entry.get("old_value")),
                "new_value": values.json_text(entry.get("new_value")),
                "detail": opt_str(detail),
            }
        )
    return rows


def write_audit(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert prepared rows inside the caller's transaction (one executemany)."""
    if rows:
        conn.execute(audit_t.insert(), rows)
    return len(rows)


class AuditLog(UsesDatabase):
    """The audit part of :class:`~cosell_sync.state.StateStore`."""

    def append_audit(self, entries: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Append audit entries in one bulk insert; returns the number of rows."""
        rows = prepare_audit(entries)
        return self._db.run(lambda conn: write_audit(conn, rows)) if rows else 0

    def audit(
        self,
        *,
        crm: str | None = None,
        referral_id: str | None = None,
        run_id: str | None = None,
        action: str | None = None,
        limit: int | None = 1000,
    ) -> pd.DataFrame:
        """Audit entries, newest first, with old/new values decoded from JSON."""
        query = sa.select(*[audit_t.c[name] for name in AUDIT_COLUMNS])
        for column, value in (("crm", crm), ("referral_id", referral_id), ("run_id", run_id), ("action", action)):
            if value is not None:
                query = query.where(audit_t.c[column] == value)
        query = query.order_by(audit_t.c.at.desc(), audit_t.c.id.desc())
        if limit is not None:
            query = query.limit(limit)

        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = []
            for r in conn.execute(query):
                row = dict(r._mapping)
                row["old_value"] = values.json_value(row["old_value"])
                row["new_value"] = values.json_value(row["new_value"])
                rows.append(row)
            return rows

        out = values.frame(self._db.read(work), AUDIT_COLUMNS, times=["at"])
        out["id"] = out["id"].astype("int64")
        return out
