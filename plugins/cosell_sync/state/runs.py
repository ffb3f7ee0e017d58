"""A run's record step, and the runs registry (one summary per run).

:meth:`Runs.commit_run` records a run in ONE transaction: its links, its audit, its dead letter
(failures recorded, failures that succeeded since cleared), its summary and its watermarks,
after checking (in that same transaction) that the run still holds its CRM's lease. Either
everything lands or nothing does: a run that crashes half-way, or whose lease passed to
another run, leaves the state as it found it, and its retry records everything once. Were
they separate transactions, a crash between them could move the watermarks past records whose
failures were never recorded, and the next run would not read them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import audit as audit_log
from cosell_sync.state import dead_letter, leases, values
from cosell_sync.state import links as link_table
from cosell_sync.state import watermarks as watermark_table
from cosell_sync.state.db import Database, UsesDatabase
from cosell_sync.state.schema import runs_t
from cosell_sync.state.values import CRMS, DIRECTIONS, SIDES, check


def write_run(db: Database, conn: Connection, dag_id: str, run_id: str, crm: str, summary: Mapping[str, Any]) -> None:
    """Record (or replace) the run's summary inside the caller's transaction, stamped now."""
    stmt = db.insert(runs_t).values(
        dag_id=dag_id, run_id=run_id, crm=crm, summary=dict(summary), finished_at=values.now()
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[runs_t.c.dag_id, runs_t.c.run_id],
        set_={"crm": stmt.excluded.crm, "summary": stmt.excluded.summary, "finished_at": stmt.excluded.finished_at},
    )
    conn.execute(stmt)


class Runs(UsesDatabase):
    """A run's commit and the runs registry: the runs part of :class:`~cosell_sync.state.StateStore`."""

    def record_run(self, *, dag_id: str, run_id: str, crm: str, summary: Mapping[str, Any]) -> None:
        """Record (or replace) a run's summary, stamped with its finish time (a dry run's only write)."""
        check(crm, CRMS, "crm")
        self._db.run(lambda conn: write_run(self._db, conn, dag_id, run_id, crm, summary))

    def get_run(self, dag_id: str, run_id: str) -> dict | None:
        """One recorded run (dag_id, run_id, crm, summary, finished_at), or None."""
        query = sa.select(runs_t).where(runs_t.c.dag_id == dag_id, runs_t.c.run_id == run_id)
        row = self._db.read(lambda conn: conn.execute(query).first())
        return None if row is None else dict(row._mapping)

    def last_run(self, dag_id: str) -> dict | None:
        """The most recently finished run of ``dag_id``: dag_id, run_id, crm, summary (dict), finished_at."""
        query = (
            sa.select(runs_t)
            .where(runs_t.c.dag_id == dag_id)
            .order_by(runs_t.c.finished_at.desc(), self._db.by_code_point(runs_t.c.run_id).desc())
            .limit(1)
        )
        row = self._db.read(lambda conn: conn.execute(query).first())
        return None if row is None else dict(row._mapping)

    def commit_run(
        self,
        *,
        dag_id: str,
        run_id: str,
        crm: str,
        links: pd.DataFrame | None = None,
        audit: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
        watermarks: Mapping[str, datetime] | None = None,
        cleared_failures: Mapping[str, Iterable[str]] | None = None,
        failures: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        summary: Mapping[str, Any] | None = None,
        move_watermarks: bool = True,
        lease_epoch: int | None = None,
    ) -> None:
        """Commit a run's state in ONE transaction: everything lands, or nothing does.

        ``links`` are upserted, ``audit`` appended (dag_id, run_id and crm default to this
        run's), ``cleared_failures`` (direction -> record keys) removed from the dead letter,
        then ``failures`` (direction -> rows with record_key, payload, error, error_code)
        recorded in it (as :meth:`record_failures` does), ``summary`` recorded as the run's
        (as :meth:`record_run` does), and, when ``move_watermarks``, ``watermarks`` (side ->
        value) moved forward (never back). With ``lease_epoch``, the run must still hold
        ``crm``'s lease under that epoch, checked in this same transaction
        (:class:`~cosell_sync.state.LeaseLostError` otherwise, and nothing lands). Everything
        is checked and prepared before the transaction opens: a bad value fails before any write.
        """
        check(crm, CRMS, "crm")
        link_rows = link_table.prepare_links(crm, links, run_id) if links is not None and len(links) else []
        audit_rows = audit_log.prepare_audit(audit, {"dag_id": dag_id, "run_id": run_id, "crm": crm})
        marks = {
            check(side, SIDES, "side"): values.as_utc(value, f"watermark {dag_id}/{side}")
            for side, value in (watermarks or {}).items()
        }
        cleared = {
            check(direction, DIRECTIONS, "direction"): values.ids(keys)
            for direction, keys in (cleared_failures or {}).items()
        }
        failed = {
            direction: rows
            for direction, items in (failures or {}).items()
            if (rows := dead_letter.prepare_failures(crm, direction, items, run_id))
        }

        def work(conn: Connection) -> None:
            if lease_epoch is not None:
                leases.hold_lease(self._db, conn, crm, dag_id, run_id, int(lease_epoch), None)
            link_table.write_links(self._db, conn, crm, link_rows)
            audit_log.write_audit(conn, audit_rows)
            for direction, keys in cleared.items():  # before the new failures: a key in both starts afresh
                dead_letter.delete_failures(conn, crm, direction, keys)
            for direction, rows in failed.items():
                dead_letter.write_failures(self._db, conn, crm, direction, rows)
            if summary is not None:
                write_run(self._db, conn, dag_id, run_id, crm, summary)
            if move_watermarks:
                for side, value in marks.items():
                    watermark_table.write_watermark(self._db, conn, dag_id, side, value, run_id, False)

        self._db.run(work)
