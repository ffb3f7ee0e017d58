"""Issue 16, the quiet incremental run: with nothing changed, a scheduled run costs at most 3 read
calls per system and writes nothing, on both CRMs. Each window read's watermark is the server's
time when the read began (its answers' Date header), so the window moves on when nothing
changes instead of re-reading the last burst of changes on every run; nothing is lost for it:
a change by Microsoft, or by a person while a run is between its read and its writes, reaches
the other side in the next run."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
import requests

from cosell_sync.dag_factory import check_mapping, sync_sides
from cosell_sync.hooks.clock import ServerClock, server_clock
from cosell_sync.pipeline import (
    OVERLAP,
    commit,
    extract_crm,
    extract_partner_center,
    load_crm,
    load_partner_center,
    plan_run,
    sync,
    window_job,
)
from cosell_sync.pipeline.extract import _mark
from cosell_sync.sides.partner_center import microsoft_side
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import crm_amount

CRMS = ["salesforce", "dynamics365"]
TOKEN_PATHS = ("/_sandbox", "/services/oauth2/")
_runs = itertools.count(1)


def run(crm: str, store: StateStore, staging) -> dict:
    """One scheduled run as the DAG makes it: ``prepare`` checks the mapping against the CRM's
    metadata (Dataverse's options travel in the spec), then every step."""
    job = window_job(crm, store, staging, f"scheduled__quiet_{next(_runs)}")
    choices = check_mapping(crm, job.mapping)
    return sync(job, *sync_sides(crm, job.mapping, choices or None), store)


def crm_emulator(pc, crm: str):
    return pc.salesforce if crm == "salesforce" else pc.dynamics365


def clear_logs(pc, crm: str) -> None:
    for emulator in (pc.partner_center, crm_emulator(pc, crm)):
        emulator.log.clear()


def calls(emulator) -> dict[str, list[str]]:
    """The API calls an emulator served (no control plane, no token endpoint): reads and writes."""
    served = [r for r in emulator.requests_matching() if not r.path.startswith(TOKEN_PATHS)]
    return {
        "reads": [r.target for r in served if r.method == "GET"],
        "writes": [f"{r.method} {r.target}" for r in served if r.method != "GET"],
    }


def writes_of(report: dict) -> int:
    return sum(report[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))


def microsoft_status(pc, crm: str, crm_id: str):
    if crm == "salesforce":
        return pc.salesforce.get_record("Opportunity", crm_id)["PC_Microsoft_Status__c"]
    return pc.dynamics365.row("opportunities", crm_id)["cosell_microsoftstatus"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("crm", CRMS)
def test_a_quiet_run_reads_at_most_three_calls_per_system_and_a_microsoft_change_still_arrives(
    pc, conns, store, tmp_path, crm
):
    pc.partner_center.seed(210, seed=16)  # three pages of Partner Center's 100
    crm_emulator(pc, crm).seed(opportunities=70, accounts=12, flagged=35, seed=16)
    staging = tmp_path / "staging"
    first = run(crm, store, staging)
    assert first["pc_to_crm"]["created"] > 100 and first["crm_to_pc"]["created"] > 0, first
    assert first["pc_to_crm"]["failed"] == 0 and first["crm_to_pc"]["failed"] == 0, first

    # The next run starts after the overlap (the DAG runs every 15 minutes) and reads back what
    # the first one wrote: every record it created or stamped changed after its read began.
    pc.age(OVERLAP.total_seconds() + 60, store=store, dag_ids=[f"cosell_sync_{crm}"])
    clear_logs(pc, crm)
    second = run(crm, store, staging)
    assert writes_of(second) == 0, second
    assert len(calls(pc.partner_center)["reads"]) >= 3  # its own writes, read back

    # Nothing changed since: the quiet run.
    clear_logs(pc, crm)
    quiet = run(crm, store, staging)
    assert writes_of(quiet) == 0 and quiet["unchanged"] == 0, quiet
    for name, emulator in (("partner_center", pc.partner_center), (crm, crm_emulator(pc, crm))):
        served = calls(emulator)
        assert len(served["reads"]) <= 3, (name, served["reads"])
        assert served["writes"] == [], (name, served["writes"])

    # Microsoft accepts co-selling on one engagement (its own referral changes, not the
    # partner's): the next scheduled run, without any webhook, carries it to the opportunity.
    engagements: dict[str, list[dict]] = {}
    for doc in pc.partner_center.referrals.values():
        engagements.setdefault(doc["engagementId"], []).append(doc)
    cosell = [
        (partner, theirs)
        for docs in engagements.values()
        for partner in docs
        for theirs in docs
        if not microsoft_side(partner) and microsoft_side(theirs) and partner.get("externalReferenceId")
    ]
    assert cosell, "the seed makes co-sell engagements"
    partner, theirs = cosell[0]
    crm_id, stamp = str(partner["externalReferenceId"]), partner["updatedDateTime"]
    assert microsoft_status(pc, crm, crm_id) is None
    requests.post(
        f"{pc.origin('partner_center')}/_sandbox/engagements/{partner['engagementId']}/microsoft",
        json={"action": "accept"},
        verify=str(pc.pki.ca_cert),
        timeout=10,
    ).raise_for_status()
    assert pc.partner_center.referrals[partner["id"]]["updatedDateTime"] == stamp  # the partner's: unchanged
    clear_logs(pc, crm)
    accepted = run(crm, store, staging)
    assert accepted["pc_to_crm"]["updated"] == 1 and accepted["pc_to_crm"]["failed"] == 0, accepted
    assert microsoft_status(pc, crm, crm_id) == "Accepted"
    assert pc.partner_center.referrals[theirs["id"]]["status"] == "Active"
    assert len(calls(pc.partner_center)["reads"]) <= 3  # the window, and that one engagement
    assert calls(pc.partner_center)["writes"] == []

    clear_logs(pc, crm)
    assert writes_of(run(crm, store, staging)) == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("crm", CRMS)
def test_edits_made_between_a_runs_read_and_its_writes_reach_the_other_side_next_run(pc, conns, store, tmp_path, crm):
    """A person edits two referrals while a run is between its read and its writes: one the run
    does not touch, one it writes (another field: its PATCH gets 412, is re-merged and written
    again). Neither edit is in what the run read, and the run's watermark is taken before them:
    the next run reads both and carries them to the CRM."""
    pc.partner_center.seed(40, seed=21)
    crm_emulator(pc, crm).seed(opportunities=20, accounts=8, flagged=8, seed=21)
    staging = tmp_path / "staging"
    run(crm, store, staging)
    pc.age(OVERLAP.total_seconds() + 60, store=store, dag_ids=[f"cosell_sync_{crm}"])
    run(crm, store, staging)

    links = store.get_links(crm)
    open_links = [
        (r, c)
        for r, c in zip(links["referral_id"], links["crm_id"], strict=True)
        if pc.partner_center.referrals[r]["status"] in ("New", "Active")
    ]
    (untouched_ref, untouched_crm), (written_ref, written_crm) = open_links[:2]
    # A CRM user edits the notes of one opportunity: the next run writes them to its referral.
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", written_crm, {"Description": "edited in the CRM"})
    else:
        pc.dynamics365.edit("opportunities", written_crm, {"description": "edited in the CRM"})

    job = window_job(crm, store, staging, f"scheduled__between_{next(_runs)}")
    choices = check_mapping(crm, job.mapping)
    pc_side, crm_side = sync_sides(crm, job.mapping, choices or None)
    extract_partner_center(job, pc_side, store)
    extract_crm(job, crm_side, store)
    plan_run(job, store, pc_side, crm_side)  # reads the referral of the edited opportunity by id
    # Read and planned; nothing written yet. A partner user edits both referrals' deal values.
    for rid, value in ((untouched_ref, 4242.0), (written_ref, 5353.0)):
        doc = pc.partner_center.referrals[rid]
        pc.partner_center._commit_update(doc, {**doc, "details": {**doc["details"], "dealValue": value}}, "User")
    load_crm(job, crm_side)
    load_partner_center(job, pc_side, crm_side)
    report = commit(job, store)
    assert any(r.status == 412 for r in pc.partner_center.requests_matching("PATCH"))  # re-read, re-merged
    assert report["crm_to_pc"]["updated"] == 1 and report["crm_to_pc"]["failed"] == 0, report
    assert pc.partner_center.referrals[written_ref]["details"]["notes"] == "edited in the CRM"
    assert crm_amount(pc, crm, untouched_crm) != 4242.0 and crm_amount(pc, crm, written_crm) != 5353.0

    after = run(crm, store, staging)
    assert after["pc_to_crm"]["updated"] == 2 and after["pc_to_crm"]["failed"] == 0, after
    assert crm_amount(pc, crm, untouched_crm) == 4242.0
    assert crm_amount(pc, crm, written_crm) == 5353.0
    assert pc.partner_center.referrals[written_ref]["details"]["dealValue"] == 5353.0
    assert writes_of(run(crm, store, staging)) == 0


class _Answer:
    def __init__(self, date: str | None) -> None:
        self.headers = {"Date": date} if date is not None else {}


def test_the_watermark_is_the_servers_time_when_the_read_began():
    from cosell_sync.hooks.clock import observe

    with server_clock() as clock:
        for date in ("Mon, 30 Nov 2026 18:00:05 GMT", "Mon, 30 Nov 2026 18:00:02 GMT", None, "garbage"):
            observe(_Answer(date))
    observe(_Answer("Mon, 30 Nov 2026 17:00:00 GMT"))  # outside the block: not observed
    assert clock.earliest == datetime(2026, 11, 30, 18, 0, 2, tzinfo=UTC) and clock.answers == 4
    stamps = ["2026-11-30T18:00:09.1234560Z"]  # a record stamped after the read began
    assert _mark(clock, stamps, None) == "2026-11-30T18:00:02+00:00"
    until = datetime(2026, 11, 30, 17, 59, tzinfo=UTC)  # a bounded window ends at its end
    assert _mark(clock, stamps, until) == until.isoformat()
    # No Date header seen: the newest change read, as before; nothing read: no move.
    assert _mark(ServerClock(), stamps, None) == "2026-11-30T18:00:09.123456+00:00"
    assert _mark(ServerClock(), [], None) is None


def test_the_window_moves_to_the_server_clock_not_the_newest_record(pc, conns, store, tmp_path):
    """A window that reads old records (or nothing) still moves its watermark to the server's time
    when it read, never past it."""
    pc.partner_center.seed(3, seed=5)
    pc.partner_center.age(3600)  # written an hour ago
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    run("salesforce", store, tmp_path / "staging")
    after = datetime.now(UTC)
    mark = store.get_watermark("cosell_sync_salesforce", "partner_center")
    assert before <= mark <= after, (before, mark, after)
    crm_mark = store.get_watermark("cosell_sync_salesforce", "crm")
    assert crm_mark is not None and before <= crm_mark <= after
