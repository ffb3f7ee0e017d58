"""Issue 13, "Solutions": a CRM edit of an opportunity's solutions keeps the details Partner Center
holds for the solutions that stay, gives a new one the configured details (COSELL_SOLUTIONS_FILE),
and drops the one removed; for both CRMs, through the runner's steps against the sandbox."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cosell_sync.pipeline import commit
from cosell_sync.sides import solutions as solutions_module
from tests.integration.test_sync_retries import flag_one_more, new_job, run_load_crm, run_load_pc, seed, up_to_load

CRMS = ["salesforce", "dynamics365"]

# Ids the CRM holds: STAYS stays, GOES is removed, NEW is added (the sandbox's solution ids).
STAYS, GOES, NEW = "SOL-6115380-IPC", "SOL-7204417-ABC", "SOL-8830012-DEF"
UNCONFIGURED = "SOL-5519027-XYZ"  # in no configuration: sent by id alone
# What Partner Center holds for them: every member of the Solution resource.
HELD = {
    STAYS: {
        "id": STAYS,
        "name": "Contoso Cloud Migration Factory",
        "type": "Name",
        "publisherName": "Contoso Ltd",
        "solutionType": "Service",
        "price": 12000.0,
        "quantity": 3,
        "currency": "EUR",
    },
    GOES: {"id": GOES, "name": "Fabrikam Secure Workplace", "type": "Name", "publisherName": "Fabrikam Inc"},
}
# The solutions file: NEW's details, and STAYS' under another name (Partner Center's copy must win).
SOLUTIONS_YAML = f"""\
- id: {NEW}
  name: Copilot Readiness Accelerator
  publisherName: Sandbox Partner Ltd
  solutionType: Service
- id: {STAYS}
  name: Configured name that must not replace Partner Center's
  publisherName: Someone else
"""


def full_sync(crm: str, store, staging) -> dict:
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    run_load_pc(job)
    report = commit(job, store)
    assert report["pc_to_crm"]["failed"] == 0 and report["crm_to_pc"]["failed"] == 0, report
    return report


def crm_solutions(pc, crm: str, crm_id: str) -> str | None:
    if crm == "salesforce":
        return pc.salesforce.get_record("Opportunity", crm_id).get("PC_Solutions__c")
    return pc.dynamics365.row("opportunities", crm_id).get("cosell_solutions")


def crm_edit_solutions(pc, crm: str, crm_id: str, value: str) -> None:
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_id, {"PC_Solutions__c": value})
    else:
        pc.dynamics365.edit("opportunities", crm_id, {"cosell_solutions": value})


def held_solutions(pc, referral_id: str) -> list[dict[str, Any]]:
    return pc.partner_center.referrals[referral_id]["details"]["requirements"]["solutions"]


@pytest.fixture
def solutions_file(tmp_path, monkeypatch):
    path = tmp_path / "solutions.yaml"
    path.write_text(SOLUTIONS_YAML, encoding="utf-8")
    monkeypatch.setenv(solutions_module.ENV_VAR, str(path))
    monkeypatch.setattr(solutions_module, "_cached", None)
    return path


@pytest.mark.parametrize("crm", CRMS)
def test_a_crm_edit_of_the_solutions_keeps_partner_centers_details(pc, conns, store, tmp_path, crm, solutions_file):
    seed(pc, crm)
    staging = tmp_path / "staging"
    full_sync(crm, store, staging)

    # A linked pair whose referral is open, and which Partner Center holds with two detailed solutions.
    # Not a pair whose opportunity already holds those two (a seeded flagged one can, in either
    # order): the sync rightly writes nothing to it, as the same ids in another order are the same
    # value, so "the CRM follows" would prove nothing there. The first such pair by referral id:
    # the links' order depends on the order the load's threads created them in.
    links = store.get_links(crm).sort_values("referral_id")
    row = next(
        r
        for r in links.itertuples()
        if pc.partner_center.referrals[r.referral_id]["status"] in ("New", "Active")
        and pc.partner_center.referrals[r.referral_id].get("details")
        and set(str(crm_solutions(pc, crm, str(r.crm_id)) or "").split(";")) != {STAYS, GOES}
    )
    rid, crm_id = str(row.referral_id), str(row.crm_id)
    ref = pc.partner_center.referrals[rid]
    new = copy.deepcopy(ref)
    new["details"].setdefault("requirements", {})["solutions"] = [dict(HELD[STAYS]), dict(HELD[GOES])]
    pc.partner_center._commit_update(ref, new, "Microsoft")  # a Microsoft seller attaches them in Partner Center
    full_sync(crm, store, staging)
    assert crm_solutions(pc, crm, crm_id) == f"{STAYS};{GOES}"  # the CRM follows (ids only)

    # The CRM user keeps STAYS, removes GOES and adds NEW.
    crm_edit_solutions(pc, crm, crm_id, f"{NEW};{STAYS}")
    pc.partner_center.log.clear()
    report = full_sync(crm, store, staging)
    assert report["crm_to_pc"]["updated"] >= 1, report
    patches = [p for p in pc.partner_center.requests_matching("PATCH") if rid in p.path]
    assert patches and all(p.status < 300 for p in patches), patches

    held = held_solutions(pc, rid)
    assert [s["id"] for s in held] == [STAYS, NEW]
    assert held[0] == HELD[STAYS]  # every detail of the one that stayed, none from the file
    assert held[1] == {
        "id": NEW,
        "name": "Copilot Readiness Accelerator",
        "type": "Name",
        "publisherName": "Sandbox Partner Ltd",
        "solutionType": "Service",
    }
    assert crm_solutions(pc, crm, crm_id) == f"{NEW};{STAYS}"


@pytest.mark.parametrize("crm", CRMS)
def test_a_new_referral_gets_the_configured_details_or_the_id_alone(pc, conns, store, tmp_path, crm, solutions_file):
    seed(pc, crm)
    crm_id = flag_one_more(pc, crm)
    crm_edit_solutions(pc, crm, crm_id, f"{NEW};{UNCONFIGURED}")
    full_sync(crm, store, tmp_path / "staging")
    [ref] = [d for d in pc.partner_center.referrals.values() if d.get("externalReferenceId") == crm_id]
    assert ref["details"]["requirements"]["solutions"] == [
        {"id": UNCONFIGURED},
        {
            "id": NEW,
            "name": "Copilot Readiness Accelerator",
            "type": "Name",
            "publisherName": "Sandbox Partner Ltd",
            "solutionType": "Service",
        },
    ]
