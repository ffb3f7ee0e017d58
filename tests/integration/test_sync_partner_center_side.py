"""The Partner Center side of a sync, against the sandbox: extract, create, JSON-Patch updates, 412."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.normalize import referrals_frame
from cosell_sync.sides.base import RunContext
from cosell_sync.sides.partner_center import PartnerCenterSide, microsoft_side, patch_operations

MAPPING = load_mapping("salesforce")


@pytest.fixture
def side(hook):
    return PartnerCenterSide(hook, MAPPING)


def ctx(**kw):
    return RunContext(dag_id="cosell_sync_salesforce", run_id="manual__test", **kw)


def crm_row(crm_id: str, **over):
    row = {f: None for f in MAPPING.fields}
    row.update(
        crm_id=crm_id,
        name=f"Opportunity {crm_id}",
        deal_value=125000.0,
        currency="EUR",
        close_date="2027-02-28",
        notes="From the CRM",
        stage="new",
        help_code="ProofOfConceptOrDemo",
        solutions="SOL-6115380-IPC",
        customer_name="Fabrikam GmbH",
        customer_country="DE",
        customer_postal_code="80331",
        customer_city="München",
        contact_first_name="Lena",
        contact_last_name="Vogel",
        contact_email="lena.vogel@fabrikam.example",
    )
    row.update(over)
    return row


def test_extract_all_by_window_and_by_ids(pc, side):
    ids = pc.partner_center.seed(60, seed=4)
    assert len(side.extract()) == 60
    cut = datetime.now(UTC) - timedelta(days=20)
    expected = {
        i
        for i, d in pc.partner_center.referrals.items()
        if datetime.fromisoformat(d["updatedDateTime"].replace("0Z", "+00:00")) > cut
    }
    assert {d["id"] for d in side.extract(since=cut)} == expected
    picked = side.extract(referral_ids=[ids[3], ids[7], "does-not-exist"])
    assert [d["id"] for d in picked] == [ids[3], ids[7]]
    assert all(d["eTag"] for d in picked)


def test_create_referrals_from_crm_rows(pc, side):
    results = side.create(pd.DataFrame([crm_row("006A"), crm_row("006B", help_code=None)]), ctx())
    assert [r.ok for r in results] == [True, True]
    docs = {d["externalReferenceId"]: d for d in pc.partner_center.referrals.values() if not microsoft_side(d)}
    shared = docs["006A"]
    # Help asked for: Microsoft was asked too, in the same engagement (co-sell's second step).
    asked = [d for d in pc.partner_center.referrals.values() if microsoft_side(d)]
    assert [d["engagementId"] for d in asked] == [shared["engagementId"]]
    assert shared["type"] == "Shared" and shared["target"] == [{"type": "SolutionProfile", "id": "SOL-6115380-IPC"}]
    assert shared["inviteContext"]["assistanceRequestCode"] == "ProofOfConceptOrDemo"
    assert (shared["status"], shared["substatus"], shared["direction"]) == ("New", "Pending", "Outgoing")
    assert shared["details"]["dealValue"] == 125000.0 and shared["details"]["closingDateTime"].startswith("2027-02-28")
    assert shared["customerProfile"]["address"]["country"] == "DE"
    assert shared["customerProfile"]["team"][0]["email"] == "lena.vogel@fabrikam.example"
    assert docs["006B"]["type"] == "Independent"
    assert results[0].referral_id == shared["id"] and results[0].crm_id == "006A"
    # the referral we created reads back to the same canonical values
    back = referrals_frame([shared], MAPPING).frame.iloc[0]
    for name in ("name", "deal_value", "currency", "close_date", "notes", "stage", "help_code", "solutions"):
        assert back[name] == crm_row("006A")[name], name


def test_a_rejected_referral_fails_alone_with_the_services_error(pc, side):
    rows = pd.DataFrame([crm_row("006A"), crm_row("006B", customer_country=None), crm_row("006C")])
    results = side.create(rows, ctx())
    assert [r.ok for r in results] == [True, False, True]
    assert "customerProfile.address.country" in results[1].error and results[1].error_code == "invalidRequest"
    mine = [d for d in pc.partner_center.referrals.values() if not microsoft_side(d)]
    assert len(mine) == 2 and len(pc.partner_center.referrals) == 4  # each co-sell one asked Microsoft too


def test_update_patches_only_the_planned_fields(pc, side):
    [rid] = pc.partner_center.seed(1, seed=11)
    pc.partner_center.referrals[rid].update(status="Active", substatus="Accepted")
    doc = side.extract(referral_ids=[rid])[0]
    before = dict(doc)
    updates = pd.DataFrame(
        [
            {
                "referral_id": rid,
                "crm_id": "006X",
                "fields": {"deal_value": 4242.0, "stage": "won"},
                "expected": {"deal_value": doc["details"]["dealValue"], "stage": "active"},
            }
        ]
    )
    [result] = side.update(updates, ctx(), side.current_by_id([doc]))
    assert result.ok and result.etag and result.etag != before["eTag"]
    after = pc.partner_center.referrals[rid]
    assert after["details"]["dealValue"] == 4242.0 and (after["status"], after["substatus"]) == ("Closed", "Won")
    assert after["name"] == before["name"] and after["details"]["notes"] == before["details"]["notes"]


def test_412_rereads_remerges_and_retries_once(pc, side):
    [rid] = pc.partner_center.seed(1, seed=12)
    pc.partner_center.referrals[rid].update(status="Active", substatus="Accepted")
    doc = side.extract(referral_ids=[rid])[0]
    # A Microsoft seller edits the notes after our read: our ETag is now stale.
    pc.partner_center._commit_update(
        pc.partner_center.referrals[rid],
        {**pc.partner_center.referrals[rid], "details": {**doc["details"], "notes": "seller note"}},
        "Microsoft",
    )
    updates = pd.DataFrame(
        [
            {
                "referral_id": rid,
                "crm_id": "006X",
                "fields": {"deal_value": 99.0, "notes": "crm note"},
                "expected": {"deal_value": doc["details"]["dealValue"], "notes": doc["details"]["notes"]},
            }
        ]
    )
    [result] = side.update(updates, ctx(), side.current_by_id([doc]))
    assert result.ok
    assert result.fields == {"deal_value": 99.0}  # notes moved meanwhile: left for the next run's merge
    after = pc.partner_center.referrals[rid]
    assert after["details"]["dealValue"] == 99.0 and after["details"]["notes"] == "seller note"
    patches = pc.partner_center.requests_matching("PATCH")
    assert [p.status for p in patches] == [412, 200]


def test_dry_run_writes_nothing(pc, side):
    [rid] = pc.partner_center.seed(1, seed=13)
    doc = side.extract(referral_ids=[rid])[0]
    pc.partner_center.log.clear()
    dry = ctx(dry_run=True)
    assert all(r.ok for r in side.create(pd.DataFrame([crm_row("006A")]), dry))
    updates = pd.DataFrame([{"referral_id": rid, "crm_id": "x", "fields": {"name": "n"}, "expected": {}}])
    assert all(r.ok for r in side.update(updates, dry, side.current_by_id([doc])))
    assert pc.partner_center.requests_matching("POST") == [] and pc.partner_center.requests_matching("PATCH") == []


def test_patch_operations_replace_or_add():
    doc = {"details": {"dealValue": 1}, "inviteContext": None}
    assert patch_operations(doc, ["details", "dealValue"], 2) == {
        "op": "replace",
        "path": "/details/dealValue",
        "value": 2,
    }
    assert patch_operations(doc, ["details", "notes"], "x") == {"op": "add", "path": "/details/notes", "value": "x"}
    assert patch_operations(doc, ["inviteContext", "assistanceRequestCode"], "Unknown") == {
        "op": "add",
        "path": "/inviteContext",
        "value": {"assistanceRequestCode": "Unknown"},
    }
