"""Issue 11, cases 1, 4, 7 and 10, and decline vs lose: the base moves only where a target
confirmed the write, both sides of a pair are always merged, audit rows come from each
target's own result, and a CRM loss closes a New referral as Declined.

Each test drives the runner's step functions (the DAG's tasks) against the sandbox and
makes its edit at the moment the race needs it: between extract and load, or after a
backfill's interval.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync import pipeline as runner
from cosell_sync.dag_factory import sync_sides
from cosell_sync.pipeline import SyncJob
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import base_of, crm_amount, scheduled_job, seed

CRMS = ["salesforce", "dynamics365"]


def _job(crm: str, store: StateStore, staging, **kwargs) -> SyncJob:
    return scheduled_job(crm, store, staging, prefix="manual", **kwargs)


def _run(job: SyncJob, store: StateStore, *, before_load_pc=None) -> dict:
    """Every step of ``job``; ``before_load_pc`` runs between load_crm and load_partner_center."""
    pc_side, crm_side = sync_sides(job.crm, job.mapping)
    runner.extract_partner_center(job, pc_side, store)
    runner.extract_crm(job, crm_side, store)
    runner.plan_run(job, store, pc_side, crm_side)
    runner.load_crm(job, crm_side)
    if before_load_pc is not None:
        before_load_pc()
    runner.load_partner_center(job, pc_side, crm_side)
    return runner.commit(job, store)


def _linked(pc, store: StateStore, crm: str, status: str = "Active"):
    for row in store.get_links(crm).itertuples():
        ref = pc.partner_center.referrals[row.referral_id]
        if ref["direction"] == "Incoming" and ref["status"] == status:
            return row
    raise AssertionError(f"no linked incoming {status} referral")


def _edit_referral(pc, referral_id: str, **details) -> None:
    ref = pc.partner_center.referrals[referral_id]
    pc.partner_center._commit_update(ref, {**ref, "details": {**ref["details"], **details}}, "Microsoft")


def _seller_sets_amount(pc, crm: str, crm_id: str, amount: float) -> None:
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_id, {"Amount": amount})
    else:
        pc.dynamics365.edit("opportunities", crm_id, {"estimatedvalue": amount})


def _audit(store: StateStore, crm: str, referral_id: str, run_id: str):
    return store.audit(crm=crm, referral_id=referral_id, run_id=run_id)


def _conflict_winners(store: StateStore, crm: str, referral_id: str, field: str) -> list[str]:
    rows = store.audit(crm=crm, referral_id=referral_id, action="conflict")
    return [d.rsplit("; ", 1)[1].removesuffix(" wins") for d in rows[rows["field"] == field]["detail"]]


@pytest.mark.parametrize("crm", CRMS)
def test_case_1_a_field_dropped_by_the_412_re_merge_keeps_its_base_and_is_settled_next_run(
    pc, conns, store, tmp_path, crm
):
    """A seller's Amount (authority: CRM) is on its way to Partner Center when a Microsoft seller
    changes the deal value: the PATCH gets 412, the re-merge drops the field. Its base must not
    move and it must not be audited as written; the next run sees both edits, settles the
    conflict by authority (the CRM wins) and writes it."""
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    first = _run(_job(crm, store, staging), store)
    assert first["pc_to_crm"]["failed"] == 0, first
    row = _linked(pc, store, crm)
    base_before = base_of(store, crm, row.referral_id)["deal_value"]

    _seller_sets_amount(pc, crm, row.crm_id, 5000.0)
    job = _job(crm, store, staging)
    report = _run(job, store, before_load_pc=lambda: _edit_referral(pc, row.referral_id, dealValue=7000.0))

    assert report["crm_to_pc"]["deferred"] == 1, report
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 7000.0  # not overwritten blind
    assert base_of(store, crm, row.referral_id)["deal_value"] == base_before  # not written: the base stays
    audit = _audit(store, crm, row.referral_id, job.run_id)
    deal = audit[audit["field"] == "deal_value"]
    assert list(deal["action"]) == ["deferred"], audit  # never audited as written
    assert "changed since it was read" in deal["detail"].iloc[0]

    second = _job(crm, store, staging)
    _run(second, store)
    assert _conflict_winners(store, crm, row.referral_id, "deal_value") == ["crm"]
    assert crm_amount(pc, crm, row.crm_id) == 5000.0  # the seller's edit won by authority: kept
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 5000.0
    assert base_of(store, crm, row.referral_id)["deal_value"] == 5000.0


@pytest.mark.parametrize("crm", CRMS)
def test_case_4_a_backfill_merges_against_the_current_crm_record_outside_its_interval(pc, conns, store, tmp_path, crm):
    """A backfill's interval holds a Microsoft edit of the deal value; the seller edited the
    opportunity's Amount after the interval. The opportunity is read by id, so the merge sees
    both edits and the CRM's (authority: CRM) is kept, not overwritten by the older one."""
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    row = _linked(pc, store, crm)
    time.sleep(1.1)
    start = datetime.now(UTC)
    _edit_referral(pc, row.referral_id, dealValue=3100.0)
    time.sleep(1.1)
    end = datetime.now(UTC)
    time.sleep(1.1)
    _seller_sets_amount(pc, crm, row.crm_id, 6200.0)

    backfill = scheduled_job(
        crm, store, staging, prefix="manual", since_pc=start, since_crm=start, until=end, backfill=True
    )
    _run(backfill, store)
    assert runner.read_frame(backfill, "crm")["crm_id"].str.casefold().tolist() == [row.crm_id.casefold()]
    assert crm_amount(pc, crm, row.crm_id) == 6200.0  # the newer seller edit survives
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 6200.0
    assert _conflict_winners(store, crm, row.referral_id, "deal_value") == ["crm"]


