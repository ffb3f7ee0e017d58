"""Issue 13: co-sell with Microsoft, both steps, on both CRMs. A flagged opportunity that asks for
Microsoft's help ends as two referrals in one engagement: the partner's Shared referral (target its
SolutionProfile) and the request to Microsoft (target BusinessProfileLocation "msft"). Retries,
lost answers and later runs create nothing more; an opportunity that asks for no help stays
partner-led; Microsoft's side of an engagement is never imported as a deal of its own."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import requests

from cosell_sandbox.server import FaultConfig
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS
from cosell_sync.sides.partner_center import MICROSOFT, microsoft_side
from cosell_sync.state import StateStore
from tests.helpers import Receiver
from tests.integration.sync_jobs import event_job
from tests.integration.test_sync_fuzz import run
from tests.integration.test_sync_retries import CRMS, commit, new_job, run_load_crm, run_load_pc, up_to_load
from tests.integration.test_webhook_receiver import post


def seed(pc, crm: str, flagged: int = 6) -> None:
    if crm == "salesforce":
        pc.salesforce.seed(opportunities=flagged + 2, accounts=3, flagged=flagged, seed=13)
    else:
        pc.dynamics365.seed(opportunities=flagged + 2, accounts=3, flagged=flagged, seed=13)


def engagements(pc) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in pc.partner_center.referrals.values():
        out.setdefault(doc["engagementId"], []).append(doc)
    return out


def opportunity_ids(pc, crm: str) -> dict[str, dict]:
    if crm == "salesforce":
        return {r["Id"]: r for r in pc.salesforce.list_records("Opportunity")}
    return {r["opportunityid"]: r for r in pc.dynamics365.rows("opportunities")}


def help_field(crm: str) -> str:
    return "PC_How_Can_Microsoft_Help__c" if crm == "salesforce" else "cosell_howcanmicrosofthelp"


def assert_cosell(pc, crm: str, seeded: set[str]) -> tuple[int, int]:
    """Every referral made for a flagged opportunity: two in its engagement when it asks for help
    (the second for Microsoft), one when it does not. Returns (co-sell, partner-led) counts."""
    opps = opportunity_ids(pc, crm)
    cosell = partner_led = 0
    for engagement in engagements(pc).values():
        partner = [d for d in engagement if not microsoft_side(d)]
        assert len(partner) == 1, engagement
        doc = partner[0]
        if doc["id"] in seeded:
            assert len(engagement) == 1, engagement  # imported: nothing asked of Microsoft by the sync
            continue
        opp = opps[str(doc.get("externalReferenceId"))]
        requests = [d for d in engagement if microsoft_side(d)]
        share = "PC_Share_With_Microsoft__c" if crm == "salesforce" else "cosell_sharewithmicrosoft"
        if opp.get(share) is False:  # a private deal: not shared with Microsoft, whatever the help field
            assert doc["type"] == "Independent" and not requests, engagement
            assert doc["consent"]["consentToShareReferralWithMicrosoftSellers"] is False
            partner_led += 1
        elif opp.get(help_field(crm)) is not None:
            assert doc["type"] == "Shared" and doc["target"][0]["type"] == "SolutionProfile", doc
            assert len(requests) == 1, engagement
            assert requests[0]["target"] == [MICROSOFT]
            assert not requests[0].get("externalReferenceId")  # one referral per opportunity holds its id
            assert (
                requests[0]["inviteContext"]["assistanceRequestCode"] == doc["inviteContext"]["assistanceRequestCode"]
            )
            cosell += 1
        else:
            assert doc["type"] == "Independent" and not requests, engagement
            partner_led += 1
    return cosell, partner_led


@pytest.mark.parametrize("crm", CRMS)
def test_help_requested_engages_microsoft_once_across_retries_lost_answers_and_runs(pc, conns, store, tmp_path, crm):
    seeded = set(pc.partner_center.seed(3, seed=13))
    seed(pc, crm)
    opps = opportunity_ids(pc, crm)
    flag = "PC_Sync_With_Partner_Center__c" if crm == "salesforce" else "cosell_syncwithpartnercenter"
    closed = (lambda r: r.get("IsClosed")) if crm == "salesforce" else (lambda r: r.get("statecode") != 0)
    flagged = [k for k, r in opps.items() if r.get(flag) and not closed(r)]  # each makes a referral
    assert len(flagged) >= 4, flagged
    no_help, private = flagged[:2]  # one asks for no help (partner-led), one is private (help or not)
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", no_help, {"PC_How_Can_Microsoft_Help__c": None})
        pc.salesforce.user_edit("Opportunity", private, {"PC_Share_With_Microsoft__c": False})
    else:
        pc.dynamics365.edit("opportunities", no_help, {"cosell_howcanmicrosofthelp": None})
        pc.dynamics365.edit("opportunities", private, {"cosell_sharewithmicrosoft": False})
    # The answer to the first request to Microsoft is lost (processed, connection dropped).
    pc.partner_center.faults.configure(
        FaultConfig(drop_after_rate=1.0, max_faults=1, methods=("POST",), after=len(flagged))
    )

    staging = tmp_path / "staging"
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    first = run_load_pc(job)
    assert first["failed"] == 0, first
    assert pc.partner_center.faults.injected["drop_after"] == 1
    cosell, partner_led = assert_cosell(pc, crm, seeded)
    assert (cosell, partner_led) == (len(flagged) - 2, 2)
    before = len(pc.partner_center.referrals)

    run_load_pc(job)  # a retry of the task, or "Clear task"
    report = commit(job, store)
    assert report["writes"]["partner_center"]["asked_microsoft"] == cosell, report["writes"]  # once each
    run(crm, store, staging)  # and the next run
    assert len(pc.partner_center.referrals) == before
    assert assert_cosell(pc, crm, seeded) == (cosell, partner_led)
    # Microsoft's side is never imported into the CRM as a deal of its own.
    link = "PC_Referral_Id__c" if crm == "salesforce" else "cosell_referralid"
    held = Counter(str(r.get(link)) for r in opportunity_ids(pc, crm).values() if r.get(link))
    asked = {d["id"] for d in pc.partner_center.referrals.values() if microsoft_side(d)}
    assert asked and not asked & set(held) and max(held.values()) == 1
    if out := os.environ.get("COSELL_ENGAGEMENT_OUT"):  # one engagement as the sandbox holds it
        shown = next(e for e in engagements(pc).values() if any(microsoft_side(d) for d in e))
        Path(out).write_text(json.dumps(shown, indent=2))


@pytest.mark.parametrize("crm", CRMS)
def test_microsoft_accepting_reaches_the_crm_through_the_webhook_path(
    pc, conns, hook, client, state_url, tmp_path, crm
):
    """Microsoft accepts its side of the engagement (a sandbox Microsoft action): Partner Center sends
    related-referral-updated for the partner's referral, the receiver stores it in the inbox, and
    the event-driven run for that referral writes Microsoft's status to the opportunity."""
    seed(pc, crm, flagged=1)
    store = StateStore(state_url)
    store.migrate()
    staging = tmp_path / "staging"
    run(crm, store, staging)
    field = "PC_Microsoft_Status__c" if crm == "salesforce" else "cosell_microsoftstatus"
    [(referral, request)] = [
        (p, m) for e in engagements(pc).values() for p in e for m in e if not microsoft_side(p) and microsoft_side(m)
    ]
    opp_id = str(referral["externalReferenceId"])
    # The link's base holds Microsoft's side as asked (requested): the next run is quiet, and the
    # opportunity shows Microsoft's side once Microsoft acts on it.
    again = run(crm, store, staging)
    assert again["pc_to_crm"]["updated"] == 0 and opportunity_ids(pc, crm)[opp_id][field] is None, again

    wire = Receiver(pc.pki.server_context())
    try:
        hook.create_webhook_registration(wire.url, list(REFERRAL_EVENTS))
        requests.post(
            f"{pc.origin('partner_center')}/_sandbox/engagements/{referral['engagementId']}/microsoft",
            json={"action": "accept"},
            verify=str(pc.pki.ca_cert),
            timeout=10,
        ).raise_for_status()
        wire.wait_for(1)
    finally:
        wire.close()
    headers, body = wire.received[0]
    assert json.loads(body)["EventName"] == "related-referral-updated"
    assert post(client, body, dict(headers)).status_code == 200
    ids = [row["referral_id"] for row in store.inbox_pending()]
    assert ids == [referral["id"]]  # the partner's referral, to re-read with its engagement

    job = event_job(crm, staging, ids)
    up_to_load(job, store)
    run_load_crm(job)
    run_load_pc(job)
    report = commit(job, store)
    assert opportunity_ids(pc, crm)[opp_id][field] == "Accepted", report
    assert pc.partner_center.referrals[request["id"]]["status"] == "Active"
    store.close()
