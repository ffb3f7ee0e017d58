"""The run a step belongs to: :class:`SyncJob`, and where a scheduled run's window starts.

A job is rebuilt in every task from a small spec (``dag_factory``); it names the run's
staging folder (:mod:`cosell_sync.pipeline.staging`) and the CRM lease it holds
(:mod:`cosell_sync.pipeline.lease`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cosell_sync.engine.mapping import SyncMapping
from cosell_sync.pipeline import lease
from cosell_sync.sides.base import RunContext
from cosell_sync.state import StateStore

OVERLAP = timedelta(minutes=5)


@dataclass
class SyncJob:
    """Everything a step needs to know about the run."""

    crm: str
    dag_id: str
    run_id: str
    mapping: SyncMapping
    staging: Any
    since_pc: datetime | None = None  # None: everything (the initial load or a full resync)
    since_crm: datetime | None = None
    until: datetime | None = None
    referral_ids: list[str] | None = None
    crm_ids: list[str] | None = None  # with referral_ids: a run of just these records (a preview's)
    directions: tuple[str, ...] = ("pc_to_crm", "crm_to_pc")
    dry_run: bool = False
    backfill: bool = False
    lease_epoch: int | None = None  # the CRM lease this run holds (cosell_sync.pipeline.lease); None: none
    lease_ttl: timedelta = lease.LEASE_TTL

    @property
    def folder(self) -> Any:
        return self.staging / self.dag_id / re.sub(r"[^A-Za-z0-9_.-]", "_", self.run_id)

    @property
    def named(self) -> bool:
        """A run of named records (``referral_ids``/``crm_ids``), not of a window."""
        return self.referral_ids is not None or self.crm_ids is not None

    @property
    def ctx(self) -> RunContext:
        return RunContext(dag_id=self.dag_id, run_id=self.run_id, dry_run=self.dry_run)


def window(store: StateStore, dag_id: str, *, full_resync: bool = False) -> tuple[datetime | None, datetime | None]:
    """Where each side's incremental read starts: its committed watermark (the server's time
    when the last window read began, see :func:`cosell_sync.pipeline.extract._mark`) minus an overlap (a write in flight
    at the watermark, or stamped by a server whose clock lags, is read again, and the merge
    makes that harmless). No watermark yet, or a full resync: everything."""
    if full_resync:
        return None, None
    marks = [store.get_watermark(dag_id, side) for side in ("partner_center", "crm")]
    pc_mark, crm_mark = (m - OVERLAP if m else None for m in marks)
    return pc_mark, crm_mark


def window_job(crm: str, store: StateStore, staging: Any, run_id: str, **fields: Any) -> SyncJob:
    """The job of a scheduled or manual run of ``cosell_sync_<crm>`` in this process: its window
    starts at the committed watermarks, as ``prepare`` reads them; ``fields`` override any
    field (``mapping``, a backfill's interval ...)."""
    from cosell_sync.engine.mapping import load_mapping

    dag_id = f"cosell_sync_{crm}"
    since_pc, since_crm = window(store, dag_id)
    fields = {"since_pc": since_pc, "since_crm": since_crm} | fields
    mapping = fields.pop("mapping", None) or load_mapping(crm)
    return SyncJob(crm=crm, dag_id=dag_id, run_id=run_id, mapping=mapping, staging=staging, **fields)


def initial_load_done(store: StateStore, dag_id: str) -> bool:
    """Has a window sync (scheduled or manual, not a dry run) of ``dag_id`` ever committed?"""
    return any(store.get_watermark(dag_id, side) is not None for side in ("full_sync", "partner_center", "crm"))
