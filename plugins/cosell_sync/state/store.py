"""The state database as one object: :class:`StateStore`, a thin facade over the table modules.

The state lives in a SQLite file under ``$AIRFLOW_HOME`` (the default) or in PostgreSQL
(production), through SQLAlchemy Core; nothing here imports Airflow at import time, only
:meth:`StateStore.from_airflow` does, lazily. The work is done per concern:

* :mod:`~cosell_sync.state.db`: the engine, the dialects, transactions retried as a whole on
  lock errors, advisory locks (the concurrency notes are there);
* :mod:`~cosell_sync.state.schema`: the tables and their migrations;
* :mod:`~cosell_sync.state.links`, :mod:`~cosell_sync.state.watermarks`,
  :mod:`~cosell_sync.state.audit`, :mod:`~cosell_sync.state.dead_letter`,
  :mod:`~cosell_sync.state.runs` (a run's one-transaction commit and the runs registry),
  :mod:`~cosell_sync.state.inbox` (the webhook inbox), :mod:`~cosell_sync.state.leases`
  (run leases, the fencing of commits).

Each table module writes inside a caller's transaction (``write_*(conn, ...)``) and offers
its own one-transaction operations; :meth:`StateStore.commit_run` puts a run's writes of every
table into one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine

from cosell_sync.state import audit as audit_log
from cosell_sync.state import dead_letter as dead_letter_table
from cosell_sync.state import inbox as inbox_table
from cosell_sync.state import leases as lease_table
from cosell_sync.state import links as link_table
from cosell_sync.state import runs as run_table
from cosell_sync.state import schema
from cosell_sync.state import values as state_values
from cosell_sync.state import watermarks as watermark_table
from cosell_sync.state.db import DEFAULT_CONN_ID, Database, default_state_url, not_found_exceptions
from cosell_sync.state.db import sqlalchemy_url_from_connection as url_from_connection
from cosell_sync.state.inbox import INBOX_STALE_CLAIM
from cosell_sync.state.leases import Lease

log = logging.getLogger(__name__)

__all__ = ["StateStore"]


class StateStore:
    """The sync's state database: links, watermarks, audit, dead letter, runs, inbox, run leases.

    ``max_attempts``: a dead-letter row failed this often is exhausted (no longer retried).
    """

    def __init__(self, url: str, *, echo: bool = False, max_attempts: int = 5) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = int(max_attempts)
        self._db = Database(url, echo=echo)

    @classmethod
    def from_airflow(cls, conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> StateStore:
        """The store behind the Airflow connection ``conn_id``; SQLite under ``$AIRFLOW_HOME`` when it is absent."""
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(conn_id)
        except not_found_exceptions():
            url = default_state_url()
            log.info("Connection %r is not defined; using the state database %s", conn_id, url)
            return cls(url, **kwargs)
        return cls(url_from_connection(conn), **kwargs)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._db.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def close(self) -> None:
        """Release the engine's pooled connections."""
        self._db.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self.url!r})"

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int:
        """The schema version of the database (0 when it has never been migrated)."""
        return schema.schema_version(self._db)

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe to call from several processes at once."""
        return schema.migrate(self._db)

    # ------------------------------------------------------------------ links

    @staticmethod
    def hash_values(values: Mapping[str, Any]) -> str:
        """sha256 of the canonical JSON of ``values`` (sorted keys, compact separators, ``default=str``)."""
        return state_values.hash_values(values)

    def get_links(
        self,
        crm: str,
        referral_ids: Iterable[str] | None = None,
        crm_ids: Iterable[str] | None = None,
        *,
        columnar: bool = False,
    ) -> pd.DataFrame:
        """The links of ``crm``: all of them, or those matching ``referral_ids`` OR ``crm_ids``.

        Columns: referral_id, crm_id, base (dict), base_hash, synced_at (UTC), run_id. With
        ``columnar``, the bases come as one ``base.<field>`` column per field instead of a dict
        per link, decoded from their stored JSON in one pass (see :func:`~cosell_sync.state.links.base_columns`).
        """
        return link_table.get_links(self._db, crm, referral_ids, crm_ids, columnar=columnar)

    def upsert_links(self, crm: str, links: pd.DataFrame, run_id: str) -> int:
        """Insert or update links on (crm, referral_id); returns the rows written.

        Raises :class:`~cosell_sync.state.LinkConflictError` (a ``ValueError``) when a CRM record
        would be linked to a second referral; nothing is written then.
        """
        return link_table.upsert_links(self._db, crm, links, run_id)

    def delete_links(self, crm: str, referral_ids: Iterable[str]) -> int:
        """Remove the links of ``referral_ids``; returns the rows removed."""
        return link_table.delete_links(self._db, crm, referral_ids)

    # ------------------------------------------------------------------ watermarks

    def get_watermark(self, dag_id: str, side: str) -> datetime | None:
        return watermark_table.get_watermark(self._db, dag_id, side)

    def get_watermark_row(self, dag_id: str, side: str) -> dict[str, Any] | None:
        """The watermark with who wrote it and when: ``value``, ``run_id``, ``updated_at`` (UTC), or None."""
        return watermark_table.get_watermark_row(self._db, dag_id, side)

    def set_watermark(
        self, dag_id: str, side: str, value: datetime, run_id: str, *, allow_backwards: bool = False
    ) -> datetime:
        """Store the watermark; it never moves backwards unless ``allow_backwards``. Returns the stored value."""
        return watermark_table.set_watermark(self._db, dag_id, side, value, run_id, allow_backwards=allow_backwards)

    # ------------------------------------------------------------------ audit

    def append_audit(self, entries: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Append audit entries in one bulk insert; returns the number of rows."""
        return audit_log.append_audit(self._db, entries)

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
        return audit_log.read_audit(
            self._db, crm=crm, referral_id=referral_id, run_id=run_id, action=action, limit=limit
        )

    # ------------------------------------------------------------------ dead letter

    def record_failures(
        self, crm: str, direction: str, failures: Sequence[Mapping[str, Any]], run_id: str
    ) -> pd.DataFrame:
        """Record rejected rows; a row seen before gets one more attempt (first_seen kept).

        Returns record_key, attempts, first_seen and exhausted (attempts >= max_attempts).
        A key listed twice in one call counts as one attempt (the last error wins).
        """
        return dead_letter_table.record_failures(self._db, crm, direction, failures, run_id, self.max_attempts)

    def clear_failures(self, crm: str, direction: str, record_keys: Iterable[str]) -> int:
        """Forget failures whose record has since succeeded; returns the rows removed."""
        return dead_letter_table.clear_failures(self._db, crm, direction, record_keys)

    def retryable_failures(self, crm: str, direction: str) -> pd.DataFrame:
        """Failures still worth retrying (attempts < max_attempts), oldest first."""
        return dead_letter_table.retryable_failures(self._db, crm, direction, self.max_attempts)

    def dead_letter(self, crm: str | None = None, *, include_retryable: bool = True) -> pd.DataFrame:
        """Every failure, exhausted ones included (they stay visible until cleared)."""
        return dead_letter_table.dead_letter(
            self._db, crm, include_retryable=include_retryable, max_attempts=self.max_attempts
        )

    # ------------------------------------------------------------------ a run's commit and the runs registry

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
        (:class:`~cosell_sync.state.LeaseLostError` otherwise, and nothing lands).
        """
        run_table.commit_run(
            self._db,
            dag_id=dag_id,
            run_id=run_id,
            crm=crm,
            links=links,
            audit=audit,
            watermarks=watermarks,
            cleared_failures=cleared_failures,
            failures=failures,
            summary=summary,
            move_watermarks=move_watermarks,
            lease_epoch=lease_epoch,
        )

    def record_run(self, *, dag_id: str, run_id: str, crm: str, summary: Mapping[str, Any]) -> None:
        """Record (or replace) a run's summary, stamped with its finish time (a dry run's only write)."""
        run_table.record_run(self._db, dag_id=dag_id, run_id=run_id, crm=crm, summary=summary)

    def get_run(self, dag_id: str, run_id: str) -> dict | None:
        """One recorded run (dag_id, run_id, crm, summary, finished_at), or None."""
        return run_table.get_run(self._db, dag_id, run_id)

    def last_run(self, dag_id: str) -> dict | None:
        """The most recently finished run of ``dag_id``: dag_id, run_id, crm, summary (dict), finished_at."""
        return run_table.last_run(self._db, dag_id)

    # ------------------------------------------------------------------ run leases

    def get_lease(self, crm: str) -> Lease | None:
        """The lease row of ``crm`` (live or not), or None when no run ever took it."""
        return lease_table.get_lease(self._db, crm)

    def acquire_leases(self, holders: Mapping[str, str], run_id: str, ttl: timedelta) -> dict[str, Lease]:
        """Take the lease of every CRM in ``holders`` (crm -> dag_id) for ``run_id``: all or none.

        Re-entrant: the holder gets its lease back (renewed, same epoch) even after it expired
        or was released, as long as no other run took it since. An expired or released lease
        passes to the caller with the next epoch. A live lease of another run raises
        :class:`~cosell_sync.state.LeaseHeldError` and nothing changes.
        """
        return lease_table.acquire_leases(self._db, holders, run_id, ttl)

    def acquire_lease(self, crm: str, dag_id: str, run_id: str, ttl: timedelta) -> Lease:
        """Take ``crm``'s lease for ``dag_id``/``run_id`` (see :meth:`acquire_leases`)."""
        return self.acquire_leases({crm: dag_id}, run_id, ttl)[crm]

    def renew_lease(
        self, crm: str, dag_id: str, run_id: str, epoch: int, ttl: timedelta, *, revive: bool = True
    ) -> Lease:
        """Extend the lease ``dag_id``/``run_id`` holds under ``epoch`` by ``ttl`` from now.

        Raises :class:`~cosell_sync.state.LeaseLostError` when another run took it since. An
        expired or released lease nobody else took is still this run's: renewing takes it back,
        unless ``revive`` is false, when a released lease is left released.
        """
        return lease_table.renew_lease(self._db, crm, dag_id, run_id, epoch, ttl, revive=revive)

    def release_lease(self, crm: str, dag_id: str, run_id: str) -> bool:
        """Release ``crm``'s lease if ``dag_id``/``run_id`` holds it; whether it did."""
        return lease_table.release_lease(self._db, crm, dag_id, run_id)

    # ------------------------------------------------------------------ webhook inbox

    def inbox_add(self, events: Iterable[Mapping[str, Any]]) -> list[bool]:
        """Store webhook events durably, once each; one transaction for all of them.

        Each event holds ``dedup_key`` (unique; at most 64 characters), ``event_name``,
        ``referral_id``, ``resource_uri`` and optionally ``change_date`` and ``received_at``
        (aware datetimes; ``received_at`` defaults to now). The answer says, per event, whether
        it was newly inserted (``False``: its dedup key was already there, e.g. a redelivery).
        """
        return inbox_table.inbox_add(self._db, events)

    def inbox_pending(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Pending inbox rows, oldest first (every column of :data:`~cosell_sync.state.INBOX_COLUMNS`)."""
        return inbox_table.inbox_pending(self._db, limit)

    def inbox_claim(
        self, run_id: str, limit: int | None = None, *, stale_after: timedelta = INBOX_STALE_CLAIM
    ) -> list[dict[str, Any]]:
        """Claim inbox rows for ``run_id`` atomically and return them, oldest first.

        Claimed are pending rows, rows ``run_id`` already holds (a retried task gets them
        again) and rows whose claim is older than ``stale_after`` (their run died). Each
        claim counts one attempt. Two concurrent callers never get the same row.
        """
        return inbox_table.inbox_claim(self._db, run_id, limit, stale_after=stale_after)

    def inbox_done(self, run_id: str, ids: Iterable[int] | None = None) -> int:
        """Mark rows claimed by ``run_id`` done (``ids``, or all it holds); the number of rows marked."""
        return inbox_table.inbox_done(self._db, run_id, ids)

    def inbox_release(self, run_id: str) -> int:
        """Hand the rows ``run_id`` still holds back to pending (after a failed run); the number released."""
        return inbox_table.inbox_release(self._db, run_id)

    def inbox_newest_pending(self) -> tuple[int, datetime | None]:
        """(number of pending rows, the newest pending row's ``received_at``)."""
        return inbox_table.inbox_newest_pending(self._db)

    def inbox_counts(self) -> dict[str, int]:
        """The number of inbox rows per status: ``{"pending": n, "claimed": n, "done": n}``."""
        return inbox_table.inbox_counts(self._db)