def test_case_4_an_event_run_reads_the_linked_opportunity_even_when_it_lost_its_referral_id(pc, conns, store, tmp_path):
    """An event run reads opportunities by referral id; one whose referral-id field was
    cleared is still read through its link (and the stamp written back), never taken as
    unchanged."""
    crm = "salesforce"
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    row = _linked(pc, store, crm)
    pc.salesforce.user_edit("Opportunity", row.crm_id, {"PC_Referral_Id__c": None, "Amount": 4321.0})
    _edit_referral(pc, row.referral_id, notes="event edit")

    event = scheduled_job(
        crm, store, staging, prefix="manual", since_pc=None, since_crm=None, referral_ids=[row.referral_id]
    )
    _run(event, store)
    opportunity = pc.salesforce.get_record("Opportunity", row.crm_id)
    assert opportunity["Description"] == "event edit"
    assert opportunity["PC_Referral_Id__c"] == row.referral_id  # the stamp is back
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 4321.0  # both edits merged


def test_case_7_a_close_date_salesforce_filled_in_is_the_base_and_never_sent_to_microsoft(pc, conns, store, tmp_path):
    crm = "salesforce"
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    target = next(
        r for r in pc.partner_center.referrals.values() if r["direction"] == "Incoming" and r["status"] == "New"
    )
    details = {k: v for k, v in target["details"].items() if k != "closingDateTime"}
    pc.partner_center._commit_update(target, {**target, "details": details}, "Microsoft")
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    link = store.get_links(crm, referral_ids=[target["id"]]).iloc[0]
    invented = pc.salesforce.get_record("Opportunity", link.crm_id)["CloseDate"]
    assert invented and link.base["close_date"] == invented  # the base is what was written

    pc.salesforce.user_edit("Opportunity", link.crm_id, {"Description": "seller note"})
    again = _job(crm, store, staging)
    _run(again, store)
    referral = pc.partner_center.referrals[target["id"]]
    assert referral["details"].get("notes") == "seller note"  # the pair did sync ...
    assert "closingDateTime" not in referral["details"] or referral["details"]["closingDateTime"] is None
    changes = runner.load_plan(again).changes
    assert "close_date" not in set(changes["field"]), changes  # ... without the invented date

    # A date Microsoft sets later still reaches the CRM.
    _edit_referral(pc, target["id"], closingDateTime="2031-05-17T00:00:00Z")
    _run(_job(crm, store, staging), store)
    assert pc.salesforce.get_record("Opportunity", link.crm_id)["CloseDate"] == "2031-05-17"


