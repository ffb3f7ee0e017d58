"""What the sync-step tests share: the sides a task builds (whose retries never really sleep)
and the jobs of a scheduled, manual, backfill or event-driven run."""

from __future__ import annotations

import itertools
from typing import Any

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.hooks.salesforce import SalesforceSyncHook
from cosell_sync.pipeline import SyncJob, window_job
from cosell_sync.sides.dynamics365 import DynamicsSide
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.sides.salesforce import SalesforceSide
from cosell_sync.state import StateStore

EVENTS = "cosell_referral_events"
_runs = itertools.count(1)


def no_sleep(_seconds: float) -> None:
    return None


def quiet_sides(crm: str, mapping: Any) -> tuple[PartnerCenterSide, Any]:
    """Fresh sides with new hooks, as each task builds them; retries do not really sleep."""
    pc_side = PartnerCenterSide(PartnerCenterHook(sleep=no_sleep), mapping)
    if crm == "salesforce":
        return pc_side, SalesforceSide(SalesforceSyncHook(sleep=no_sleep), mapping)
    return pc_side, DynamicsSide(DynamicsHook(sleep=no_sleep), mapping)


def scheduled_job(crm: str, store: StateStore, staging: Any, *, prefix: str = "scheduled", **kwargs: Any) -> SyncJob:
    """A run of ``cosell_sync_<crm>`` whose window starts at the committed watermarks (as
    ``prepare`` reads them); ``kwargs`` override any field (a backfill's interval ...)."""
    return window_job(crm, store, staging, f"{prefix}__{next(_runs)}", **kwargs)


def event_job(crm: str, staging: Any, referral_ids: list[str]) -> SyncJob:
    """The webhook DAG's run for ``referral_ids``."""
    return SyncJob(
        crm=crm,
        dag_id=f"{EVENTS}.{crm}",
        run_id=f"asset_triggered__{next(_runs)}",
        mapping=load_mapping(crm),
        staging=staging,
        referral_ids=list(referral_ids),
    )


def seed(pc: Any, crm: str, *, referrals: int, opportunities: int, accounts: int, flagged: int, seed: int) -> None:
    """Referrals in Partner Center and opportunities in the CRM's emulator."""
    pc.partner_center.seed(referrals, seed=seed)
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    emulator.seed(opportunities=opportunities, accounts=accounts, flagged=flagged, seed=seed)


def crm_amount(pc: Any, crm: str, crm_id: str) -> float:
    """The opportunity's amount as the CRM holds it."""
    if crm == "salesforce":
        return pc.salesforce.get_record("Opportunity", crm_id)["Amount"]
    return pc.dynamics365.row("opportunities", crm_id)["estimatedvalue"]


def base_of(store: StateStore, crm: str, referral_id: str) -> dict:
    """The link's base: the values last synced."""
    return store.get_links(crm, referral_ids=[referral_id])["base"].iloc[0]
