"""The whole run in one process, in the DAG's order (event-driven runs of a few referrals)."""

from __future__ import annotations

from typing import Any

from cosell_sync.pipeline import lease
from cosell_sync.pipeline.commit import commit
from cosell_sync.pipeline.extract import extract_crm, extract_partner_center
from cosell_sync.pipeline.job import SyncJob
from cosell_sync.pipeline.load import load_crm, load_partner_center
from cosell_sync.pipeline.plan import plan_run
from cosell_sync.sides.crm import CrmSide
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.state import StateStore


def sync(job: SyncJob, pc_side: PartnerCenterSide, crm_side: CrmSide, store: StateStore) -> dict[str, Any]:
    """Every step in one process, in the DAG's order: for event-driven runs of a few
    referrals, where one task beats seven task start-ups. Returns the committed report.

    The CRM's lease is taken first unless the job already holds it (LeaseHeldError while
    another run holds it) and released by the commit; if a step fails it is released too,
    since a new try of ``sync`` reads everything again."""
    if job.lease_epoch is None:
        lease.acquire(job, store)
    try:
        with lease.kept(job, store):
            extract_partner_center(job, pc_side, store)
            extract_crm(job, crm_side, store)
            plan_run(job, store, pc_side, crm_side)
            load_crm(job, crm_side)
            load_partner_center(job, pc_side, crm_side)
            return commit(job, store)
    except BaseException:
        if job.lease_epoch is not None:
            lease.release(job, store)
        raise
