"""A whole sync, step by step (the steps the DAG's tasks run), against the sandbox, for both CRMs."""

from __future__ import annotations

import itertools

import pytest

from cosell_sync.dag_factory import sync_sides
from cosell_sync.pipeline import sync, window_job
from cosell_sync.state import StateStore

_runs = itertools.count(1)


def run_sync(crm: str, store: StateStore, staging, **job_kwargs) -> dict:
    job = window_job(crm, store, staging, f"manual__{next(_runs)}", **job_kwargs)
    return sync(job, *sync_sides(crm, job.mapping), store)


def seed(pc, crm: str) -> None:
    pc.partner_center.seed(40, seed=21)
    if crm == "salesforce":
        pc.salesforce.seed(opportunities=20, accounts=8, flagged=8, seed=21)
    else:
        pc.dynamics365.seed(opportunities=20, accounts=8, flagged=8, seed=21)


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_first_sync_then_idempotent_then_edits_both_ways(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    open_refs = [d for d in pc.partner_center.referrals.values() if d["status"] in ("New", "Active")]
    first = run_sync(crm, store, tmp_path / "staging")
    assert first["pc_to_crm"]["failed"] == 0, first
    assert first["pc_to_crm"]["created"] == len(open_refs), first
    assert first["crm_to_pc"]["created"] >= 1 and first["crm_to_pc"]["failed"] == 0
    links = store.get_links(crm)
    assert len(links) == first["pc_to_crm"]["created"] + first["crm_to_pc"]["created"]
    assert links["crm_id"].is_unique and links["referral_id"].is_unique

    second = run_sync(crm, store, tmp_path / "staging")
    writes = sum(second[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))
    assert writes == 0, second

    # A Microsoft seller changes a deal value; a CRM user edits another opportunity's notes.
    link = links.iloc[0]
    ms_ref = pc.partner_center.referrals[link["referral_id"]]
    pc.partner_center._commit_update(
        ms_ref, {**ms_ref, "details": {**ms_ref["details"], "dealValue": 31337.0}}, "Microsoft"
    )
    other = links.iloc[1]
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", other["crm_id"], {"Description": "edited in Salesforce"})
    else:
        pc.dynamics365.edit("opportunities", other["crm_id"], {"description": "edited in Dynamics"})
    third = run_sync(crm, store, tmp_path / "staging")
    assert third["pc_to_crm"]["updated"] == 1 and third["crm_to_pc"]["updated"] == 1, third
    assert pc.partner_center.referrals[other["referral_id"]]["details"]["notes"].startswith("edited in")
    if crm == "salesforce":
        assert pc.salesforce.get_record("Opportunity", link["crm_id"])["Amount"] == 31337.0
    else:
        assert pc.dynamics365.row("opportunities", link["crm_id"])["estimatedvalue"] == 31337.0
    audit = store.audit(crm=crm, action="update")
    assert {(a.field, a.direction) for a in audit.itertuples()} >= {("deal_value", "pc_to_crm"), ("notes", "crm_to_pc")}

    fourth = run_sync(crm, store, tmp_path / "staging")
    writes = sum(fourth[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))
    assert writes == 0, fourth
