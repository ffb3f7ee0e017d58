"""Run leases: one row per CRM naming the run that may read the base and commit it now.

Each lease names its holder (DAG id and run id), an expiry and an epoch (a fencing token) that
grows each time the lease passes to another run. :meth:`Leases.acquire_leases` is re-entrant for the
holder, refuses another run while the lease is live and takes over an expired or released
one; the run's commit (:meth:`cosell_sync.state.runs.Runs.commit_run` with ``lease_epoch``) checks,
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
from cosell_sync.state.db import Database, UsesDatabase
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


class Leases(UsesDatabase):
    """The run leases part of :class:`~cosell_sync.state.StateStore`."""

    def get_lease(self, crm: str) -> Lease | None:
        """The lease row of ``crm`` (live or not), or None when no run ever took it."""
        check(crm, CRMS, "crm")
        return self._db.read(lambda conn: lease_row(conn, crm))

    def acquire_leases(self, holders: Mapping[str, str], run_id: str, ttl: timedelta) -> dict[str, Lease]:
        """Take the lease of every CRM in ``holders`` (crm -> dag_id) for ``run_id``: all or none.

        Re-entrant: the holder gets its lease back (renewed, same epoch) even after it expired
        or was released, as long as no other run took it since. An expired or released lease
        passes to the caller with the next epoch. A live lease of another run raises
        :class:`~cosell_sync.state.LeaseHeldError` and nothing changes.
        """
        run_id = req_str(run_id, "run_id")
        wanted = {check(crm, CRMS, "crm"): req_str(dag_id, "dag_id") for crm, dag_id in holders.items()}
        if ttl <= timedelta(0):
            raise ValueError("the lease ttl must be positive")

        def work(conn: Connection) -> dict[str, Lease]:
            now = values.now()
            taken: dict[str, Lease] = {}
            for crm in sorted(wanted):  # one order everywhere: no lock cycles between two callers
                dag_id = wanted[crm]
                self._db.lock(conn, LEASE_LOCK_KEY.format(crm=crm))
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

        return self._db.run(work)

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
        check(crm, CRMS, "crm")
        if ttl <= timedelta(0):
            raise ValueError("the lease ttl must be positive")
        return self._db.run(lambda conn: hold_lease(self._db, conn, crm, dag_id, run_id, int(epoch), ttl, revive))

    def release_lease(self, crm: str, dag_id: str, run_id: str) -> bool:
        """Release ``crm``'s lease if ``dag_id``/``run_id`` holds it; whether it did."""
        check(crm, CRMS, "crm")

        def work(conn: Connection) -> bool:
            self._db.lock(conn, LEASE_LOCK_KEY.format(crm=crm))
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

        return self._db.run(work)
