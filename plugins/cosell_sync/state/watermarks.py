"""Watermarks: per DAG and side, how far the sync has read (and when the inbox last signalled).

A watermark only moves forward: the upsert is ``INSERT ... ON CONFLICT DO UPDATE ... WHERE
value < excluded.value``, decided by the database in the write transaction, so two runs that
commit out of order never move it back. Only the events trigger's re-arm moves it backwards,
on purpose (``allow_backwards``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import Database, UsesDatabase
from cosell_sync.state.schema import watermarks_t
from cosell_sync.state.values import SIDES, check


def write_watermark(
    db: Database, conn: Connection, dag_id: str, side: str, value: datetime, run_id: str, allow_backwards: bool
) -> datetime:
    """Move the watermark inside the caller's transaction; the value it holds afterwards."""
    stmt = db.insert(watermarks_t).values(dag_id=dag_id, side=side, value=value, run_id=run_id, updated_at=values.now())
    stmt = stmt.on_conflict_do_update(
        index_elements=[watermarks_t.c.dag_id, watermarks_t.c.side],
        set_={"value": stmt.excluded.value, "run_id": stmt.excluded.run_id, "updated_at": stmt.excluded.updated_at},
        where=None if allow_backwards else watermarks_t.c.value < stmt.excluded.value,
    )
    conn.execute(stmt)
    query = sa.select(watermarks_t.c.value).where(watermarks_t.c.dag_id == dag_id, watermarks_t.c.side == side)
    return conn.execute(query).scalar_one()


class Watermarks(UsesDatabase):
    """The watermarks part of :class:`~cosell_sync.state.StateStore`."""

    def get_watermark(self, dag_id: str, side: str) -> datetime | None:
        check(side, SIDES, "side")
        query = sa.select(watermarks_t.c.value).where(watermarks_t.c.dag_id == dag_id, watermarks_t.c.side == side)
        return self._db.read(lambda conn: conn.execute(query).scalar())

    def get_watermark_row(self, dag_id: str, side: str) -> dict[str, Any] | None:
        """The watermark with who wrote it and when: ``value``, ``run_id``, ``updated_at`` (UTC), or None."""
        check(side, SIDES, "side")
        c = watermarks_t.c
        query = sa.select(c.value, c.run_id, c.updated_at).where(c.dag_id == dag_id, c.side == side)
        row = self._db.read(lambda conn: conn.execute(query).first())
        return None if row is None else {"value": row.value, "run_id": row.run_id, "updated_at": row.updated_at}

    def set_watermark(
        self, dag_id: str, side: str, value: datetime, run_id: str, *, allow_backwards: bool = False
    ) -> datetime:
        """Store the watermark; it never moves backwards unless ``allow_backwards``. Returns the stored value."""
        check(side, SIDES, "side")
        value = values.as_utc(value, f"watermark {dag_id}/{side}")
        return self._db.run(lambda conn: write_watermark(self._db, conn, dag_id, side, value, run_id, allow_backwards))
