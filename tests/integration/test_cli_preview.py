"""``cosell-sync preview`` against the sandbox: one referral (Partner Center -> CRM) and one
opportunity (CRM -> Partner Center) previewed with the real hooks, nothing written (the emulators'
request logs hold reads only, the state DB is unchanged), and the preview matches, field by field,
what the next real sync run then writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from airflow.sdk import ObjectStoragePath
from click.testing import CliRunner

from cosell_sync.cli import main
from cosell_sync.pipeline import sync
from tests.integration.sync_jobs import event_job, quiet_sides, scheduled_job, seed

READ_METHODS = {"GET", "HEAD"}


def api_requests(pc) -> list[tuple[str, str, str]]:
    """(emulator, method, path) of every API request the emulators served (control plane excluded)."""
    out = []
    for name, emulator in (("pc", pc.partner_center), ("sf", pc.salesforce), ("dv", pc.dynamics365)):
        out += [(name, e.method, e.path) for e in emulator.log if not e.path.startswith("/_sandbox/")]
    return out


def clear_logs(pc) -> None:
    for emulator in (pc.partner_center, pc.salesforce, pc.dynamics365):
        emulator.log.clear()


def dump(url: str) -> dict[str, list]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            meta = sa.MetaData()
            return {
                t: sorted(map(repr, conn.execute(sa.select(sa.Table(t, meta, autoload_with=conn))).all()))
                for t in tables
            }
    finally:
        engine.dispose()


def preview(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["preview", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def assert_nothing_written(pc, state_url: str, before: dict) -> None:
    writes = [r for r in api_requests(pc) if r[1] not in READ_METHODS]
    # a SOQL query, a Dataverse read: GETs; token requests go to Entra, not to the APIs
    assert writes == [], writes
    assert dump(state_url) == before


@pytest.fixture
def sandbox_sf(conns, pc, store, state_url):
    seed(pc, "salesforce", referrals=6, opportunities=6, accounts=3, flagged=4, seed=18)
    return pc


def open_unlinked_referral(pc) -> str:
    return next(d["id"] for d in pc.partner_center.referrals.values() if d["status"] in ("New", "Active"))


def test_a_referral_previewed_then_synced_to_salesforce(sandbox_sf, store, state_url, tmp_path):
    pc = sandbox_sf
    rid = open_unlinked_referral(pc)
    before = dump(state_url)
    clear_logs(pc)
    doc = preview("--crm", "salesforce", "--referral", rid)
    assert_nothing_written(pc, state_url, before)
    assert any(method == "GET" for _, method, _ in api_requests(pc))  # it did read
    [write] = [w for w in doc["writes"] if w["action"] == "create"]
    assert write["target"] == "salesforce" and write["referral_id"] == rid and write["error"] is None
    assert write["link"] == {"PC_Referral_Id__c": rid}
    assert write["account"]["values"]["Account.Name"] and "name + postal code" in write["account"]["rule"]
    assert write["account"]["action"] in ("match", "create") and write["contact"]["action"] in ("match", "create")
    assert not [o for o in pc.salesforce.list_records("Opportunity") if o.get("PC_Referral_Id__c") == rid]

    # the real run for this referral (the webhook DAG's) writes exactly the previewed values
    accounts_before = {a["Id"] for a in pc.salesforce.list_records("Account")}
    job = event_job("salesforce", ObjectStoragePath(f"file://{tmp_path / 'staging'}"), [rid])
    sync(job, *quiet_sides("salesforce", job.mapping), store)
    [stored] = [o for o in pc.salesforce.list_records("Opportunity") if o.get("PC_Referral_Id__c") == rid]
    assert write["fields"], write
    for field, value in write["fields"].items():
        assert stored[field] == value, (field, stored[field], value)
    account = pc.salesforce.get_record("Account", stored["AccountId"])
    for path, value in write["account"]["values"].items():
        assert account[path.split(".", 1)[1]] == value, path
    if write["account"]["action"] == "match":
        assert stored["AccountId"] == write["account"]["id"]
    else:  # created by the run, as the preview said
        assert stored["AccountId"] not in accounts_before


def test_the_account_and_contact_a_referral_would_match(sandbox_sf, store, state_url):
    """An account with the referral's customer name and postal code (spaced and cased otherwise),
    and a contact with its e-mail, exist: the preview names them; nothing is created."""
    pc = sandbox_sf
    rid = open_unlinked_referral(pc)
    profile = pc.partner_center.referrals[rid]["customerProfile"]
    account = pc.salesforce.user_create(
        "Account",
        {
            "Name": f"  {profile['name'].upper()} ",
            "BillingPostalCode": profile["address"]["postalCode"].replace(" ", ""),
        },
    )
    member = profile["team"][0]
    contact = pc.salesforce.user_create("Contact", {"LastName": "Someone", "Email": member["email"].upper()})
    accounts, contacts = (len(pc.salesforce.list_records(o)) for o in ("Account", "Contact"))
    doc = preview("--crm", "salesforce", "--referral", rid)
    [write] = doc["writes"]
    assert write["account"]["action"] == "match" and write["account"]["id"] == account["Id"]
    assert write["contact"]["action"] == "match" and write["contact"]["id"] == contact["Id"]
    assert (len(pc.salesforce.list_records("Account")), len(pc.salesforce.list_records("Contact"))) == (
        accounts,
        contacts,
    )


def test_an_opportunity_previewed_then_synced_to_partner_center(sandbox_sf, store, state_url, tmp_path):
    pc = sandbox_sf
    opp = next(
        o
        for o in pc.salesforce.list_records("Opportunity")
        if o["PC_Sync_With_Partner_Center__c"] and not o["IsClosed"] and not o.get("PC_Referral_Id__c")
    )
    before = dump(state_url)
    clear_logs(pc)
    doc = preview("--crm", "salesforce", "--opportunity", opp["Id"])
    assert_nothing_written(pc, state_url, before)
    [write] = [w for w in doc["writes"] if w["action"] == "create"]
    assert write["target"] == "partner_center" and write["crm_id"] == opp["Id"]
    referral = write["referral"]
    assert referral["externalReferenceId"] == opp["Id"] and referral["name"] == opp["Name"]
    assert not [d for d in pc.partner_center.referrals.values() if d.get("externalReferenceId") == opp["Id"]]

    job = scheduled_job("salesforce", store, ObjectStoragePath(f"file://{tmp_path / 'staging'}"))
    sync(job, *quiet_sides("salesforce", job.mapping), store)
    [stored] = [d for d in pc.partner_center.referrals.values() if d.get("externalReferenceId") == opp["Id"]]

    def leaves(doc: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(doc, dict):
            return {k: v for key, value in doc.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
        if isinstance(doc, list):
            return {k: v for i, value in enumerate(doc) for k, v in leaves(value, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): doc}

    held = leaves(stored)
    for path, value in leaves(referral).items():
        assert held.get(path) == value, (path, held.get(path), value)


def test_a_linked_pair_in_step_previews_no_write(sandbox_sf, store, state_url, tmp_path):
    pc = sandbox_sf
    rid = open_unlinked_referral(pc)
    job = event_job("salesforce", ObjectStoragePath(f"file://{tmp_path / 'staging'}"), [rid])
    sync(job, *quiet_sides("salesforce", job.mapping), store)
    doc = preview("--crm", "salesforce", "--referral", rid)
    assert doc["writes"] == [] and doc["unchanged"] == 1, doc
    [opp] = [o for o in pc.salesforce.list_records("Opportunity") if o.get("PC_Referral_Id__c") == rid]
    pc.salesforce.user_edit("Opportunity", opp["Id"], {"Amount": 12345.0})
    doc = preview("--crm", "salesforce", "--opportunity", opp["Id"])
    [write] = doc["writes"]
    assert write["target"] == "partner_center" and write["action"] == "update"
    assert {"op": "replace", "path": "/details/dealValue", "value": 12345.0} in write["patch"]


def test_a_closed_unlinked_referral_is_a_skip_with_its_reason(sandbox_sf, store, state_url):
    pc = sandbox_sf
    closed = next((d["id"] for d in pc.partner_center.referrals.values() if d["status"] == "Closed"), None)
    if closed is None:
        rid = open_unlinked_referral(pc)
        pc.partner_center.referrals[rid]["status"], pc.partner_center.referrals[rid]["substatus"] = "Closed", "Lost"
        closed = rid
    result = CliRunner().invoke(main, ["preview", "--crm", "salesforce", "--referral", closed])
    assert result.exit_code == 0, result.output
    assert "Nothing was written." in result.output
    assert "No write" in result.output


def test_an_unknown_record_is_an_error(sandbox_sf):
    for args in (["--referral", "00000000-0000-0000-0000-000000000000"], ["--opportunity", "0065g0003ZZZZZZAAA"]):
        result = CliRunner().invoke(main, ["preview", "--crm", "salesforce", *args])
        assert result.exit_code == 1 and "has no" in result.output, result.output


def test_a_missing_connection_is_an_error_pointing_at_check(conns, pc, store, state_url, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SALESFORCE_DEFAULT")
    result = CliRunner().invoke(main, ["preview", "--crm", "salesforce", "--referral", "r-1"])
    assert result.exit_code == 1 and "salesforce_default" in result.output, result.output
    assert "cosell-sync check --crm salesforce" in result.output


def test_the_preview_needs_exactly_one_record():
    result = CliRunner().invoke(main, ["preview", "--crm", "salesforce"])
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_dynamics_referral_preview_matches_the_run(conns, pc, store, state_url, tmp_path):
    seed(pc, "dynamics365", referrals=4, opportunities=2, accounts=1, flagged=0, seed=19)
    rid = open_unlinked_referral(pc)
    before = dump(state_url)
    clear_logs(pc)
    doc = preview("--crm", "dynamics365", "--referral", rid)
    assert_nothing_written(pc, state_url, before)
    [write] = [w for w in doc["writes"] if w["action"] in ("create", "win", "lose")]
    job = event_job("dynamics365", ObjectStoragePath(f"file://{tmp_path / 'staging'}"), [rid])
    sync(job, *quiet_sides("dynamics365", job.mapping), store)
    [row] = [r for r in pc.dynamics365.rows("opportunities") if r.get("cosell_referralid") == rid]
    for column in ("name", "estimatedvalue", "description"):
        if column in write["fields"]:
            assert row[column] == write["fields"][column], column


def test_the_console_script(sandbox_sf):
    rid = open_unlinked_referral(sandbox_sf)
    script = Path(sys.executable).with_name("cosell-sync")
    result = subprocess.run(
        [str(script), "preview", "--crm", "salesforce", "--referral", rid],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Preview of referral {rid}" in result.stdout and "CREATE in Salesforce" in result.stdout
