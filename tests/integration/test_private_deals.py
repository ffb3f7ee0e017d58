"""Private deals from a mapping flag, with both CRMs against the sandbox.

Microsoft Learn, "Create a referral" ("Deal types"): a private deal is not shared with Microsoft
sellers (consent.consentToShareReferralWithMicrosoftSellers false, no help needed); a partner-led
deal is shared with no help needed; a co-sell deal is shared and asks for help. The shipped
mappings carry the share flag as the boolean field ``share_with_microsoft``: a Salesforce checkbox
PC_Share_With_Microsoft__c or a Dataverse Yes/No column cosell_sharewithmicrosoft, both checked
by default."""

from __future__ import annotations

import pytest

from cosell_sync.dag_factory import sync_sides
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.odata import with_query
from cosell_sync.pipeline import sync
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import scheduled_job

CONSENT = "consentToShareReferralWithMicrosoftSellers"
COLUMN = {"salesforce": "PC_Share_With_Microsoft__c", "dynamics365": "cosell_sharewithmicrosoft"}


def run_sync(crm: str, store: StateStore, staging) -> dict:
    job = scheduled_job(crm, store, staging, prefix="manual")
    return sync(job, *sync_sides(crm, job.mapping), store)


def writes(summary: dict) -> int:
    return sum(summary[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))


def new_opportunity(pc, crm: str, name: str, share: bool | None) -> str:
    """A flagged open opportunity with no help asked for; ``share`` None leaves the box at its default."""
    if crm == "salesforce":
        sf = pc.salesforce
        account = sf.user_create("Account", {"Name": f"{name} Inc", "BillingCountry": "US"})
        values = {
            "Name": name,
            "AccountId": account["Id"],
            "StageName": "Qualification",
            "CloseDate": "2027-03-31",
            "Amount": 25000,
            "PC_Sync_With_Partner_Center__c": True,
        }
        if share is not None:
            values[COLUMN[crm]] = share
        return str(sf.user_create("Opportunity", values)["Id"])
    dv = pc.dynamics365
    account = dv.create("accounts", {"name": f"{name} Inc", "address1_country": "US"})
    values = {
        "name": name,
        "estimatedvalue": 25000,
        "estimatedclosedate": "2027-03-31",
        "parentaccountid@odata.bind": DynamicsHook.bind("accounts", account["accountid"]),
        "cosell_syncwithpartnercenter": True,
    }
    if share is not None:
        values[COLUMN[crm]] = share
    return str(dv.create("opportunities", values)["opportunityid"])


def box(pc, crm: str, crm_id: str):
    if crm == "salesforce":
        return pc.salesforce.get_record("Opportunity", crm_id)[COLUMN[crm]]
    return pc.dynamics365.row("opportunities", crm_id)[COLUMN[crm]]


def set_box(pc, crm: str, crm_id: str, value: bool) -> None:
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_id, {COLUMN[crm]: value})
    else:
        pc.dynamics365.edit("opportunities", crm_id, {COLUMN[crm]: value})


def referral_for(pc, crm_id: str) -> dict:
    [doc] = [d for d in pc.partner_center.referrals.values() if str(d.get("externalReferenceId")) == crm_id]
    return doc


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_the_share_box_decides_private_or_shared_and_stays_in_step(pc, conns, store, tmp_path, crm):
    private = new_opportunity(pc, crm, "Private deal", share=False)
    shared = new_opportunity(pc, crm, "Partner-led deal", share=None)  # the box's default: checked
    assert box(pc, crm, private) is False and box(pc, crm, shared) is True

    first = run_sync(crm, store, tmp_path / "staging")
    assert first["crm_to_pc"]["created"] == 2 and first["crm_to_pc"]["failed"] == 0, first
    private_ref, shared_ref = referral_for(pc, private), referral_for(pc, shared)
    assert private_ref["consent"][CONSENT] is False
    assert shared_ref["consent"][CONSENT] is True
    for doc in (private_ref, shared_ref):  # no help asked for: neither private nor partner-led co-sells
        assert not (doc.get("inviteContext") or {}).get("assistanceRequestCode")

    assert writes(run_sync(crm, store, tmp_path / "staging")) == 0  # what was written reads back the same

    # The seller shares the private deal: the referral's consent follows.
    set_box(pc, crm, private, True)
    third = run_sync(crm, store, tmp_path / "staging")
    assert third["crm_to_pc"]["updated"] == 1 and third["crm_to_pc"]["failed"] == 0, third
    assert pc.partner_center.referrals[private_ref["id"]]["consent"][CONSENT] is True

    # Partner Center withdraws the partner-led deal's consent: the box follows.
    doc = pc.partner_center.referrals[shared_ref["id"]]
    pc.partner_center._commit_update(doc, {**doc, "consent": {**doc["consent"], CONSENT: False}}, "Microsoft")
    fourth = run_sync(crm, store, tmp_path / "staging")
    assert fourth["pc_to_crm"]["updated"] == 1 and fourth["pc_to_crm"]["failed"] == 0, fourth
    assert box(pc, crm, shared) is False
    assert writes(run_sync(crm, store, tmp_path / "staging")) == 0


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_an_incoming_private_referral_makes_an_unchecked_box(pc, conns, store, tmp_path, crm):
    pc.partner_center.seed(30, seed=13)
    open_refs = [d for d in pc.partner_center.referrals.values() if d["status"] in ("New", "Active")]
    assert {d["consent"][CONSENT] for d in open_refs} == {True, False}  # the seed has both kinds
    first = run_sync(crm, store, tmp_path / "staging")
    assert first["pc_to_crm"]["created"] == len(open_refs) and first["pc_to_crm"]["failed"] == 0, first
    links = store.get_links(crm).set_index("referral_id")["crm_id"]
    for doc in open_refs:
        assert box(pc, crm, str(links[doc["id"]])) is doc["consent"][CONSENT], doc["id"]
    assert writes(run_sync(crm, store, tmp_path / "staging")) == 0


def test_salesforce_describes_the_checkbox_checked_by_default(sf_hook):
    [field] = [f for f in sf_hook.describe("Opportunity")["fields"] if f["name"] == COLUMN["salesforce"]]
    assert (field["type"], field["defaultValue"], field["nillable"], field["custom"]) == ("boolean", True, False, True)
    assert field["defaultedOnCreate"] is True and field["updateable"] is True


def test_dataverse_describes_the_yes_no_column_yes_by_default(dyn_hook, pc):
    path = (
        "EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='cosell_sharewithmicrosoft')"
        "/Microsoft.Dynamics.CRM.BooleanAttributeMetadata"
    )
    body = dyn_hook.api.request("GET", with_query(dyn_hook._url(path), {"$expand": "OptionSet"})).json()
    assert body["AttributeType"] == "Boolean" and body["DefaultValue"] is True
    assert body["SchemaName"] == "cosell_ShareWithMicrosoft" and body["IsCustomAttribute"] is True
    options = body["OptionSet"]
    assert (options["TrueOption"]["Value"], options["FalseOption"]["Value"]) == (1, 0)
    # A row created through the Web API without the column gets the default; false is kept.
    made = str(dyn_hook.create("opportunities", {"name": "Web API deal"}))
    assert pc.dynamics365.row("opportunities", made)["cosell_sharewithmicrosoft"] is True
    unchecked = str(dyn_hook.create("opportunities", {"name": "Private", "cosell_sharewithmicrosoft": False}))
    assert pc.dynamics365.row("opportunities", unchecked)["cosell_sharewithmicrosoft"] is False
