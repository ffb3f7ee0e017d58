"""Issue 11, case 6: creates are idempotent across Airflow task retries and cleared tasks,
and per-record failures in the Partner Center write path stay per record.

Each test drives the runner's step functions (the DAG's tasks) against the sandbox, for
both CRMs, and runs a load step a second time the way Airflow does after a retry, a
"Clear task", or a worker killed in the middle of the step.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from datetime import UTC, datetime

import pytest

from cosell_sandbox.seed import iso
from cosell_sandbox.server import FaultConfig
from cosell_sync.dag_factory import sync_sides
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.pipeline import (
    SyncJob,
    commit,
    extract_crm,
    extract_partner_center,
    load_crm,
    load_partner_center,
    plan_run,
    read_frame,
)
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import scheduled_job

CRMS = ["salesforce", "dynamics365"]
_runs = itertools.count(1)


class Killed(BaseException):
    """Stands in for a SIGKILL of the task process: nothing after it runs, nothing catches it."""


def seed(pc, crm: str) -> None:
    pc.partner_center.seed(12, seed=61)
    if crm == "salesforce":
        pc.salesforce.seed(opportunities=14, accounts=5, flagged=8, seed=61)
    else:
        pc.dynamics365.seed(opportunities=14, accounts=5, flagged=8, seed=61)


def new_job(crm: str, store: StateStore, staging) -> SyncJob:
    """A manual run of ``cosell_sync_<crm>`` from the committed watermarks."""
    return scheduled_job(crm, store, staging, prefix="manual")


def sides(crm: str, mapping):
    """Fresh sides (new hooks), as a retried task builds them; no real sleeping on 5xx."""
    _, crm_side = sync_sides(crm, mapping)
    return PartnerCenterSide(PartnerCenterHook(sleep=lambda _s: None), mapping), crm_side


def up_to_load(job: SyncJob, store: StateStore) -> None:
    pc_side, crm_side = sides(job.crm, job.mapping)
    extract_partner_center(job, pc_side, store)
    extract_crm(job, crm_side, store)
    plan_run(job, store, pc_side, crm_side)


def run_load_pc(job: SyncJob) -> dict:
    return load_partner_center(job, *sides(job.crm, job.mapping))


def run_load_crm(job: SyncJob) -> dict:
    return load_crm(job, sides(job.crm, job.mapping)[1])


def referrals_by_ext(pc) -> Counter:
    return Counter(str(d.get("externalReferenceId") or "").lower() for d in pc.partner_center.referrals.values())


def crm_link_values(pc, crm: str) -> dict[str, str | None]:
    """CRM id (lower case) -> the referral id its link field holds."""
    if crm == "salesforce":
        return {r["Id"].lower(): r.get("PC_Referral_Id__c") for r in pc.salesforce.list_records("Opportunity")}
    return {r["opportunityid"].lower(): r.get("cosell_referralid") for r in pc.dynamics365.rows("opportunities")}


def crm_audits(pc, crm: str) -> dict[str, str | None]:
    """CRM id -> the audit field of each opportunity."""
    if crm == "salesforce":
        return {r["Id"]: r.get("PC_Audit__c") for r in pc.salesforce.list_records("Opportunity")}
    return {r["opportunityid"]: r.get("cosell_audit") for r in pc.dynamics365.rows("opportunities")}


def crm_counts(pc, crm: str) -> dict[str, int]:
    if crm == "salesforce":
        objects = ("Opportunity", "Account", "Contact", "OpportunityContactRole")
        return {o: len(pc.salesforce.list_records(o)) for o in objects}
    return {s: len(pc.dynamics365.rows(s)) for s in ("opportunities", "accounts", "contacts")}


def opportunities_by_referral(pc, crm: str) -> Counter:
    return Counter(str(v).lower() for v in crm_link_values(pc, crm).values() if v)


def assert_created_once_and_linked(pc, crm: str, store: StateStore, crm_ids: list[str]) -> None:
    """Exactly one referral per opportunity in ``crm_ids``, linked on both sides and in the state DB."""
    assert crm_ids, "the plan had no referral to create"
    by_ext = referrals_by_ext(pc)
    assert {c: by_ext[c.lower()] for c in crm_ids} == dict.fromkeys(crm_ids, 1)
    assert max(c for e, c in by_ext.items() if e) == 1, "a duplicate referral"
    held = crm_link_values(pc, crm)
    links = store.get_links(crm)
    linked = {str(c).lower(): str(r) for c, r in zip(links["crm_id"], links["referral_id"], strict=True)}
    ref_of = {str(d.get("externalReferenceId")).lower(): d["id"] for d in pc.partner_center.referrals.values()}
    for crm_id in crm_ids:
        rid = ref_of[crm_id.lower()]
        assert held[crm_id.lower()] == rid, crm_id  # the CRM holds the referral id
        assert linked.get(crm_id.lower()) == rid, crm_id  # the run committed the link


def assert_quiet(crm: str, store: StateStore, staging) -> None:
    """A further full run creates nothing and fails nothing."""
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    run_load_pc(job)
    report = commit(job, store)
    for direction in ("pc_to_crm", "crm_to_pc"):
        assert report[direction]["created"] == 0 and report[direction]["failed"] == 0, report


def flag_one_more(pc, crm: str) -> str:
    """Set the sync flag on an open, unflagged, unlinked opportunity; returns its id."""
    if crm == "salesforce":
        opp = next(
            r
            for r in pc.salesforce.list_records("Opportunity")
            if not r.get("PC_Sync_With_Partner_Center__c") and not r.get("IsClosed") and not r.get("PC_Referral_Id__c")
        )
        pc.salesforce.user_edit("Opportunity", opp["Id"], {"PC_Sync_With_Partner_Center__c": True})
        return str(opp["Id"])
    opp = next(
        r
        for r in pc.dynamics365.rows("opportunities")
        if not r.get("cosell_syncwithpartnercenter") and r.get("statecode") == 0 and not r.get("cosell_referralid")
    )
    pc.dynamics365.edit("opportunities", opp["opportunityid"], {"cosell_syncwithpartnercenter": True})
    return str(opp["opportunityid"])


# -- (a) a retried or cleared load_partner_center ----------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_retried_and_cleared_load_partner_center_creates_each_referral_once(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(c) for c in read_frame(job, "plan_pc_creates")["crm_id"]]
    run_load_crm(job)
    first = run_load_pc(job)
    assert first["failed"] == 0, first
    before = len(pc.partner_center.referrals)
    audits = crm_audits(pc, crm)
    stamped = {d["id"]: d["updatedDateTime"] for d in pc.partner_center.referrals.values()}

    again = run_load_pc(job)  # Airflow retries the task (or a person clears it) before the commit
    assert again["failed"] == 0, again
    assert len(pc.partner_center.referrals) == before
    # Nothing the first try wrote is written again: no referral changed, no second audit line.
    assert {d["id"]: d["updatedDateTime"] for d in pc.partner_center.referrals.values()} == stamped
    assert crm_audits(pc, crm) == audits
    report = commit(job, store)
    assert report["crm_to_pc"]["created"] == len(planned) and report["crm_to_pc"]["failed"] == 0, report
    assert_created_once_and_linked(pc, crm, store, planned)

    run_load_pc(job)  # "Clear task" after the run succeeded: load and commit run again
    commit(job, store)
    assert len(pc.partner_center.referrals) == before
    assert_created_once_and_linked(pc, crm, store, planned)
    assert_quiet(crm, store, staging)


# -- (b) a worker killed in the middle of load_partner_center ----------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_killed_load_partner_center_is_retried_without_duplicates(pc, conns, store, tmp_path, crm, monkeypatch):
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(c) for c in read_frame(job, "plan_pc_creates")["crm_id"]]
    assert len(planned) >= 4
    run_load_crm(job)

    real_create = PartnerCenterHook.create_referral
    lock, calls = threading.Lock(), itertools.count(1)

    def dying_create(self, referral, **kwargs):
        with lock:
            n = next(calls)
        if n > 3:
            raise Killed  # the process is gone: no POST
        answer = real_create(self, referral, **kwargs)
        if n == 3:
            raise Killed  # the POST landed, the answer was lost with the process
        return answer

    monkeypatch.setattr(PartnerCenterHook, "create_referral", dying_create)
    with pytest.raises(Killed):
        run_load_pc(job)
    monkeypatch.setattr(PartnerCenterHook, "create_referral", real_create)
    assert 1 <= len([e for e in referrals_by_ext(pc) if e in {c.lower() for c in planned}]) < len(planned)

    retry = run_load_pc(job)  # Airflow's retry of the killed task, then the rest of the run
    assert retry["failed"] == 0, retry
    commit(job, store)
    assert_created_once_and_linked(pc, crm, store, planned)
    assert_quiet(crm, store, staging)


@pytest.mark.parametrize("crm", CRMS)
def test_referrals_orphaned_by_a_run_that_never_committed_are_adopted(pc, conns, store, tmp_path, crm):
    """A run whose load_partner_center created referrals but which never got to link or commit
    them (killed, and its retries used up): the next run links those referrals instead of
    creating second ones."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(c) for c in read_frame(job, "plan_pc_creates")["crm_id"]]
    pc_side, _ = sides(crm, job.mapping)
    pc_side.create(read_frame(job, "plan_pc_creates"), job.ctx)  # the POSTs landed; nothing else happened
    before = len(pc.partner_center.referrals)

    nxt = new_job(crm, store, staging)  # no watermark was committed: the next run reads everything
    up_to_load(nxt, store)
    run_load_crm(nxt)
    run_load_pc(nxt)
    commit(nxt, store)
    assert len(pc.partner_center.referrals) == before
    assert_created_once_and_linked(pc, crm, store, planned)
    assert_quiet(crm, store, staging)


