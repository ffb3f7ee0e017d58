"""Plan: the run's staged extracts planned against the links' bases, and the plan staged.

The planner itself is pure (:mod:`cosell_sync.engine.plan`); this step feeds it, holds back
creates that lack a required field, adds the never-sync skips and stages every part.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cosell_sync.engine.normalize import ERROR_COLUMNS, concat_errors, incomplete_creates
from cosell_sync.engine.plan import Plan, plan
from cosell_sync.pipeline.extract import dead_letter_notes, fetch_counterparts
from cosell_sync.pipeline.job import SyncJob
from cosell_sync.pipeline.staging import optional_frame, read_frame, write_frame, write_json
from cosell_sync.sides.crm import CrmSide
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.state import StateStore

PLAN_PARTS = (
    "crm_creates",
    "pc_creates",
    "changes",
    "conflicts",
    "skips",
    "new_base",
    "recovered_links",
)


def plan_run(job: SyncJob, store: StateStore, pc_side: PartnerCenterSide, crm_side: CrmSide) -> dict[str, Any]:
    """Fetch the missing side of the run's pairs (:func:`fetch_counterparts`), then plan."""
    fetch_counterparts(job, pc_side, crm_side, store)
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    for frame, column in ((pc, "updated_at"), (crm, "modified_at")):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    ids = list(pc["referral_id"]) + [r for r in crm["referral_ref"] if r]
    # The bases as one column per field (decoded from the state DB in one pass, not a dict per link).
    links = store.get_links(job.crm, referral_ids=ids, crm_ids=list(crm["crm_id"]), columnar=True)
    result = plan(pc, crm, links, job.mapping, directions=job.directions)
    # A planned create lacking a ``required:`` field is an error for its record, not a create
    # (staged apart from the extracts' errors, so a retried plan step does not add them twice).
    blocked_all = []
    for part, key, staged in (("crm_creates", "referral_id", "pc"), ("pc_creates", "crm_id", "crm")):
        lacking = optional_frame(job, f"{staged}_create_errors", ERROR_COLUMNS)
        kept, blocked = incomplete_creates(getattr(result, part), key, lacking)
        if len(blocked):
            setattr(result, part, kept)
            blocked_all.append(blocked)
    write_frame(job, "plan_errors", concat_errors(blocked_all))
    result.skips = _never_sync_skips(job, store, pc, crm, result.skips)
    for part in PLAN_PARTS:
        write_frame(job, f"plan_{part}", getattr(result, part))
    summary = result.summary()
    write_json(job, "plan_summary", summary)
    return summary


def _never_sync_skips(
    job: SyncJob, store: StateStore, pc: pd.DataFrame, crm: pd.DataFrame, skips: pd.DataFrame
) -> pd.DataFrame:
    """Records with a bad value that would never sync, as skips (the plan never saw them): an
    unflagged opportunity and a Closed referral, when nothing links them (no link in the state
    DB, no record of this run naming them)."""
    lone_crm = dead_letter_notes(job, "crm")["never_sync"]
    lone_pc = dead_letter_notes(job, "pc")["never_sync"]
    if not lone_crm and not lone_pc:
        return skips
    links = store.get_links(job.crm, referral_ids=lone_pc, crm_ids=lone_crm)
    linked_crm = {str(v).casefold() for v in links["crm_id"]} | {str(v).casefold() for v in pc["crm_ref"] if v}
    linked_pc = {str(v).casefold() for v in links["referral_id"]} | {
        str(v).casefold() for v in crm["referral_ref"] if v
    }
    rows = [
        {"side": "crm", "referral_id": None, "crm_id": k, "reason": "not_flagged", "field": None, "detail": None}
        for k in lone_crm
        if k.casefold() not in linked_crm
    ] + [
        {
            "side": "partner_center",
            "referral_id": k,
            "crm_id": None,
            "reason": "closed_unlinked",
            "field": None,
            "detail": None,
        }
        for k in lone_pc
        if k.casefold() not in linked_pc
    ]
    if not rows:
        return skips
    extra = pd.DataFrame(rows, columns=list(skips.columns), dtype=object)
    return pd.concat([skips, extra], ignore_index=True) if len(skips) else extra


def load_plan(job: SyncJob) -> Plan:
    parts = {part: read_frame(job, f"plan_{part}") for part in PLAN_PARTS}
    return Plan(**parts)