@pytest.mark.parametrize("crm", CRMS)
def test_case_10_a_failed_partner_center_write_is_not_audited_as_an_update(pc, conns, store, tmp_path, crm):
    """Both directions change one pair; the CRM write lands, the Partner Center PATCH is refused.
    Only the CRM's field is audited as updated; the referral's is a failure, and its base stays."""
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    row = _linked(pc, store, crm)
    before = base_of(store, crm, row.referral_id)
    _edit_referral(pc, row.referral_id, notes="from Microsoft")
    _seller_sets_amount(pc, crm, row.crm_id, 8100.0)

    job = _job(crm, store, staging)
    pc.partner_center.faults.configure(
        FaultConfig(rate_5xx=1.0, methods=("PATCH",), path_prefix=f"/v1.0/engagements/referrals/{row.referral_id}")
    )
    try:
        report = _run(job, store)
    finally:
        pc.partner_center.faults.clear()
    assert report["crm_to_pc"]["failed"] == 1, report
    audit = _audit(store, crm, row.referral_id, job.run_id)
    updated = audit[audit["action"] == "update"]
    assert updated["field"].tolist() == ["notes"], audit  # the CRM's write, and only it
    assert updated["direction"].tolist() == ["pc_to_crm"]
    assert audit[audit["action"] == "fail"]["direction"].tolist() == ["crm_to_pc"], audit
    assert base_of(store, crm, row.referral_id)["deal_value"] == before["deal_value"]


def test_case_10_dynamics_won_is_audited(pc, conns, store, tmp_path):
    crm = "dynamics365"
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    row = _linked(pc, store, crm)
    ref = pc.partner_center.referrals[row.referral_id]
    pc.partner_center._commit_update(ref, {**ref, "status": "Closed", "substatus": "Won"}, "Microsoft")

    job = _job(crm, store, staging)
    report = _run(job, store)
    assert report["pc_to_crm"]["updated"] == 1, report
    assert pc.dynamics365.row("opportunities", row.crm_id)["statecode"] == 1
    audit = _audit(store, crm, row.referral_id, job.run_id)
    won = audit[audit["field"] == "stage"]
    assert won[["action", "new_value"]].values.tolist() == [["win", "won"]], audit


@pytest.mark.parametrize(
    ("status", "substatus", "closed_as"), [("New", "Pending", "Declined"), ("Active", "Accepted", "Lost")]
)
def test_a_crm_loss_declines_a_new_referral_and_loses_an_active_one(
    pc, conns, store, tmp_path, status, substatus, closed_as
):
    crm = "salesforce"
    seed(pc, crm, referrals=10, opportunities=4, accounts=2, flagged=1, seed=83)
    staging = tmp_path / "staging"
    _run(_job(crm, store, staging), store)
    row = _linked(pc, store, crm, status=status)
    assert pc.partner_center.referrals[row.referral_id]["substatus"] == substatus
    pc.salesforce.user_edit("Opportunity", row.crm_id, {"StageName": "Closed Lost"})

    _run(_job(crm, store, staging), store)
    referral = pc.partner_center.referrals[row.referral_id]
    assert (referral["status"], referral["substatus"]) == ("Closed", closed_as)
    assert base_of(store, crm, row.referral_id)["stage"] == "lost"
    assert _run(_job(crm, store, staging), store)["crm_to_pc"]["updated"] == 0  # settled: no echo
