"""Issue 12, case 5: the report counts the writes actually made, per target, across the tries
of a run (a retried load adds what it wrote; what it found done already is *recovered*, not
written again), and it matches the emulators' request logs."""

from __future__ import annotations

import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync import pipeline as runner
from cosell_sync.pipeline import format_report
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import quiet_sides, scheduled_job, seed

CRMS = ["salesforce", "dynamics365"]
REFERRALS = "/v1.0/engagements/referrals"


def _pc_writes(pc, since: float) -> dict[str, int]:
    """Successful writes Partner Center received after ``since``: POSTs (creates) and PATCHes."""
    log = [e for e in pc.partner_center.log if e.at >= since and 200 <= e.status < 300 and not e.fault]
    return {
        "POST": sum(1 for e in log if e.method == "POST" and e.path.startswith(REFERRALS)),
        "PATCH": sum(1 for e in log if e.method == "PATCH" and e.path.startswith(REFERRALS)),
    }


def _opportunities(pc, crm: str) -> list[dict]:
    return pc.salesforce.list_records("Opportunity") if crm == "salesforce" else pc.dynamics365.rows("opportunities")


def _run(job, store: StateStore, *, retry_loads: bool = False) -> dict:
    pc_side, crm_side = quiet_sides(job.crm, job.mapping)
    runner.extract_partner_center(job, pc_side, store)
    runner.extract_crm(job, crm_side, store)
    runner.plan_run(job, store, pc_side, crm_side)
    runner.load_crm(job, crm_side)
    if retry_loads:  # Airflow retries the task (or a person clears it)
        runner.load_crm(job, quiet_sides(job.crm, job.mapping)[1])
    runner.load_partner_center(job, pc_side, crm_side)
    if retry_loads:
        runner.load_partner_center(job, *quiet_sides(job.crm, job.mapping))
    return runner.commit(job, store)


@pytest.mark.parametrize("crm", CRMS)
def test_the_report_counts_the_writes_made_across_retries_and_matches_the_request_logs(pc, conns, store, tmp_path, crm):
    seed(pc, crm, referrals=14, opportunities=10, accounts=4, flagged=5, seed=7)
    staging = tmp_path / "staging"
    opportunities_before = len(_opportunities(pc, crm))
    since = pc.partner_center.log[-1].at if pc.partner_center.log else 0.0
    pc.partner_center.faults.configure(FaultConfig(seed=3, rate_5xx=0.2, rate_429=0.1, retry_after=0.0))
    try:
        first = _run(scheduled_job(crm, store, staging, prefix="manual"), store, retry_loads=True)
    finally:
        pc.partner_center.faults.clear()
    writes = first["writes"]
    made = _pc_writes(pc, since)
    opportunities_created = len(_opportunities(pc, crm)) - opportunities_before

    # Partner Center: each referral created once (the retry adopted them: recovered, not written
    # again), each new opportunity's id stamped once; the report says exactly what the log shows.
    # Each POST is a referral created, or a co-sell request to Microsoft in its engagement.
    assert writes["partner_center"]["created"] == first["crm_to_pc"]["created"] > 0, first
    assert writes["partner_center"]["created"] + writes["partner_center"]["asked_microsoft"] == made["POST"], made
    assert first["crm_to_pc"]["recovered"] == first["crm_to_pc"]["created"]  # the retry found them all
    assert writes["partner_center"]["updated"] + writes["partner_center"]["linked"] == made["PATCH"], (writes, made)
    # The CRM: the new opportunities, and the referral id stamped on those that became referrals.
    assert writes["crm"]["created"] == opportunities_created == first["pc_to_crm"]["created"] > 0, first
    assert first["pc_to_crm"]["recovered"] == first["pc_to_crm"]["created"]
    assert writes["crm"]["linked"] == first["crm_to_pc"]["created"]
    note = format_report("cosell_sync_" + crm, first, crm)
    assert f"Partner Center {writes['partner_center']['total']} (" in note and "Recovered: " in note, note

    # A quiet run writes nothing and says so.
    since = pc.partner_center.log[-1].at
    quiet = _run(scheduled_job(crm, store, staging, prefix="manual"), store)
    assert quiet["writes"]["partner_center"]["total"] == quiet["writes"]["crm"]["total"] == 0, quiet
    assert _pc_writes(pc, since) == {"POST": 0, "PATCH": 0}
