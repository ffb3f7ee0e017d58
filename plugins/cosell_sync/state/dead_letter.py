"""The dead letter: rows a run could not write, per CRM, direction and record, with their attempts.

A row seen again gets one more attempt, counted in SQL (``attempts = attempts + 1`` in the
upsert's ``DO UPDATE``), so two runs failing the same record never lose a count; its
``first_seen`` stays. A row with ``attempts >= max_attempts`` is exhausted: it is no longer
retried, but stays visible until it is cleared (its record succeeded since).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import Database, UsesDatabase
from cosell_sync.state.schema import dead_letter_t
from cosell_sync.state.values import CRMS, DIRECTIONS, check, chunks, missing, opt_str, req_str

MAX_ERROR_CHARS = 4000
FAILURE_COLUMNS = ["record_key", "attempts", "first_seen", "exhausted"]
RETRYABLE_COLUMNS = ["record_key", "payload", "attempts", "first_seen", "last_seen", "last_error", "error_code"]
DEAD_LETTER_COLUMNS = [
    "crm",
    "direction",
    "record_key",
    "payload",
    "attempts",
    "first_seen",
    "last_seen",
    "last_error",
    "error_code",
    "last_run_id",
    "exhausted",
]


def prepare_failures(
    crm: str, direction: str, failures: Sequence[Mapping[str, Any]] | pd.DataFrame, run_id: str
) -> list[dict[str, Any]]:
    """The rows to upsert, checked; a key listed twice counts once (the last error wins)."""
    check(crm, CRMS, "crm")
    check(direction, DIRECTIONS, "direction")
    now = values.now()
    by_key: dict[str, dict[str, Any]] = {}
    for i, failure in enumerate(values.records(failures)):
        key = req_str(failure.get("record_key"), f"failure {i} record_key")
        payload = failure.get("payload")
        payload = {} if missing(payload) else payload
        if not isinstance(payload, Mapping):
            raise ValueError(f"payload of failure {key!r} must be a dict, not {type(payload).__name__}")
        error = "" if missing(failure.get("error")) else str(failure.get("error"))
        by_key[key] = {
            "crm": crm,
            "direction": direction,
            "record_key": key,
            "payload": dict(payload),
            "attempts": 1,
            "first_seen": now,
            "last_seen": now,
            "last_error": error[:MAX_ERROR_CHARS],
            "error_code": opt_str(failure.get("error_code")),
            "last_run_id": run_id,
        }
    return list(by_key.values())


def write_failures(
    db: Database, conn: Connection, crm: str, direction: str, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Upsert prepared rows inside the caller's transaction; per row (in order) its record_key,
    attempts and first_seen as stored now."""
    if not rows:
        return []
    t = dead_letter_t
    stmt = db.insert(t)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.crm, t.c.direction, t.c.record_key],
        set_={
            "attempts": t.c.attempts + 1,
            "payload": stmt.excluded.payload,
            "last_seen": stmt.excluded.last_seen,
            "last_error": stmt.excluded.last_error,
            "error_code": stmt.excluded.error_code,
            "last_run_id": stmt.excluded.last_run_id,
        },
    )
    conn.execute(stmt, rows)
    keys = [row["record_key"] for row in rows]
    found: dict[str, dict[str, Any]] = {}
    query = sa.select(t.c.record_key, t.c.attempts, t.c.first_seen).where(t.c.crm == crm, t.c.direction == direction)
    for chunk in chunks(keys):
        for r in conn.execute(query.where(t.c.record_key.in_(chunk))):
            found[r.record_key] = dict(r._mapping)
    return [found[k] for k in keys]


def failures_frame(rows: list[dict[str, Any]], max_attempts: int) -> pd.DataFrame:
    """record_key, attempts, first_seen and exhausted (attempts >= max_attempts)."""
    for row in rows:
        row["exhausted"] = row["attempts"] >= max_attempts
    out = values.frame(rows, FAILURE_COLUMNS, times=["first_seen"])
    return out.astype({"attempts": "int64", "exhausted": bool})


def delete_failures(conn: Connection, crm: str, direction: str, keys: list[str]) -> int:
    """Remove failures inside the caller's transaction; the rows removed."""
    deleted = 0
    t = dead_letter_t
    for chunk in chunks(keys):
        result = conn.execute(t.delete().where(t.c.crm == crm, t.c.direction == direction, t.c.record_key.in_(chunk)))
        deleted += result.rowcount
    return deleted


def _with_exhausted(db: Database, query: sa.Select, max_attempts: int) -> list[dict[str, Any]]:
    rows = [dict(r._mapping) for r in db.read(lambda conn: list(conn.execute(query)))]
    for row in rows:
        row["exhausted"] = row["attempts"] >= max_attempts
    return rows


class DeadLetter(UsesDatabase):
    """The dead-letter part of :class:`~cosell_sync.state.StateStore`."""

    def record_failures(
        self,
        crm: str,
        direction: str,
        failures: Sequence[Mapping[str, Any]] | pd.DataFrame,
        run_id: str,
    ) -> pd.DataFrame:
        """Record rejected rows; a row seen before gets one more attempt (first_seen kept).

        Returns record_key, attempts, first_seen and exhausted (attempts >= max_attempts).
        A key listed twice in one call counts as one attempt (the last error wins).
        """
        rows = prepare_failures(crm, direction, failures, run_id)
        result = self._db.run(lambda conn: write_failures(self._db, conn, crm, direction, rows)) if rows else []
        return failures_frame(result, self.max_attempts)

    def clear_failures(self, crm: str, direction: str, record_keys: Iterable[str]) -> int:
        """Forget failures whose record has since succeeded; returns the rows removed."""
        check(crm, CRMS, "crm")
        check(direction, DIRECTIONS, "direction")
        keys = values.ids(record_keys)
        return self._db.run(lambda conn: delete_failures(conn, crm, direction, keys)) if keys else 0

    def retryable_failures(self, crm: str, direction: str) -> pd.DataFrame:
        """Failures still worth retrying (attempts < max_attempts), oldest first."""
        check(crm, CRMS, "crm")
        check(direction, DIRECTIONS, "direction")
        t = dead_letter_t
        query = (
            sa.select(*[t.c[name] for name in RETRYABLE_COLUMNS])
            .where(t.c.crm == crm, t.c.direction == direction, t.c.attempts < self.max_attempts)
            .order_by(t.c.first_seen, self._db.by_code_point(t.c.record_key))
        )
        rows = _with_exhausted(self._db, query, self.max_attempts)
        out = values.frame(rows, RETRYABLE_COLUMNS, times=["first_seen", "last_seen"])
        return out.astype({"attempts": "int64"})

    def dead_letter(self, crm: str | None = None, *, include_retryable: bool = True) -> pd.DataFrame:
        """Every failure, exhausted ones included (they stay visible until cleared)."""
        t = dead_letter_t
        query = sa.select(*[t.c[name] for name in DEAD_LETTER_COLUMNS if name != "exhausted"])
        if crm is not None:
            query = query.where(t.c.crm == check(crm, CRMS, "crm"))
        if not include_retryable:
            query = query.where(t.c.attempts >= self.max_attempts)
        query = query.order_by(
            self._db.by_code_point(t.c.crm),
            self._db.by_code_point(t.c.direction),
            t.c.first_seen,
            self._db.by_code_point(t.c.record_key),
        )
        rows = _with_exhausted(self._db, query, self.max_attempts)
        out = values.frame(rows, DEAD_LETTER_COLUMNS, times=["first_seen", "last_seen"])
        return out.astype({"attempts": "int64", "exhausted": bool})
