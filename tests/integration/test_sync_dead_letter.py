"""Issue 11, the dead letter (cases 5, 8, 9 and 11), through the sandbox, for both CRMs.

One key scheme (the CRM of the sync, the id of the record the direction reads from, the
direction), so that the next run's retry finds the row; a row clears when its record syncs,
becomes valid or stops being eligible; link stamps are retried until written; an unflagged,
unlinked opportunity with a bad value is skipped, not failed.

Each "later" run moves both watermarks well past the records first, so a record is read
again only because the dead letter asks for it, never because it falls in the 5-minute overlap.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cosell_sandbox.seed import iso
from cosell_sandbox.server import FaultConfig
from cosell_sync.pipeline import SyncJob, commit, read_frame
from cosell_sync.state import StateStore
from tests.integration.test_sync_retries import (
    CRMS,
    crm_link_values,
    new_job,
    run_load_crm,
    run_load_pc,
    seed,
    up_to_load,
)

REFERRALS = "/v1.0/engagements/referrals/"


def crm_server(pc, crm: str):
    return pc.salesforce if crm == "salesforce" else pc.dynamics365


def edit_opportunity(pc, crm: str, crm_id: str, *, notes=None, amount=None, flagged=None) -> None:
    names = (
        {"notes": "Description", "amount": "Amount", "flagged": "PC_Sync_With_Partner_Center__c"}
        if crm == "salesforce"
        else {"notes": "description", "amount": "estimatedvalue", "flagged": "cosell_syncwithpartnercenter"}
    )
    changes = {names[k]: v for k, v in (("notes", notes), ("amount", amount), ("flagged", flagged)) if v is not None}
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_id, changes)
        return
    bad = {k: changes.pop(k) for k in [k for k, v in changes.items() if isinstance(v, int | float) and v < 0]}
    pc.dynamics365.edit("opportunities", crm_id, changes or {"description": "edited"})
    # Dataverse refuses a negative value; a row holding one (an import, a plugin) is put there directly.
    pc.dynamics365.tables["opportunities"][crm_id.lower()].update(bad)


def opportunities(pc, crm: str) -> list[dict]:
    rows = pc.salesforce.list_records("Opportunity") if crm == "salesforce" else pc.dynamics365.rows("opportunities")
    out = []
    for r in rows:
        if crm == "salesforce":
            out.append(
                {
                    "id": str(r["Id"]),
                    "flagged": bool(r.get("PC_Sync_With_Partner_Center__c")),
                    "open": not r.get("IsClosed"),
                    "ref": r.get("PC_Referral_Id__c"),
                }
            )
        else:
            out.append(
                {
                    "id": str(r["opportunityid"]),
                    "flagged": bool(r.get("cosell_syncwithpartnercenter")),
                    "open": r.get("statecode") == 0,
                    "ref": r.get("cosell_referralid"),
                }
            )
    return out


def run(crm: str, store: StateStore, staging, *, during_load_pc=None, later: bool = False) -> tuple[SyncJob, dict]:
    """One whole run; ``during_load_pc`` (a callable returning a cleanup) injects faults around
    load_partner_center; ``later``: both watermarks are moved an hour ahead first."""
    if later:
        ahead = datetime.now(UTC) + timedelta(hours=1)
        for side in ("partner_center", "crm"):
            store.set_watermark(f"cosell_sync_{crm}", side, ahead, "test-move")
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    undo = during_load_pc() if during_load_pc else None
    try:
        run_load_pc(job)
    finally:
        if undo:
            undo()
    return job, commit(job, store)


def rows_for(store: StateStore, crm: str, *ids: str):
    dead = store.dead_letter(crm)
    wanted = {str(i).lower() for i in ids}
    return dead[[str(k).lower() in wanted for k in dead["record_key"]]]


def no_sync_failures(report: dict) -> bool:
    return report["pc_to_crm"]["failed"] == 0 and report["crm_to_pc"]["failed"] == 0


def synced_then_edited_by_a_seller(pc, crm: str, store: StateStore, staging) -> tuple[str, str]:
    """A clean first sync, then a seller's edit of a linked opportunity's notes: (referral id, CRM id)."""
    seed(pc, crm)
    _, first = run(crm, store, staging)
    assert no_sync_failures(first), first
    link = store.get_links(crm).iloc[0]
    rid, crm_id = str(link["referral_id"]), str(link["crm_id"])
    edit_opportunity(pc, crm, crm_id, notes="a seller's notes that must reach Microsoft")
    return rid, crm_id


# -- case 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_failed_crm_to_pc_update_is_retried_outside_the_window(pc, conns, store, tmp_path, crm):
    staging = tmp_path / "staging"
    rid, crm_id = synced_then_edited_by_a_seller(pc, crm, store, staging)

    def refuse_patch():
        pc.partner_center.faults.configure(FaultConfig(rate_5xx=1.0, methods=("PATCH",), path_prefix=REFERRALS + rid))
        return pc.partner_center.faults.clear

    _, second = run(crm, store, staging, during_load_pc=refuse_patch)
    assert second["crm_to_pc"]["failed"] == 1, second
    row = rows_for(store, crm, crm_id)
    assert len(row) == 1 and row["direction"].iloc[0] == "crm_to_pc", store.dead_letter(crm)
    assert pc.partner_center.referrals[rid]["details"].get("notes") != "a seller's notes that must reach Microsoft"

    # The next run starts long after the edit: only the dead letter brings the opportunity back.
    _, third = run(crm, store, staging, later=True)
    assert third["crm_to_pc"]["updated"] == 1 and no_sync_failures(third), third
    assert pc.partner_center.referrals[rid]["details"]["notes"] == "a seller's notes that must reach Microsoft"
    assert store.dead_letter(crm).empty, store.dead_letter(crm)
    _, quiet = run(crm, store, staging, later=True)
    assert quiet["crm_to_pc"]["updated"] == 0 and quiet["pc_to_crm"]["updated"] == 0, quiet


# -- case 8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_failed_external_reference_stamp_is_retried_until_written(pc, conns, store, tmp_path, crm):
    """A referral the CRM just got an opportunity for: its externalReferenceId stamp fails twice,
    then is written by the third run, and the row clears."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    rid = str(read_frame(job, "plan_crm_creates")["referral_id"].iloc[0])

    def refuse_stamp():
        pc.partner_center.faults.configure(FaultConfig(rate_5xx=1.0, methods=("PATCH",), path_prefix=REFERRALS + rid))
        return pc.partner_center.faults.clear

    run_load_crm(job)
    undo = refuse_stamp()
    try:
        run_load_pc(job)
    finally:
        undo()
    commit(job, store)
    crm_id = str(store.get_links(crm, referral_ids=[rid])["crm_id"].iloc[0])
    assert not pc.partner_center.referrals[rid].get("externalReferenceId")
    assert len(rows_for(store, crm, crm_id, rid)) == 1, store.dead_letter(crm)

    run(crm, store, staging, during_load_pc=refuse_stamp, later=True)  # retried, fails again
    assert not pc.partner_center.referrals[rid].get("externalReferenceId")
    row = rows_for(store, crm, crm_id, rid)
    assert len(row) == 1 and int(row["attempts"].iloc[0]) == 2, store.dead_letter(crm)

    _, third = run(crm, store, staging, later=True)
    assert str(pc.partner_center.referrals[rid]["externalReferenceId"]).lower() == crm_id.lower()
    assert no_sync_failures(third), third
    assert store.dead_letter(crm).empty, store.dead_letter(crm)


