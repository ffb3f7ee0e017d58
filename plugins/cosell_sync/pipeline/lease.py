"""Isolated runs: a run holds its CRM's lease from before it reads anything until its commit.

Runs that sync the same CRM (scheduled, manual, backfill and event-driven) must never
interleave between reading the base (and both sides) and committing the new base, or the
run with the older plan may commit last and move the base back. So a run takes the CRM's
lease in the state DB (:meth:`~cosell_sync.state.StateStore.acquire_lease`) before its
extract, every later step renews it (and a background thread keeps renewing it while a long
step runs), the commit checks it in its own transaction and then releases it.

Dry runs take no lease: they commit nothing, so they cannot move the base back, and a
preview must never hold up a real run. Nothing here imports Airflow: the DAG tasks turn
:class:`~cosell_sync.state.LeaseHeldError` into a reschedule (see ``dag_factory``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from cosell_sync.state import LeaseLostError, StateStore

log = logging.getLogger(__name__)

LEASE_TTL = timedelta(minutes=30)  # a holder that died blocks the CRM at most this long


def needs_lease(job: Any) -> bool:
    """A run that commits needs the lease; a dry run commits nothing and takes none."""
    return not job.dry_run


def acquire(job: Any, store: StateStore) -> int | None:
    """Take (or take back) the job's CRM lease; its epoch, also set on ``job.lease_epoch``.

    Raises :class:`~cosell_sync.state.LeaseHeldError` while another run holds it. A dry
    run takes none (None).
    """
    if not needs_lease(job):
        return None
    lease = store.acquire_lease(job.crm, job.dag_id, job.run_id, job.lease_ttl)
    job.lease_epoch = lease.epoch
    return lease.epoch


def renew(job: Any, store: StateStore, *, revive: bool = True) -> None:
    """Renew the job's lease; :class:`~cosell_sync.state.LeaseLostError` if another run took it.
    ``revive=False``: a lease the run released (its commit is done) stays released."""
    if job.lease_epoch is not None:
        store.renew_lease(job.crm, job.dag_id, job.run_id, job.lease_epoch, job.lease_ttl, revive=revive)


def release(job: Any, store: StateStore) -> bool:
    """Release the job's lease if it holds it (after the commit, or when the run failed for good)."""
    if job.lease_epoch is None and not needs_lease(job):
        return False
    return store.release_lease(job.crm, job.dag_id, job.run_id)


@contextmanager
def kept(job: Any, store: StateStore, *, revive: bool = True) -> Iterator[None]:
    """Run a step under the job's lease: renewed now (failing with LeaseLostError if it was
    lost) and every third of its ttl while the step runs, so a long load never lets it expire.

    ``revive=False`` (a first try of a DAG task): a lease the run released is left released.
    The run released it because another of its tasks failed for good, so this run will not
    commit; a parallel task must not take it back and block other runs until it expires. A
    retried or cleared task (a later try) takes it back if no other run took it since."""
    if job.lease_epoch is None:
        yield
        return
    renew(job, store, revive=revive)
    stop = threading.Event()
    interval = max(1.0, job.lease_ttl.total_seconds() / 3)

    def keep() -> None:
        while not stop.wait(interval):
            try:
                renew(job, store, revive=False)
            except LeaseLostError as exc:
                log.error("%s", exc)  # the commit's own check stops the run
                return
            except Exception:  # a state DB hiccup: try again at the next tick
                log.warning("could not renew the %s lease", job.crm, exc_info=True)

    keeper = threading.Thread(target=keep, name=f"cosell-lease-{job.crm}", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=10)
