"""Run leases: one row per CRM naming the run that may read the base and commit it now.

Each lease names its holder (DAG id and run id), an expiry and an epoch (a fencing token) that
grows each time the lease passes to another run. :func:`acquire_leases` is re-entrant for the
holder, refuses another run while the lease is live and takes over an expired or released
one; the run's commit (:func:`cosell_sync.state.runs.commit_run` with ``lease_epoch``) checks,
in the commit's own transaction, that the run still holds the lease with that epoch
(:func:`hold_lease`), so a run whose lease passed to another run can never commit a stale
base. Acquire, renew, release and that check take the same lock (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: an advisory lock per CRM).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import Database
from cosell_sync.state.schema import leases_t
from cosell_sync.state.values import CRMS, check, req_str

log = logging.getLogger(__name__)

LEASE_LOCK_KEY = "cosell_state:lease:{crm}"


@dataclass(frozen=True)
class Lease:
    """A CRM's run lease: who holds it (``dag_id``, ``run_id``), since when, until when."""

    crm: str
    dag_id: str
    run_id: str
    epoch: int
    acquired_at: datetime
    expires_at: datetime
    released_at: datetime | None = None

    def live(self, now: datetime | None = None) -> bool:
        """Held: neither expired nor released."""
        return self.released_at is None and self.expires_at > (now or values.now())

    def holder(self) -> str:
        return f"{self.dag_id} run {self.run_id}"


class LeaseHeldError(RuntimeError):
    """Another run holds the CRM's lease (it is live): wait and try again."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        super().__init__(
            f"the {lease.crm} lease is held by {lease.holder()} (since {lease.acquired_at.isoformat()}, "
            f"expires {lease.expires_at.isoformat()} unless renewed)"
        )


class LeaseLostError(RuntimeError):
    """The run no longer holds the lease it read the base under: its plan may be stale."""

    def __init__(self, crm: str, dag_id: str, run_id: str, epoch: int, current: Lease | None) -> None:
        self.crm = crm
        self.current = current
        now = "nobody holds it" if current is None else f"it passed to {current.holder()} (epoch {current.epoch})"
        super().__init__(
            f"{dag_id} run {run_id} no longer holds the {crm} lease it read the base under (epoch {epoch}): "
            f"{now}. Its plan may be stale, so it stops here; the next run syncs the changes again"
        )


def lease_row(conn: Connection, crm: str) -> Lease | None:
    row = conn.execute(sa.select(leases_t).where(leases_t.c.crm == crm)).first()
    return None if row is None else Lease(**dict(row._mapping))


def get_lease(db: Database, crm: str) -> Lease | None:
    """See :meth:`cosell_sync.state.StateStore.get_lease`."""
    check(crm, CRMS, "crm")
    return db.read(lambda conn: lease_row(conn, crm))


def acquire_leases(db: Database, holders: Mapping[str, str], run_id: str, ttl: timedelta) -> dict[str, Lease]:
    """See :meth:`cosell_sync.state.StateStore.acquire_leases`."""
    run_id = req_str(run_id, "run_id")
    wanted = {check(crm, CRMS, "crm"): req_str(dag_id, "dag_id") for crm, dag_id in holders.items()}
    if ttl <= timedelta(0):
        raise ValueError("the lease ttl must be positive")

    def work(conn: Connection) -> dict[str, Lease]:
        now = values.now()
        taken: dict[str, Lease] = {}
        for crm in sorted(wanted):  # one order everywhere: no lock cycles between two callers
            dag_id = wanted[crm]
            db.lock(conn, LEASE_LOCK_KEY.format(crm=crm))
            current = lease_row(conn, crm)
            row = {"dag_id": dag_id, "run_id": run_id, "expires_at": now + ttl, "released_at": None}
            if current is None:
                row |= {"crm": crm, "epoch": 1, "acquired_at": now}
                conn.execute(leases_t.insert().values(**row))
            elif (current.dag_id, current.run_id) == (dag_id, run_id):
                row |= {"epoch": current.epoch, "acquired_at": current.acquired_at}
            elif current.live(now):
                raise LeaseHeldError(current)
            else:
                if current.released_at is None:
                    log.warning(
                        "The %s lease of %s expired at %s: %s run %s takes it over",
                        crm, current.holder(), current.expires_at.isoformat(), dag_id, run_id,
                    )  # fmt: skip
                row |= {"epoch": current.epoch + 1, "acquired_at": now}
            if current is not None:
                conn.execute(sa.update(leases_t).where(leases_t.c.crm == crm).values(**row))
            taken[crm] = Lease(crm=crm, **{k: v for k, v in row.items() if k != "crm"})
        return taken

    return db.run(work)


def hold_lease(
    db: Database,
    conn: Connection,
    crm: str,
    dag_id: str,
    run_id: str,
    epoch: int,
    ttl: timedelta | None,
    revive: bool = True,
) -> Lease:
    """Inside the caller's transaction: :class:`LeaseLostError` unless ``dag_id``/``run_id``
    still holds ``crm``'s lease under ``epoch``; with ``ttl``, extend it by ``ttl`` from now."""
    db.lock(conn, LEASE_LOCK_KEY.format(crm=crm))
    current = lease_row(conn, crm)
    if current is None or (current.dag_id, current.run_id, current.epoch) != (dag_id, run_id, epoch):
        raise LeaseLostError(crm, dag_id, run_id, epoch, current)
    if ttl is None or (current.released_at is not None and not revive):
        return current
    now = values.now()
    conn.execute(sa.update(leases_t).where(leases_t.c.crm == crm).values(expires_at=now + ttl, released_at=None))
    return Lease(**{**current.__dict__, "expires_at": now + ttl, "released_at": None})


def renew_lease(
    db: Database, crm: str, dag_id: str, run_id: str, epoch: int, ttl: timedelta, *, revive: bool = True
) -> Lease:
    """See :meth:`cosell_sync.state.StateStore.renew_lease`."""
    check(crm, CRMS, "crm")
    if ttl <= timedelta(0):
        raise ValueError("the lease ttl must be positive")
    return db.run(lambda conn: hold_lease(db, conn, crm, dag_id, run_id, int(epoch), ttl, revive))


def release_lease(db: Database, crm: str, dag_id: str, run_id: str) -> bool:
    """See :meth:`cosell_sync.state.StateStore.release_lease`."""
    check(crm, CRMS, "crm")

    def work(conn: Connection) -> bool:
        db.lock(conn, LEASE_LOCK_KEY.format(crm=crm))
        now = values.now()
        stmt = (
            sa.update(leases_t)
            .where(
                leases_t.c.crm == crm,
                leases_t.c.dag_id == dag_id,
                leases_t.c.run_id == run_id,
                leases_t.c.released_at.is_(None),
            )
            .values(
                released_at=now,
                expires_at=sa.case((leases_t.c.expires_at > now, now), else_=leases_t.c.expires_at),
            )
        )
        return conn.execute(stmt).rowcount == 1

    return db.run(work)