@pytest.mark.parametrize("crm", CRMS)
def test_failed_crm_referral_id_stamp_is_retried_until_written(pc, conns, store, tmp_path, crm):
    """A referral just created for a flagged opportunity: writing its id to the opportunity
    fails twice, then the third run writes it, and the row clears."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    crm_id = str(read_frame(job, "plan_pc_creates")["crm_id"].iloc[0])
    server = crm_server(pc, crm)

    def refuse_crm_writes():
        server.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=400, methods=("PATCH", "POST")))
        return server.faults.clear

    run_load_crm(job)
    undo = refuse_crm_writes()
    try:
        run_load_pc(job)
    finally:
        undo()
    commit(job, store)
    rid = str(store.get_links(crm, crm_ids=[crm_id])["referral_id"].iloc[0])
    assert not crm_link_values(pc, crm).get(crm_id.lower())
    assert len(rows_for(store, crm, crm_id, rid)) == 1, store.dead_letter(crm)

    run(crm, store, staging, during_load_pc=refuse_crm_writes, later=True)  # retried, fails again
    assert not crm_link_values(pc, crm).get(crm_id.lower())
    row = rows_for(store, crm, crm_id, rid)
    assert len(row) == 1 and int(row["attempts"].iloc[0]) == 2, store.dead_letter(crm)

    _, third = run(crm, store, staging, later=True)
    assert crm_link_values(pc, crm)[crm_id.lower()] == rid
    assert no_sync_failures(third), third
    assert store.dead_letter(crm).empty, store.dead_letter(crm)


# -- case 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_invalid_record_that_is_fixed_syncs_and_its_row_clears(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    staging = tmp_path / "staging"
    _, first = run(crm, store, staging)
    assert no_sync_failures(first), first
    link = store.get_links(crm).iloc[0]
    crm_id = str(link["crm_id"])
    edit_opportunity(pc, crm, crm_id, amount=-5)
    _, second = run(crm, store, staging)
    assert second["crm_to_pc"]["failed"] == 1, second
    assert len(rows_for(store, crm, crm_id)) == 1, store.dead_letter(crm)

    edit_opportunity(pc, crm, crm_id, amount=1234)  # fixed
    _, third = run(crm, store, staging)
    assert no_sync_failures(third), third
    assert pc.partner_center.referrals[link["referral_id"]]["details"]["dealValue"] == 1234
    assert store.dead_letter(crm).empty, store.dead_letter(crm)
    _, quiet = run(crm, store, staging, later=True)
    assert no_sync_failures(quiet), quiet


@pytest.mark.parametrize("crm", CRMS)
def test_row_clears_when_its_opportunity_stops_being_eligible(pc, conns, store, tmp_path, crm):
    """A flagged, unlinked opportunity with a bad value is dead-lettered; once unflagged (still
    bad), it would never sync: the next run, long after the edit, skips it and clears the row."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    run(crm, store, staging)
    opp = next(o for o in opportunities(pc, crm) if not o["flagged"] and o["open"] and not o["ref"])
    edit_opportunity(pc, crm, opp["id"], amount=-5, flagged=True)
    _, second = run(crm, store, staging)
    assert second["crm_to_pc"]["failed"] == 1, second
    assert len(rows_for(store, crm, opp["id"])) == 1, store.dead_letter(crm)

    edit_opportunity(pc, crm, opp["id"], flagged=False)
    _, third = run(crm, store, staging, later=True)
    assert no_sync_failures(third), third
    assert third["skipped"].get("crm.not_flagged", 0) >= 1, third
    assert store.dead_letter(crm).empty, store.dead_letter(crm)


