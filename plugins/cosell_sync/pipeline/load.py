"""Load: the plan's writes through each side, one result per record, staged for the commit.

The CRM first (creates, then conditional updates), then Partner Center: its creates, the new
links written back to the CRM, its updates, and the ``externalReferenceId`` stamps. Every try
of a load step adds what it wrote to the run's ledger of writes (:data:`WRITES_LEDGER`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cosell_sync.engine.plan import Plan
from cosell_sync.pipeline.job import SyncJob
from cosell_sync.pipeline.plan import load_plan
from cosell_sync.pipeline.report import write_counts
from cosell_sync.pipeline.staging import blank, optional_frame, read_frame, read_json, write_frame, write_json
from cosell_sync.sides.base import WriteResult, results_frame
from cosell_sync.sides.crm import CrmSide
from cosell_sync.sides.partner_center import PartnerCenterSide

WRITES_LEDGER = "writes"  # the staged document counting what every finished try of a load step wrote


def load_crm(job: SyncJob, side: CrmSide) -> dict[str, int]:
    """Creates and updates in the CRM; one result per record, staged for the commit."""
    the_plan = load_plan(job)
    results: list[WriteResult] = []
    if len(the_plan.crm_creates):
        results += side.create(the_plan.crm_creates, job.ctx)
    updates = the_plan.updates("crm")
    if len(updates):
        try:
            versions = read_json(job, "crm_versions")
        except FileNotFoundError:  # extracted by an older version: unconditional
            versions = {}
        results += side.update(updates, job.ctx, versions)
    write_frame(job, "crm_results", results_frame(results))
    if not job.dry_run:
        _count_writes(job, {"crm": write_counts(results_frame(results), pd.DataFrame())})
    return {"ok": sum(r.ok for r in results), "failed": sum(not r.ok for r in results)}


def _count_writes(job: SyncJob, counts: dict[str, dict[str, int]]) -> None:
    """Add one try's writes to the run's ledger: every try of a load step that finished counts
    (a retried or cleared task adds what it wrote again, usually nothing: it adopts)."""
    try:
        ledger = read_json(job, WRITES_LEDGER)
    except FileNotFoundError:
        ledger = {}
    for target, numbers in counts.items():
        held = ledger.setdefault(target, {})
        for key, value in numbers.items():
            held[key] = int(held.get(key, 0)) + int(value)
    write_json(job, WRITES_LEDGER, ledger)


def load_partner_center(job: SyncJob, side: PartnerCenterSide, crm_side: CrmSide) -> dict[str, int]:
    """Creates and updates in Partner Center; new referral ids are written back to the CRM."""
    the_plan = load_plan(job)
    docs = read_json(job, "pc_docs")
    results: list[WriteResult] = []
    created: list[WriteResult] = []
    if len(the_plan.pc_creates):
        # Idempotent across retries: a referral an earlier try created is found and adopted.
        created = side.create(the_plan.pc_creates, job.ctx)
        results += created
    # The new links go to the CRM first, before the updates, so the CRM holds each new referral's
    # id as early as possible; links the CRM lacks (recovered from the records) go with them.
    new_links = pd.DataFrame(
        [{"crm_id": r.crm_id, "referral_id": r.referral_id} for r in created if r.ok and r.referral_id],
        columns=["crm_id", "referral_id"],
        dtype=object,
    )
    new_links = pd.concat([new_links, crm_link_stamps(job, the_plan, set(new_links["crm_id"]))], ignore_index=True)
    link_results = crm_side.write_links(new_links, job.ctx) if len(new_links) else []
    updates = the_plan.updates("partner_center")
    if len(updates):
        results += side.update(updates, job.ctx, docs)
    stamps = referral_stamps(job, the_plan, docs)
    stamp_results = side.write_links(stamps, job.ctx, docs) if len(stamps) else []
    write_frame(job, "pc_results", results_frame(results))
    write_frame(job, "link_results", results_frame(link_results))
    write_frame(job, "pc_link_results", results_frame(stamp_results))
    if not job.dry_run:
        _count_writes(
            job,
            {
                "partner_center": write_counts(results_frame(results), results_frame(stamp_results)),
                "crm": write_counts(pd.DataFrame(), results_frame(link_results)),
            },
        )
    done = results + stamp_results
    return {"ok": sum(r.ok for r in done), "failed": sum(not r.ok for r in done)}


def referral_stamps(job: SyncJob, the_plan: Plan, docs: dict[str, Any]) -> pd.DataFrame:
    """Open referrals whose ``externalReferenceId`` must be set to their opportunity's id: those
    the CRM just got an opportunity for, and linked ones read this run that do not hold it
    (a stamp that failed or was lost in an earlier run)."""
    wanted: dict[str, str] = {}
    crm_results = optional_frame(job, "crm_results", list(results_frame([]).columns))
    for r in crm_results.itertuples():
        if r.action == "create" and r.ok and r.referral_id and r.crm_id:
            wanted[str(r.referral_id)] = str(r.crm_id)
    pc = read_frame(job, "pc")
    linked = dict(run_pairs(the_plan))
    if len(pc) and linked:
        for rid, held in zip(pc["referral_id"], pc["crm_ref"], strict=True):
            if rid in linked and str(held or "").casefold() != str(linked[rid]).casefold():
                wanted.setdefault(str(rid), str(linked[rid]))
    rows = [
        {"referral_id": rid, "crm_id": crm_id}
        for rid, crm_id in wanted.items()
        if (docs.get(rid) or {}).get("status") in ("New", "Active")  # a Closed referral is terminal
    ]
    return pd.DataFrame(rows, columns=["referral_id", "crm_id"], dtype=object)


def run_pairs(the_plan: Plan) -> list[tuple[str, str]]:
    """(referral id, CRM id) of every linked pair this run planned, changed or not (a stamp
    that failed in an earlier run is retried on a pair whose values have not moved)."""
    pairs: dict[str, str] = {}
    frames = [the_plan.new_base, the_plan.changes, the_plan.conflicts, the_plan.skips, the_plan.recovered_links]
    for frame in frames:
        if len(frame) and {"referral_id", "crm_id"} <= set(frame.columns):
            for rid, crm_id in zip(frame["referral_id"], frame["crm_id"], strict=True):
                if not blank(rid) and not blank(crm_id):
                    pairs.setdefault(str(rid), str(crm_id))
    return list(pairs.items())


def crm_link_stamps(job: SyncJob, the_plan: Plan, skip: set[str]) -> pd.DataFrame:
    """Open opportunities whose referral-id field must be set: linked pairs of this run (a link
    recovered from a referral's ``externalReferenceId``, e.g. one created by a run that died
    before it linked it, or a stamp that failed in an earlier run) whose opportunity, read
    this run, does not hold the referral id."""
    crm = read_frame(job, "crm")
    rows = []
    linked = {crm_id: rid for rid, crm_id in run_pairs(the_plan)}
    if len(crm) and linked:
        for crm_id, held, closed in zip(crm["crm_id"], crm["referral_ref"], crm["closed"], strict=True):
            rid = linked.get(crm_id)
            if rid and crm_id not in skip and not closed and str(held or "").casefold() != str(rid).casefold():
                rows.append({"crm_id": str(crm_id), "referral_id": str(rid)})
    return pd.DataFrame(rows, columns=["crm_id", "referral_id"], dtype=object)