@pytest.mark.parametrize("crm", CRMS)
def test_a_run_that_stopped_after_load_crm_leaves_no_link_one_sided(pc, conns, store, tmp_path, crm):
    """Issue 12, case 4: load_crm created the opportunities (each holding its referral id), then
    the run stopped for good (load_partner_center's tries used up, nothing committed). The next
    run completes every link on the other two sides (the referral's externalReferenceId and the
    state DB), reports them as linked rather than unchanged, and creates nothing twice."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(r) for r in read_frame(job, "plan_crm_creates")["referral_id"]]
    assert len(planned) >= 3, planned
    assert run_load_crm(job)["failed"] == 0
    held = {str(v).lower(): c for c, v in crm_link_values(pc, crm).items() if v}
    assert {r.lower() for r in planned} <= set(held)  # the CRM side of each link exists ...
    assert not any(pc.partner_center.referrals[r].get("externalReferenceId") for r in planned)  # ... only it
    counts = crm_counts(pc, crm)

    nxt = new_job(crm, store, staging)
    up_to_load(nxt, store)
    run_load_crm(nxt)
    run_load_pc(nxt)
    report = commit(nxt, store)
    assert crm_counts(pc, crm) == counts  # nothing created twice
    links = store.get_links(crm)
    linked = {str(r).lower(): str(c).lower() for r, c in zip(links["referral_id"], links["crm_id"], strict=True)}
    for rid in planned:
        crm_id = held[rid.lower()]
        assert str(pc.partner_center.referrals[rid].get("externalReferenceId")).lower() == crm_id, rid
        assert linked.get(rid.lower()) == crm_id, rid
    assert report["pc_to_crm"]["created"] == 0, report
    assert report["writes"]["partner_center"]["linked"] >= len(planned), report["writes"]
    assert_quiet(crm, store, staging)


# -- (c) a failed re-read after a 412 ---------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_failed_reread_after_412_is_a_dead_letter_row_not_a_failed_task(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    staging = tmp_path / "staging"
    first = new_job(crm, store, staging)
    up_to_load(first, store)
    run_load_crm(first)
    run_load_pc(first)
    commit(first, store)
    links = store.get_links(crm)
    [a, b] = [links.iloc[i] for i in (0, 1)]
    for row, text in ((a, "notes for the stale referral"), (b, "notes that sync")):
        if crm == "salesforce":
            pc.salesforce.user_edit("Opportunity", row["crm_id"], {"Description": text})
        else:
            pc.dynamics365.edit("opportunities", row["crm_id"], {"description": text})
    # A seller flags one more opportunity, so the same task also creates a referral.
    new = flag_one_more(pc, crm)
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    updates = read_frame(job, "plan_changes")
    assert {a["referral_id"], b["referral_id"]} <= set(updates["referral_id"])
    assert str(new).lower() in {str(c).lower() for c in read_frame(job, "plan_pc_creates")["crm_id"]}
    # Microsoft edits the first referral after our read (our ETag is stale: the PATCH gets 412),
    # and every re-read of that referral then fails (503 until the client gives up).
    ref = pc.partner_center.referrals[a["referral_id"]]
    pc.partner_center._commit_update(ref, {**ref, "name": "renamed by Microsoft"}, "Microsoft")
    pc.partner_center.faults.configure(
        FaultConfig(rate_5xx=1.0, methods=("GET",), path_prefix=f"/v1.0/engagements/referrals/{a['referral_id']}")
    )
    pc.partner_center.log.clear()
    try:
        outcome = run_load_pc(job)  # must not raise
    finally:
        pc.partner_center.faults.clear()
    assert outcome["failed"] == 1 and outcome["ok"] >= 2, outcome
    patches = [p for p in pc.partner_center.requests_matching("PATCH") if a["referral_id"] in p.path]
    assert [p.status for p in patches] == [412]
    report = commit(job, store)
    assert report["crm_to_pc"]["failed"] == 1 and report["crm_to_pc"]["created"] == 1, report
    assert pc.partner_center.referrals[b["referral_id"]]["details"]["notes"] == "notes that sync"
    assert_created_once_and_linked(pc, crm, store, [str(new)])
    dead = store.dead_letter(crm)
    row = dead[dead["record_key"].isin([a["referral_id"], a["crm_id"]])]
    assert len(row) == 1 and row["direction"].iloc[0] == "crm_to_pc", dead
    assert "re-reading after 412" in row["last_error"].iloc[0] and "503" in row["last_error"].iloc[0], row


@pytest.mark.parametrize("crm", CRMS)
def test_referral_gone_or_rejected_during_update_fails_alone(pc, conns, store, tmp_path, crm):
    """A referral deleted after extract (404 on the PATCH) and one whose PATCH is refused (400)
    are dead-letter rows; the task carries on with the others."""
    seed(pc, crm)
    staging = tmp_path / "staging"
    first = new_job(crm, store, staging)
    up_to_load(first, store)
    run_load_crm(first)
    run_load_pc(first)
    commit(first, store)
    links = store.get_links(crm)
    rows = [links.iloc[i] for i in range(3)]
    for row in rows:
        if crm == "salesforce":
            pc.salesforce.user_edit("Opportunity", row["crm_id"], {"Description": "edited"})
        else:
            pc.dynamics365.edit("opportunities", row["crm_id"], {"description": "edited"})
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    del pc.partner_center.referrals[rows[0]["referral_id"]]  # gone from Partner Center
    pc.partner_center.faults.configure(  # the PATCH of the second is refused outright
        FaultConfig(
            rate_5xx=1.0, methods=("PATCH",), path_prefix=f"/v1.0/engagements/referrals/{rows[1]['referral_id']}"
        )
    )
    try:
        outcome = run_load_pc(job)
    finally:
        pc.partner_center.faults.clear()
    assert outcome["failed"] == 2, outcome
    commit(job, store)
    assert pc.partner_center.referrals[rows[2]["referral_id"]]["details"]["notes"] == "edited"
    dead = store.dead_letter(crm)
    keys = set(dead["record_key"])
    for row in rows[:2]:
        assert {row["referral_id"], row["crm_id"]} & keys, dead


# -- (d) a retried or killed load_crm ------------------------------------------------------------------
@pytest.mark.parametrize("crm", CRMS)
def test_retried_load_crm_creates_no_second_opportunity_account_or_contact(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    # Referrals whose customers are new to the CRM: their accounts and contacts get created.
    now = iso(datetime.now(UTC))
    for i, rid in enumerate(pc.partner_center.seed(4, seed=62)):
        doc = pc.partner_center.referrals[rid]
        doc.update(status="New", substatus="Pending", updatedDateTime=now)
        doc["customerProfile"]["name"] = f"Brand New Customer {i}"
        doc["customerProfile"]["team"][0]["email"] = f"buyer{i}@brand-new-{i}.example"
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(r) for r in read_frame(job, "plan_crm_creates")["referral_id"]]
    assert len(planned) >= 4
    before = crm_counts(pc, crm)

    first = run_load_crm(job)
    assert first["failed"] == 0, first
    after_first = crm_counts(pc, crm)
    assert after_first != before  # opportunities, accounts and contacts were created

    again = run_load_crm(job)  # a retry, or "Clear task"
    assert again["failed"] == 0, again
    assert crm_counts(pc, crm) == after_first
    run_load_pc(job)
    commit(job, store)
    assert crm_counts(pc, crm) == after_first
    by_ref = opportunities_by_referral(pc, crm)
    assert {r: by_ref[r.lower()] for r in planned} == dict.fromkeys(planned, 1)
    assert max(by_ref.values()) == 1
    links = set(store.get_links(crm)["referral_id"])
    assert set(planned) <= links
    assert_quiet(crm, store, staging)
    assert crm_counts(pc, crm) == after_first


@pytest.mark.parametrize("crm", CRMS)
def test_killed_load_crm_is_retried_without_duplicates(pc, conns, store, tmp_path, crm, monkeypatch):
    seed(pc, crm)
    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    planned = [str(r) for r in read_frame(job, "plan_crm_creates")["referral_id"]]
    assert planned
    # Killed after the accounts, contacts and opportunities were written, before the rest.
    if crm == "salesforce":
        from cosell_sync.sides.salesforce import SalesforceSide

        target, name = SalesforceSide, "_ensure_roles"
    else:
        from cosell_sync.sides.dynamics365 import DynamicsSide

        target, name = DynamicsSide, "_upsert_opportunities"
    real = getattr(target, name)

    def dying(self, *args, **kwargs):
        if name == "_upsert_opportunities":
            real(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(target, name, dying)
    with pytest.raises(Killed):
        run_load_crm(job)
    monkeypatch.setattr(target, name, real)
    after_kill = crm_counts(pc, crm)

    retry = run_load_crm(job)
    assert retry["failed"] == 0, retry
    counts = crm_counts(pc, crm)
    grown = {k: counts[k] - after_kill[k] for k in counts}
    assert all(v == 0 for k, v in grown.items() if k not in ("OpportunityContactRole",)), grown
    run_load_pc(job)
    commit(job, store)
    by_ref = opportunities_by_referral(pc, crm)
    assert {r: by_ref[r.lower()] for r in planned} == dict.fromkeys(planned, 1)
    if crm == "salesforce":  # one primary contact role per opportunity, never two
        roles = Counter(r["OpportunityId"] for r in pc.salesforce.list_records("OpportunityContactRole"))
        assert max(roles.values()) == 1
    assert set(planned) <= set(store.get_links(crm)["referral_id"])
    assert_quiet(crm, store, staging)


# -- the lookup before a create ------------------------------------------------------------------------
def _crm_rows(n: int):
    import pandas as pd

    from tests.integration.test_sync_partner_center_side import crm_row

    # Partner-led (no help asked): the only list queries are the lookups by externalReferenceId.
    return pd.DataFrame([crm_row(f"006LOOKUP{i:03d}", help_code=None) for i in range(n)])


def _side():
    return PartnerCenterSide(PartnerCenterHook(sleep=lambda _s: None), load_mapping("salesforce"))


def test_lookup_is_batched_and_falls_back_when_or_is_refused(pc, pc_conn, monkeypatch):
    from cosell_sync.errors import ValidationError
    from cosell_sync.sides.base import RunContext
    from cosell_sync.sides.partner_center import LOOKUP_CHUNK

    side, ctx = _side(), RunContext(dag_id="cosell_sync_salesforce", run_id="manual__lookup")
    rows = _crm_rows(LOOKUP_CHUNK + 5)
    pc.partner_center.log.clear()
    first = side.create(rows, ctx)
    assert all(r.ok for r in first) and len(pc.partner_center.referrals) == len(rows)
    lists = [r for r in pc.partner_center.requests_matching("GET") if r.path == "/v1.0/engagements/referrals"]
    assert len(lists) == 2  # one list query per LOOKUP_CHUNK ids, not one per id

    real = PartnerCenterHook.find_by_external_references

    def no_or(self, values):
        if len(values) > 1:
            raise ValidationError("Partner Center", "'or' is not supported in $filter", status=400)
        return real(self, values)

    monkeypatch.setattr(PartnerCenterHook, "find_by_external_references", no_or)
    again = side.create(rows, ctx)  # a retry against a service that refuses "or": one query per id
    assert [r.referral_id for r in again] == [r.referral_id for r in first]
    assert len(pc.partner_center.referrals) == len(rows)


def test_a_failed_lookup_fails_those_creates_and_posts_nothing(pc, pc_conn):
    from cosell_sync.sides.base import RunContext

    side, ctx = _side(), RunContext(dag_id="cosell_sync_salesforce", run_id="manual__lookup")
    pc.partner_center.faults.configure(
        FaultConfig(rate_5xx=1.0, methods=("GET",), path_prefix="/v1.0/engagements/referrals")
    )
    try:
        results = side.create(_crm_rows(3), ctx)  # no exception: three failed records
    finally:
        pc.partner_center.faults.clear()
    assert [r.ok for r in results] == [False, False, False]
    assert all(r.error.startswith("looking up an existing referral") for r in results)
    assert pc.partner_center.referrals == {} and pc.partner_center.requests_matching("POST") == []