@pytest.mark.parametrize("crm", CRMS)
def test_row_clears_when_its_referral_becomes_closed_unlinked(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    staging = tmp_path / "staging"
    run(crm, store, staging)
    [rid] = pc.partner_center.seed(1, seed=91)
    doc = pc.partner_center.referrals[rid]
    doc.update(status="New", substatus="Pending", updatedDateTime=iso(datetime.now(UTC)))
    doc["details"] = {**doc.get("details", {}), "currency": "dollars"}
    _, second = run(crm, store, staging)
    assert second["pc_to_crm"]["failed"] == 1, second
    assert len(rows_for(store, crm, rid)) == 1, store.dead_letter(crm)

    doc.update(status="Closed", substatus="Declined", updatedDateTime=iso(datetime.now(UTC)))  # still bad
    _, third = run(crm, store, staging, later=True)
    assert no_sync_failures(third), third
    assert third["skipped"].get("partner_center.closed_unlinked", 0) >= 1, third
    assert store.dead_letter(crm).empty, store.dead_letter(crm)


# -- case 11 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_unflagged_unlinked_opportunity_with_a_bad_value_is_skipped_not_failed(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    staging = tmp_path / "staging"
    _, first = run(crm, store, staging)
    assert no_sync_failures(first), first
    opp = next(o for o in opportunities(pc, crm) if not o["flagged"] and o["open"] and not o["ref"])
    edit_opportunity(pc, crm, opp["id"], amount=-5)
    _, second = run(crm, store, staging)
    assert second["crm_to_pc"]["failed"] == 0, second
    assert second["skipped"].get("crm.not_flagged", 0) >= 1, second
    assert rows_for(store, crm, opp["id"]).empty, store.dead_letter(crm)
