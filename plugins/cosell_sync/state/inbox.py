"""The webhook inbox: the Partner Center events the receiver accepted, until a run synced them.

One row per distinct event (``dedup_key`` is unique, so a redelivery is not stored twice),
``pending`` until a run claims it, ``claimed`` by that run, ``done`` once the run's sync
committed. A claim is one write transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock), so two runs never claim the same row; a run that died is recognised by the
age of its claim, and its rows are claimed again. On SQLite (WAL, ``synchronous=NORMAL``) a
committed row survives a crash of any process but not necessarily a power loss of the host;
production deployments that need that use PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import UsesDatabase
from cosell_sync.state.schema import ID_LENGTH, inbox_t
from cosell_sync.state.values import chunks, missing, req_str

INBOX_STATUSES = ("pending", "claimed", "done")
INBOX_COLUMNS = [
    "id",
    "dedup_key",
    "event_name",
    "referral_id",
    "resource_uri",
    "change_date",
    "received_at",
    "status",
    "claimed_by",
    "claimed_at",
    "done_at",
    "attempts",
]
INBOX_STALE_CLAIM = timedelta(hours=1)  # a claim older than this belongs to a run that died
INBOX_LOCK_KEY = "cosell_state:inbox"


def prepare_event(event: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    dedup_key = req_str(event.get("dedup_key"), "inbox event dedup_key")
    if len(dedup_key) > 64:
        raise ValueError(f"inbox event dedup_key must be at most 64 characters, got {len(dedup_key)}")
    referral_id = req_str(event.get("referral_id"), "inbox event referral_id")
    if len(referral_id) > ID_LENGTH:
        raise ValueError(f"inbox event referral_id must be at most {ID_LENGTH} characters")
    event_name = req_str(event.get("event_name"), "inbox event event_name")
    if len(event_name) > 64:
        raise ValueError("inbox event event_name must be at most 64 characters")
    change_date = event.get("change_date")
    received_at = event.get("received_at")
    return {
        "dedup_key": dedup_key,
        "event_name": event_name,
        "referral_id": referral_id,
        "resource_uri": req_str(event.get("resource_uri"), "inbox event resource_uri"),
        "change_date": None if missing(change_date) else values.as_utc(change_date, "inbox event change_date"),
        "received_at": now if missing(received_at) else values.as_utc(received_at, "inbox event received_at"),
        "status": "pending",
        "attempts": 0,
    }


def _rows(conn: Connection, query: sa.Select) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(query.order_by(inbox_t.c.id))]


class Inbox(UsesDatabase):
    """The webhook inbox part of :class:`~cosell_sync.state.StateStore`."""

    def inbox_add(self, events: Iterable[Mapping[str, Any]]) -> list[bool]:
        """Store webhook events durably, once each; one transaction for all of them.

        Each event holds ``dedup_key`` (unique; at most 64 characters), ``event_name``,
        ``referral_id``, ``resource_uri`` and optionally ``change_date`` and ``received_at``
        (aware datetimes; ``received_at`` defaults to now). The answer says, per event, whether
        it was newly inserted (``False``: its dedup key was already there, e.g. a redelivery).
        """
        now = values.now()
        rows = [prepare_event(event, now) for event in events]
        if not rows:
            return []

        def work(conn: Connection) -> list[bool]:
            inserted = []
            for row in rows:
                stmt = (
                    self._db.insert(inbox_t).values(**row).on_conflict_do_nothing(index_elements=[inbox_t.c.dedup_key])
                )
                inserted.append(conn.execute(stmt).rowcount == 1)
            return inserted

        return self._db.run(work)

    def inbox_pending(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Pending inbox rows, oldest first (every column of :data:`~cosell_sync.state.INBOX_COLUMNS`)."""
        query = sa.select(*(inbox_t.c[name] for name in INBOX_COLUMNS)).where(inbox_t.c.status == "pending")
        if limit is not None:
            query = query.limit(int(limit))
        return self._db.read(lambda conn: _rows(conn, query))

    def inbox_claim(
        self, run_id: str, limit: int | None = None, *, stale_after: timedelta = INBOX_STALE_CLAIM
    ) -> list[dict[str, Any]]:
        """Claim inbox rows for ``run_id`` atomically and return them, oldest first.

        Claimed are pending rows, rows ``run_id`` already holds (a retried task gets them
        again) and rows whose claim is older than ``stale_after`` (their run died). Each
        claim counts one attempt. Two concurrent callers never get the same row.
        """
        run_id = req_str(run_id, "run_id")
        cutoff = values.now() - stale_after
        c = inbox_t.c

        def work(conn: Connection) -> list[dict[str, Any]]:
            self._db.lock(conn, INBOX_LOCK_KEY)
            now = values.now()
            claimable = sa.or_(
                c.status == "pending",
                sa.and_(c.status == "claimed", sa.or_(c.claimed_by == run_id, c.claimed_at < cutoff)),
            )
            query = sa.select(c.id).where(claimable).order_by(c.id)
            if limit is not None:
                query = query.limit(int(limit))
            ids = [row.id for row in conn.execute(query)]
            rows: list[dict[str, Any]] = []
            for chunk in chunks(ids):
                conn.execute(
                    sa.update(inbox_t)
                    .where(c.id.in_(chunk))
                    .values(status="claimed", claimed_by=run_id, claimed_at=now, attempts=c.attempts + 1)
                )
                rows.extend(_rows(conn, sa.select(*(c[n] for n in INBOX_COLUMNS)).where(c.id.in_(chunk))))
            return rows

        return self._db.run(work)

    def inbox_done(self, run_id: str, ids: Iterable[int] | None = None) -> int:
        """Mark rows claimed by ``run_id`` done (``ids``, or all it holds); the number of rows marked."""
        run_id = req_str(run_id, "run_id")
        wanted = None if ids is None else list(dict.fromkeys(int(i) for i in ids))
        c = inbox_t.c

        def work(conn: Connection) -> int:
            now = values.now()
            base = (
                sa.update(inbox_t)
                .where(c.status == "claimed", c.claimed_by == run_id)
                .values(status="done", done_at=now)
            )
            if wanted is None:
                return conn.execute(base).rowcount
            return sum(conn.execute(base.where(c.id.in_(chunk))).rowcount for chunk in chunks(wanted))

        return self._db.run(work)

    def inbox_release(self, run_id: str) -> int:
        """Hand the rows ``run_id`` still holds back to pending (after a failed run); the number released."""
        run_id = req_str(run_id, "run_id")
        c = inbox_t.c
        stmt = (
            sa.update(inbox_t)
            .where(c.status == "claimed", c.claimed_by == run_id)
            .values(status="pending", claimed_by=None, claimed_at=None)
        )
        return self._db.run(lambda conn: conn.execute(stmt).rowcount)

    def inbox_newest_pending(self) -> tuple[int, datetime | None]:
        """(number of pending rows, the newest pending row's ``received_at``)."""
        c = inbox_t.c
        query = sa.select(sa.func.count(), sa.func.max(c.received_at)).where(c.status == "pending")
        count, newest = self._db.read(lambda conn: conn.execute(query).one())
        return int(count), None if newest is None else values.as_utc(newest, "received_at")

    def inbox_counts(self) -> dict[str, int]:
        """The number of inbox rows per status: ``{"pending": n, "claimed": n, "done": n}``."""
        query = sa.select(inbox_t.c.status, sa.func.count()).group_by(inbox_t.c.status)
        counts = dict.fromkeys(INBOX_STATUSES, 0)
        for status, count in self._db.read(lambda conn: conn.execute(query).all()):
            counts[status] = int(count)
        return counts
