"""Issue 12, cases 1 and 3, through the runner steps and the sandbox, for both CRMs: a run with
good and bad referrals and opportunities syncs every good one with exact values and
dead-letters every bad one, with an error naming the record and the field."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from cosell_sandbox.seed import iso
from cosell_sync.pipeline import commit
from tests.integration.test_sync_retries import CRMS, new_job, run_load_crm, run_load_pc, seed, up_to_load

# referral id suffix -> (how to spoil the document, the field its error names)
BAD_REFERRALS = {
    "inf": (lambda d: d["details"].update(dealValue=math.inf), "details.dealValue"),
    "nan": (lambda d: d["details"].update(dealValue=math.nan), "details.dealValue"),
    "huge": (lambda d: d["details"].update(dealValue=1e300), "details.dealValue"),
    "xyz": (lambda d: d["details"].update(currency="XYZ"), "details.currency"),
    "megabyte": (lambda d: d["details"].update(notes="x" * 1_048_576), "details.notes"),
    "nul": (lambda d: d["customerProfile"].update(name="Contoso\x00Ltd"), "customerProfile.name"),
    "esc": (
        lambda d: d["customerProfile"]["address"].update(postalCode="98\x1b052"),
        "customerProfile.address.postalCode",
    ),
    "lf": (lambda d: d.update(name="Deal\nsplit"), "name"),
    "team": (lambda d: d["customerProfile"].update(team="Ada Lovelace"), "customerProfile.team[0]"),
    "details": (lambda d: d.update(details=None), "details."),
}
CRM_FIELDS = {
    "salesforce": {"amount": "Amount", "name": "Name", "notes": "Description"},
    "dynamics365": {"amount": "estimatedvalue", "name": "name", "notes": "description"},
}
BAD_OPPORTUNITIES = {  # what to spoil -> the value
    "amount": math.nan,
    "name": "Opp\x1bname",
    "notes": "d" * 40_000,  # more than either CRM's description holds
}


def opportunity_rows(pc, crm: str) -> dict[str, dict]:
    if crm == "salesforce":
        return {str(r["Id"]): r for r in pc.salesforce.records["Opportunity"].values() if not r.get("IsDeleted")}
    return {str(k): r for k, r in pc.dynamics365.tables["opportunities"].items()}


def flagged_unlinked(pc, crm: str) -> list[str]:
    flag, link = (
        ("PC_Sync_With_Partner_Center__c", "PC_Referral_Id__c")
        if crm == "salesforce"
        else ("cosell_syncwithpartnercenter", "cosell_referralid")
    )
    return sorted(k for k, r in opportunity_rows(pc, crm).items() if r.get(flag) and not r.get(link))


@pytest.mark.parametrize("crm", CRMS)
def test_bad_records_are_dead_lettered_naming_record_and_field_good_ones_sync_exactly(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    now = iso(datetime.now(UTC))
    ids = pc.partner_center.seed(len(BAD_REFERRALS) + 6, seed=63)
    bad_refs: dict[str, str] = {}
    good_refs: dict[str, dict] = {}
    for i, rid in enumerate(ids):
        doc = pc.partner_center.referrals[rid]
        doc.update(status="New", substatus="Pending", updatedDateTime=now, externalReferenceId=None)
        doc["customerProfile"]["name"] = f"Validation Customer {i}"
        doc["details"].update(dealValue=1000 + i + 0.25, currency="EUR", notes=f"line one\nline two {i}")
        if i < len(BAD_REFERRALS):
            spoil, field = list(BAD_REFERRALS.values())[i]
            spoil(doc)
            bad_refs[rid] = field
        else:
            good_refs[rid] = {"name": doc["name"], "amount": 1000 + i + 0.25, "notes": f"line one\nline two {i}"}

    names = CRM_FIELDS[crm]
    flagged = flagged_unlinked(pc, crm)
    assert len(flagged) >= len(BAD_OPPORTUNITIES) + 2, flagged
    rows = opportunity_rows(pc, crm)
    bad_opps = {}
    for opp_id, (what, value) in zip(flagged, BAD_OPPORTUNITIES.items(), strict=False):
        rows[opp_id][names[what]] = value
        bad_opps[opp_id] = names[what]
    good_opps = {k: dict(rows[k]) for k in flagged if k not in bad_opps}

    job = new_job(crm, store, tmp_path / "staging")
    up_to_load(job, store)
    assert run_load_crm(job)["failed"] == 0
    assert run_load_pc(job)["failed"] == 0
    report = commit(job, store)

    # Every good referral is an opportunity holding exactly its values.
    by_ref = {
        str(r.get(job.mapping.records["link_field"])).lower(): r
        for r in opportunity_rows(pc, crm).values()
        if r.get(job.mapping.records["link_field"])
    }
    for rid, want in good_refs.items():
        opp = by_ref[rid.lower()]
        assert opp[names["name"]] == want["name"]
        assert float(opp[names["amount"]]) == want["amount"]
        assert opp[names["notes"]] == want["notes"]
    # Every good flagged opportunity is a referral holding its values.
    referrals = {str(d.get("externalReferenceId") or "").lower(): d for d in pc.partner_center.referrals.values()}
    for opp_id, opp in good_opps.items():
        doc = referrals[opp_id.lower()]
        assert doc["name"] == opp[names["name"]]
        assert float(doc["details"]["dealValue"]) == float(opp[names["amount"]])

    # Every bad record: nothing created for it, one dead-letter row naming it and the field.
    for rid in bad_refs:
        assert rid.lower() not in by_ref, rid
    for opp_id in bad_opps:
        assert opp_id.lower() not in referrals, opp_id
    dead = store.dead_letter(crm)
    errors = {str(k).lower(): str(e) for k, e in zip(dead["record_key"], dead["last_error"], strict=True)}
    for key, field in [*bad_refs.items(), *bad_opps.items()]:
        assert key.lower() in errors, (key, field, errors)
        assert errors[key.lower()].startswith(field) or f"; {field}" in errors[key.lower()], (key, field, errors)
    assert set(errors) == {k.lower() for k in [*bad_refs, *bad_opps]}, errors
    assert report["pc_to_crm"]["failed"] == len(bad_refs), report
    assert report["crm_to_pc"]["failed"] == len(bad_opps), report
    # The spoiled values never reached the other side.
    created = [r for k, r in opportunity_rows(pc, crm).items() if k not in bad_opps]
    assert not any(isinstance(v, str) and ("\x00" in v or "\x1b" in v) for r in created for v in r.values())
    assert not any("\x1b" in str(d.get("name")) for d in pc.partner_center.referrals.values())
