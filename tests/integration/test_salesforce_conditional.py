"""Issue 11, Salesforce halves of case 3 (blind CRM writes) and case 7 (invented close date).

Case 3: sObject Collections have no ETag, so ``SalesforceSide.update`` re-reads each record's
``SystemModstamp`` in the query that already reads its audit trail (one SOQL query per 200
ids), and defers any record modified since extract: no write, ``changed_during_run``, the
planned fields listed in ``deferred``. Case 7: a created opportunity's result reports the
values Salesforce was given, the invented CloseDate and StageName included, as the next
extract normalizes them.

Everything goes through the sandbox and the simple-salesforce based hook.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.normalize import crm_frame, referrals_frame
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.hooks.salesforce import SalesforceSyncHook
from cosell_sync.pipeline import commit, load_crm, read_frame
from cosell_sync.sides.base import RunContext
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.sides.salesforce import DEFAULT_CLOSE_DAYS, SalesforceSide
from tests.integration.test_sync_retries import new_job, run_load_crm, run_load_pc, up_to_load

MAPPING = load_mapping("salesforce")
DAG = "cosell_sync_salesforce"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CTX = RunContext(dag_id=DAG, run_id="manual__cond", now=NOW)
CHANGED = "changed_during_run"


@pytest.fixture
def sf(pc):
    return pc.salesforce


def sides(bulk_threshold: int = 2000) -> tuple[PartnerCenterSide, SalesforceSide]:
    return (
        PartnerCenterSide(PartnerCenterHook(sleep=lambda _s: None), MAPPING),
        SalesforceSide(SalesforceSyncHook(bulk_threshold=bulk_threshold), MAPPING),
    )


def queries(sf) -> int:
    return len([e for e in sf.requests_matching("GET", "/services/data/") if "/query" in e.path])


def bulk_jobs(sf) -> int:
    return len([e for e in sf.requests_matching("POST", "/services/data/") if e.path.rstrip("/").endswith("/ingest")])


def written_ids(sf) -> set[str]:
    """Opportunity Ids (15 characters) in the collections update requests logged."""
    ids: set[str] = set()
    for e in sf.requests_matching("PATCH", "/services/data/"):
        if e.path.rstrip("/").endswith("/composite/sobjects"):
            ids |= {str(r["Id"])[:15] for r in e.json()["records"]}
    return ids


def updates(rows: list[tuple[str, str | None, dict]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"crm_id": c, "referral_id": r, "fields": f} for c, r, f in rows], columns=["crm_id", "referral_id", "fields"]
    )


# -- case 3, through the runner's steps ---------------------------------------------------------------
def test_seller_edit_between_extract_and_load_is_deferred_not_overwritten(pc, conns, sf, store, tmp_path):
    pc.partner_center.seed(12, seed=61)
    sf.seed(opportunities=6, accounts=3, flagged=2, seed=61)
    staging = tmp_path / "staging"
    first = new_job("salesforce", store, staging)
    up_to_load(first, store)
    run_load_crm(first)
    run_load_pc(first)
    report = commit(first, store)
    assert report["pc_to_crm"]["failed"] == 0, report

    links = store.get_links("salesforce")
    open_links = [
        (str(r.referral_id), str(r.crm_id))
        for r in links.itertuples()
        if pc.partner_center.referrals[r.referral_id]["status"] in ("New", "Active")
    ]
    assert len(open_links) >= 2
    (rid_a, a), (rid_b, b) = open_links[:2]
    for rid, value in ((rid_a, 4100), (rid_b, 4200)):  # Microsoft edits the deal value of both
        ref = pc.partner_center.referrals[rid]
        changed = json.loads(json.dumps(ref))
        changed["details"]["dealValue"] = value
        pc.partner_center._commit_update(ref, changed, "Microsoft")

    job = new_job("salesforce", store, staging)
    up_to_load(job, store)
    changes = read_frame(job, "plan_changes")
    planned = {(str(r.crm_id), r.field): r.new for r in changes.itertuples() if r.target == "crm"}
    assert planned[(a, "deal_value")] == 4100 and planned[(b, "deal_value")] == 4200
    assert {f for c, f in planned if c == a} == {"deal_value"}

    # A seller edits opportunity a after extract_crm, before load_crm.
    sf.user_edit("Opportunity", a, {"Amount": 999})
    edited = sf.get_record("Opportunity", a)["SystemModstamp"]
    sf.log.clear()  # the request log: what load_crm asks of Salesforce
    load_crm(job, sides()[1])

    results = {r["crm_id"]: r for r in read_frame(job, "crm_results").to_dict("records")}
    assert results[a]["ok"] and results[a]["error_code"] == CHANGED and results[a]["error"] is None
    assert results[a]["fields"] == {} and list(results[a]["deferred"]) == ["deal_value"]
    assert results[b]["ok"] and results[b]["fields"]["deal_value"] == 4200.0 and not len(results[b]["deferred"])
    opp_a, opp_b = sf.get_record("Opportunity", a), sf.get_record("Opportunity", b)
    assert opp_a["Amount"] == 999 and opp_a["SystemModstamp"] == edited  # not written at all
    assert opp_b["Amount"] == 4200
    written = written_ids(sf)
    assert b[:15] in written and a[:15] not in written
    assert queries(sf) == 1  # the audit read and the check are one query

    # The run ends; the deferred field kept its base, so the next run sees both sides changed
    # and resolves it by authority (deal_value: crm): the seller's value reaches Microsoft.
    run_load_pc(job)
    commit(job, store)
    after = new_job("salesforce", store, staging)
    up_to_load(after, store)
    conflicts = read_frame(after, "plan_conflicts")
    assert [(str(r.crm_id), r.field, r.winner) for r in conflicts.itertuples()] == [(a, "deal_value", "crm")]
    run_load_crm(after)
    run_load_pc(after)
    commit(after, store)
    assert sf.get_record("Opportunity", a)["Amount"] == 999
    assert pc.partner_center.referrals[rid_a]["details"]["dealValue"] == 999
    assert sf.get_record("Opportunity", b)["Amount"] == 4200
    assert pc.partner_center.referrals[rid_b]["details"]["dealValue"] == 4200


# -- case 3, the side itself: chunks, Bulk API, unknown versions ----------------------------------------
@pytest.mark.parametrize("threshold", [2000, 100], ids=["collections", "bulk"])
def test_check_is_one_query_per_200_ids_and_holds_on_the_bulk_path(sf, sf_conn, threshold, monkeypatch):
    sf.seed(opportunities=250, accounts=10, seed=7)
    side = sides(threshold)[1]
    records = side.extract()
    assert len(records) == 250
    versions = {str(r["Id"]): side.version(r) for r in records}
    ids = [str(r["Id"]) for r in records]
    edited = {ids[3], ids[230]}  # one in each query's chunk
    for crm_id in edited:
        sf.user_edit("Opportunity", crm_id, {"Amount": 5})
    stamps = {i: sf.get_record("Opportunity", i)["SystemModstamp"] for i in edited}
    sent: list[str] = []
    real = side.hook.update_records
    monkeypatch.setattr(
        side.hook, "update_records", lambda obj, recs, **kw: sent.extend(r["Id"] for r in recs) or real(obj, recs, **kw)
    )
    sf.log.clear()

    rows = [(i, f"ref-{n}", {"deal_value": 1000.0 + n, "customer_city": "Nowhere"}) for n, i in enumerate(ids)]
    results = side.update(updates(rows), CTX, versions)

    assert queries(sf) == 2  # 250 ids: two queries, no more
    assert set(sent) == set(ids) - edited
    assert bulk_jobs(sf) == (1 if threshold < 250 else 0)
    assert written_ids(sf) == ({i[:15] for i in sent} if threshold >= 250 else set())
    for n, (crm_id, result) in enumerate(zip(ids, results, strict=True)):
        opp = sf.get_record("Opportunity", crm_id)
        assert result.ok and result.crm_id == crm_id
        if crm_id in edited:
            assert (result.fields, result.deferred, result.error_code) == ({}, ["deal_value"], CHANGED)
            assert opp["Amount"] == 5 and opp["SystemModstamp"] == stamps[crm_id]
        else:
            assert result.fields == {"deal_value": 1000.0 + n} and result.deferred == [] and result.error_code is None
            assert opp["Amount"] == 1000.0 + n


def test_unknown_version_is_written_and_equal_stamps_compare_as_instants(sf, sf_conn):
    sf.seed(opportunities=4, accounts=2, seed=9)
    side = sides()[1]
    records = side.extract()
    a, b, c, gone = (str(r["Id"]) for r in records)
    versions = {str(r["Id"]): side.version(r) for r in records}
    for crm_id in (a, b):
        sf.user_edit("Opportunity", crm_id, {"Description": "a seller's edit"})
    # c is unchanged, its version given in another format for the same instant ("Z", no millis)
    stamp = datetime.strptime(versions[c], "%Y-%m-%dT%H:%M:%S.%f%z")
    versions[c] = stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    sf.user_delete("Opportunity", gone)
    rows = [(i, None, {"notes": f"from Partner Center {i}"}) for i in (a, b, c, gone)]

    results = side.update(updates(rows), CTX, {k: v for k, v in versions.items() if k != b})
    by_id = {r.crm_id: r for r in results}
    assert by_id[a].deferred == ["notes"] and by_id[a].error_code == CHANGED
    assert by_id[b].ok and by_id[b].fields == {"notes": f"from Partner Center {b}"} and by_id[b].deferred == []
    assert by_id[c].ok and by_id[c].deferred == [] and by_id[c].error_code is None
    assert not by_id[gone].ok and by_id[gone].error_code and by_id[gone].deferred == []  # fails, as before
    assert sf.get_record("Opportunity", a)["Description"] == "a seller's edit"
    assert sf.get_record("Opportunity", b)["Description"] == f"from Partner Center {b}"
    assert sf.get_record("Opportunity", c)["Description"] == f"from Partner Center {c}"

    # No versions at all: written unconditionally, as before.
    [again] = side.update(updates([(a, None, {"notes": "again"})]), CTX, None)
    assert again.ok and again.deferred == [] and sf.get_record("Opportunity", a)["Description"] == "again"

    # A dry run reads nothing.
    reads = queries(sf)
    dry = RunContext(dag_id=DAG, run_id="manual__dry", dry_run=True, now=NOW)
    [planned] = side.update(updates([(a, None, {"notes": "dry"})]), dry, {a: "2000-01-01T00:00:00.000+0000"})
    assert planned.ok and planned.fields == {"notes": "dry"} and queries(sf) == reads


# -- case 7 ---------------------------------------------------------------------------------------------
def test_create_reports_the_invented_close_date_and_stage_as_the_next_extract_reads_them(sf, sf_conn):
    side = sides()[1]
    doc = {
        "id": "ref-no-date",
        "name": "A deal with no close date",
        "status": "New",
        "substatus": "Pending",
        "direction": "Incoming",
        "customerProfile": {"name": "Fabrikam", "address": {"country": "US", "postalCode": "98052"}, "team": []},
        "details": {"dealValue": 1234.5, "currency": "USD"},
    }
    rows = referrals_frame([doc], MAPPING).frame.assign(stage=None)

    [result] = side.create(rows, CTX)

    assert result.ok and result.crm_id
    invented = (NOW.date() + timedelta(days=DEFAULT_CLOSE_DAYS)).isoformat()
    assert result.fields["close_date"] == invented and result.fields["stage"] == "new"
    extracted = crm_frame(side.extract(crm_ids=[result.crm_id]), MAPPING, "Id").frame.iloc[0]
    opp_fields = {fm.name for fm in side.opp_fields}
    assert {k: v for k, v in result.fields.items() if k in opp_fields} == {
        k: extracted[k] for k in result.fields if k in opp_fields
    }
    assert {"close_date", "stage", "deal_value", "currency", "name"} <= set(result.fields)
