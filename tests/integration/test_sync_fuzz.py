"""Issue 12, the fuzz test: a seeded first sync of 1,000 referrals and 500 flagged opportunities,
30% of them bad in 48 distinct ways (every case the issue reproduced among them), next to good
records holding hostile but valid text (quotes, backslashes, SOQL and OData syntax, accents,
emoji, tabs, line breaks in notes).

Both CRMs, through the runner's step functions (the DAG's tasks) against the sandbox, and then a
second run. Checked: no step fails; every bad record is dead-lettered with an error naming it and
the field, and nothing is created for it; every good record is synced exactly once with exact
values; no good record is dead-lettered or lost; the second run writes nothing new.
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cosell_sandbox.seed import iso
from cosell_sync.pipeline import commit
from tests.integration.test_sync_retries import CRMS, new_job, run_load_crm, run_load_pc, up_to_load

SEED = 20261130
REFERRALS, OPPORTUNITIES, BAD_SHARE = 1000, 500, 0.30


def put(doc: dict, path: str, value: Any) -> None:
    """Sets ``path`` (dotted; ``[0]`` indexes a list) of a referral document."""
    *parents, last = path.split(".")
    cur: Any = doc
    for step in parents:
        cur = cur[step[:-3]][0] if step.endswith("[0]") else cur[step]
    cur[last] = value


# kind -> (the path to spoil, the bad value[, the field its error names when not that path])
BAD_REFERRALS: dict[str, tuple[Any, ...]] = {
    "deal value Infinity": ("details.dealValue", math.inf),
    "deal value -Infinity": ("details.dealValue", -math.inf),
    "deal value NaN": ("details.dealValue", math.nan),
    "deal value 1e300": ("details.dealValue", 1e300),
    "deal value negative": ("details.dealValue", -250.0),
    "deal value text": ("details.dealValue", "a lot"),
    "deal value boolean": ("details.dealValue", True),
    "currency not in ISO 4217": ("details.currency", "XYZ"),
    "currency a number": ("details.currency", 978),
    "notes of 1 MB": ("details.notes", "x" * 1_048_576),
    "deal name with LF": ("name", "Deal\nsplit"),
    "deal name with CR": ("name", "Deal\rsplit"),
    "deal name with C1 control": ("name", "Deal\x85split"),
    "deal name too long": ("name", "N" * 400),
    "deal name a list": ("name", ["Deal"]),
    "customer name with NUL": ("customerProfile.name", "Contoso\x00Ltd"),
    "customer name with DEL": ("customerProfile.name", "Contoso\x7fLtd"),
    "customer name a number": ("customerProfile.name", 12345),
    "customer name missing": ("customerProfile.name", None),
    "customer name blank": ("customerProfile.name", "   "),
    "postal code with ESC": ("customerProfile.address.postalCode", "98\x1b052"),
    "postal code too long": ("customerProfile.address.postalCode", "1" * 30),
    "country missing": ("customerProfile.address.country", None),
    "country not in ISO 3166": ("customerProfile.address.country", "UK"),
    "country a full name": ("customerProfile.address.country", "Germany"),
    "team as text": ("customerProfile.team", "Ada Lovelace"),
    "team member as text": ("customerProfile.team", ["Ada Lovelace"]),
    "contact email invalid": ("customerProfile.team[0].email", "not-an-address"),
    "close date not a date": ("details.closingDateTime", "next quarter"),
    "details null": ("details", None, "details."),
    "customerProfile null": ("customerProfile", None, "customerProfile."),
    "address a list": ("customerProfile.address", [{"country": "US"}]),
    "help code unknown": ("inviteContext.assistanceRequestCode", "PleaseHelp"),
    "solution id with BEL": ("details.requirements.solutions", [{"id": "sol\x07"}]),
}


# Per CRM: where the opportunity's values live.
SF, DV = "salesforce", "dynamics365"
OPP = {
    SF: {
        "amount": "Amount",
        "name": "Name",
        "notes": "Description",
        "close": "CloseDate",
        "stage": "StageName",
        "help": "PC_How_Can_Microsoft_Help__c",
        "solutions": "PC_Solutions__c",
        "link": "PC_Referral_Id__c",
        "flag": "PC_Sync_With_Partner_Center__c",
        "account": "AccountId",
        "id": "Id",
    },
    DV: {
        "amount": "estimatedvalue",
        "name": "name",
        "notes": "description",
        "close": "estimatedclosedate",
        "stage": "salesstage",
        "help": "cosell_howcanmicrosofthelp",
        "solutions": "cosell_solutions",
        "link": "cosell_referralid",
        "flag": "cosell_syncwithpartnercenter",
        "account": "_parentaccountid_value",
        "id": "opportunityid",
    },
}
ACCOUNT = {
    SF: {"name": "Name", "country": "BillingCountry", "postal": "BillingPostalCode", "path": "Account."},
    DV: {"name": "name", "country": "address1_country", "postal": "address1_postalcode", "path": "account."},
}
# kind -> (what to spoil: an opportunity field or an account field (``account.``), the value)
BAD_OPPORTUNITIES: dict[str, tuple[str, Any]] = {
    "amount NaN": ("amount", math.nan),
    "amount negative": ("amount", -1.0),
    "amount beyond the CRM's range": ("amount", 1e17),
    "opportunity name with ESC": ("name", "Opp\x1bname"),
    "opportunity name with LF": ("name", "Opp\nname"),
    "description of 40,000 characters": ("notes", "d" * 40_000),
    "opportunity close date not a date": ("close", "someday"),
    "stage unknown": ("stage", {SF: "Bogus Stage", DV: 99}),
    "opportunity help code unknown": ("help", {SF: "PleaseHelp", DV: 12345}),
    "solution ids with BEL": ("solutions", "sol\x07"),
    "no account": ("account", None),
    "account without country": ("account.country", None),
    "account country a full name": ("account.country", "Germany"),
    "account name with NUL": ("account.name", "Acme\x00Corp"),
}
# Hostile text that is valid: it must arrive exactly as it was.
HOSTILE_NAMES = [
    'O\'Brien & Søn "Ltd"',
    "Back\\slash % _ * Corp",
    "x' OR Name != '' --",
    "name eq 'a' or 1 eq 1",
    "Zoë 株式会社 🚀",
    "\u202eRTL Ltd",
    "Tab\tSeparated",
]
HOSTILE_NOTES = ["line one\nline two\r\nthree", "tabs\there", "'; DROP TABLE referrals; --", "ünïcødé ✓ — “quotes”"]


def _pick(rng: random.Random, n: int, share: float) -> set[int]:
    return set(rng.sample(range(n), round(n * share)))


def prepare_referrals(pc, rng: random.Random) -> tuple[dict[str, str], dict[str, dict]]:
    """Seeds the referrals, all open and unlinked; (bad id -> kind, good id -> document)."""
    now = datetime.now(UTC)
    ids = pc.partner_center.seed(REFERRALS, seed=SEED)
    bad_at = sorted(_pick(rng, REFERRALS, BAD_SHARE))
    kinds = list(BAD_REFERRALS)
    bad: dict[str, str] = {}
    for n, rid in enumerate(ids):
        doc = pc.partner_center.referrals[rid]
        status = rng.choice([("New", "Pending"), ("Active", "Accepted")])
        doc.update(status=status[0], substatus=status[1], direction="Incoming", externalReferenceId=None)
        doc.update(updatedDateTime=iso(now - timedelta(minutes=5)), name=f"{doc['name']} [fuzz {n}]")
        doc["details"]["dealValue"] = round(rng.uniform(1, 5_000_000), 2)
        if n % 9 == 0:  # hostile but valid text
            doc["customerProfile"]["name"] = f"{rng.choice(HOSTILE_NAMES)} {n}"
            doc["details"]["notes"] = rng.choice(HOSTILE_NOTES)
            doc["name"] = f"{rng.choice(HOSTILE_NAMES)} [fuzz {n}]"
    for i, n in enumerate(bad_at):
        kind = kinds[i % len(kinds)]
        put(pc.partner_center.referrals[ids[n]], *BAD_REFERRALS[kind][:2])
        bad[ids[n]] = kind
    good = {rid: copy.deepcopy(pc.partner_center.referrals[rid]) for rid in ids if rid not in bad}
    return bad, good


def opportunity_rows(pc, crm: str) -> dict[str, dict]:
    """The CRM's opportunities as it stores them (the live rows), by id."""
    if crm == SF:
        return {str(r["Id"]): r for r in pc.salesforce.records["Opportunity"].values() if not r.get("IsDeleted")}
    return {str(k): r for k, r in pc.dynamics365.tables["opportunities"].items()}


def account_row(pc, crm: str, account_id: Any) -> dict | None:
    if account_id is None:
        return None
    if crm == SF:
        return pc.salesforce.records["Account"].get(account_id)
    return {str(k): r for k, r in pc.dynamics365.tables["accounts"].items()}.get(str(account_id))


def new_account(pc, crm: str, n: int) -> str:
    """An account of the opportunity's own, so spoiling it touches no other record."""
    if crm == SF:
        return str(
            pc.salesforce.create_record(
                "Account", {"Name": f"Fuzz Account {n}", "BillingCountry": "US", "BillingPostalCode": "98052"}
            )["Id"]
        )
    row = pc.dynamics365.create(
        "accounts", {"name": f"Fuzz Account {n}", "address1_country": "US", "address1_postalcode": "98052"}
    )
    return str(row["accountid"])


def prepare_opportunities(pc, crm: str, rng: random.Random) -> tuple[dict[str, str], dict[str, dict]]:
    """Seeds opportunities; the first 500 flagged, open, unlinked ones are the test's (the rest
    are unflagged). (bad id -> kind, good id -> row)."""
    fields = OPP[crm]
    if crm == SF:
        pc.salesforce.seed(opportunities=OPPORTUNITIES + 150, accounts=120, flagged=OPPORTUNITIES + 150, seed=SEED)
    else:
        pc.dynamics365.seed(opportunities=OPPORTUNITIES, accounts=120, flagged=OPPORTUNITIES, seed=SEED)
    rows = opportunity_rows(pc, crm)
    closed = (lambda r: r.get("IsClosed")) if crm == SF else (lambda r: r.get("statecode") not in (0, None))
    ours = [k for k, r in rows.items() if r.get(fields["flag"]) and not closed(r) and not r.get(fields["link"])]
    assert len(ours) >= OPPORTUNITIES, len(ours)
    for extra in ours[OPPORTUNITIES:]:
        rows[extra][fields["flag"]] = False
    ours = ours[:OPPORTUNITIES]
    bad_at = sorted(_pick(rng, OPPORTUNITIES, BAD_SHARE))
    kinds = list(BAD_OPPORTUNITIES)
    bad: dict[str, str] = {}
    for n, opp_id in enumerate(ours):
        row = rows[opp_id]
        row[fields["amount"]] = round(rng.uniform(1, 5_000_000), 2)
        row[fields["name"]] = f"{row[fields['name']][:90]} [opp {n}]"
        if n % 9 == 0:
            row[fields["name"]] = f"{rng.choice(HOSTILE_NAMES)} [opp {n}]"
            row[fields["notes"]] = rng.choice(HOSTILE_NOTES)
    for i, n in enumerate(bad_at):
        kind = kinds[i % len(kinds)]
        what, value = BAD_OPPORTUNITIES[kind]
        value = value[crm] if isinstance(value, dict) else value
        row = rows[ours[n]]
        if what == "account":
            row[fields["account"]] = None
        elif what.startswith("account."):
            account_id = new_account(pc, crm, n)
            row[fields["account"]] = account_id
            account_row(pc, crm, account_id)[ACCOUNT[crm][what.removeprefix("account.")]] = value
        else:
            row[fields[what]] = value
        bad[ours[n]] = kind
    good = {k: copy.deepcopy(rows[k]) for k in ours if k not in bad}
    return bad, good


def bad_opportunity_field(crm: str, kind: str) -> str:
    """The field an opportunity's error names, for ``kind``."""
    what = BAD_OPPORTUNITIES[kind][0]
    if what == "account":
        return ACCOUNT[crm]["path"] + ACCOUNT[crm]["name"]  # the required customer name
    if what.startswith("account."):
        return ACCOUNT[crm]["path"] + ACCOUNT[crm][what.removeprefix("account.")]
    if what == "solutions" or what == "help" or what == "stage":
        return OPP[crm][what].split("_value")[0]
    return OPP[crm][what]


def names_field(error: str, field: str) -> bool:
    """Whether the dead-letter error (``field message; field message ...``) names ``field``."""
    return any(part.strip().startswith(field) for part in error.split("; "))


def currency_of(pc, crm: str, row: dict) -> str | None:
    if crm == SF:
        return row.get("CurrencyIsoCode")
    codes = {str(k): c["isocurrencycode"] for k, c in pc.dynamics365.tables["transactioncurrencies"].items()}
    return codes.get(str(row.get("_transactioncurrencyid_value")))


def text(value: Any) -> str:
    """Text as the sync keeps it: trimmed, and no text is no value."""
    return value.strip() if isinstance(value, str) else ""


def referral_mismatches(pc, crm: str, doc: dict, opp: dict) -> list[str]:
    """How the opportunity created for a good referral differs from the referral's values."""
    f, a = OPP[crm], ACCOUNT[crm]
    account = account_row(pc, crm, opp.get(f["account"])) or {}
    customer = doc["customerProfile"]
    want = {
        "name": (opp.get(f["name"]), text(doc["name"])),
        "amount": (float(opp.get(f["amount"]) or 0), round(float(doc["details"]["dealValue"]), 2)),
        "currency": (currency_of(pc, crm, opp), doc["details"]["currency"].upper()),
        "notes": (text(opp.get(f["notes"])), text(doc["details"]["notes"])),
        "close": (str(opp.get(f["close"]))[:10], doc["details"]["closingDateTime"][:10]),
        "customer": (account.get(a["name"]), text(customer["name"])),
        "country": (account.get(a["country"]), customer["address"]["country"].upper()),
        "postal": (account.get(a["postal"]), customer["address"]["postalCode"]),
    }
    return [f"{k}: {got!r} != {exp!r}" for k, (got, exp) in want.items() if got != exp]


def opportunity_mismatches(pc, crm: str, opp: dict, doc: dict) -> list[str]:
    """How the referral created for a good opportunity differs from the opportunity's values."""
    f, a = OPP[crm], ACCOUNT[crm]
    account = account_row(pc, crm, opp.get(f["account"])) or {}
    customer = doc.get("customerProfile") or {}
    want = {
        "name": (doc.get("name"), text(opp[f["name"]])),
        "amount": (doc["details"].get("dealValue"), round(float(opp[f["amount"]]), 2)),
        "currency": (doc["details"].get("currency"), currency_of(pc, crm, opp)),
        "notes": (text(doc["details"].get("notes")), text(opp.get(f["notes"]))),
        "customer": (customer.get("name"), text(account.get(a["name"]))),
        "country": ((customer.get("address") or {}).get("country"), account.get(a["country"])),
    }
    return [f"{k}: {got!r} != {exp!r}" for k, (got, exp) in want.items() if got != exp]


def run(crm: str, store, staging) -> dict:
    """One run, every step as its task runs it; a step that raised would fail the test here."""
    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    run_load_pc(job)
    return commit(job, store)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("crm", CRMS)
def test_fuzzed_first_sync_dead_letters_every_bad_record_and_syncs_every_good_one_exactly(
    pc, conns, store, tmp_path, crm
):
    rng = random.Random(f"{SEED}-{crm}")
    bad_refs, good_refs = prepare_referrals(pc, rng)
    bad_opps, good_opps = prepare_opportunities(pc, crm, rng)
    referral_ids_before = set(pc.partner_center.referrals)

    report = run(crm, store, tmp_path / "staging")

    link = OPP[crm]["link"]
    opps_by_referral: dict[str, list[dict]] = {}
    for row in opportunity_rows(pc, crm).values():
        if row.get(link):
            opps_by_referral.setdefault(str(row[link]).lower(), []).append(row)
    new_referrals: dict[str, list[dict]] = {}
    for rid, doc in pc.partner_center.referrals.items():
        if rid not in referral_ids_before:
            new_referrals.setdefault(str(doc.get("externalReferenceId") or "").lower(), []).append(doc)

    # Good referrals: one opportunity each, holding exactly the referral's values.
    lost, wrong = [], []
    for rid, doc in good_refs.items():
        made = opps_by_referral.get(rid.lower(), [])
        if len(made) != 1:
            lost.append(f"referral {rid}: {len(made)} opportunities")
            continue
        wrong += [f"referral {rid} {m}" for m in referral_mismatches(pc, crm, doc, made[0])]
        held = pc.partner_center.referrals[rid].get("externalReferenceId")
        assert str(held).lower() == str(made[0][OPP[crm]["id"]]).lower(), rid
    # Good opportunities: one referral each, holding exactly the opportunity's values.
    for opp_id, row in good_opps.items():
        made = new_referrals.get(opp_id.lower(), [])
        if len(made) != 1:
            lost.append(f"opportunity {opp_id}: {len(made)} referrals")
            continue
        wrong += [f"opportunity {opp_id} {m}" for m in opportunity_mismatches(pc, crm, row, made[0])]
        assert str(opportunity_rows(pc, crm)[opp_id].get(link)).lower() == made[0]["id"].lower(), opp_id
    # Bad records: nothing made for them; one dead-letter row each, naming the field.
    for rid in bad_refs:
        assert rid.lower() not in opps_by_referral, (rid, bad_refs[rid])
    for opp_id in bad_opps:
        assert opp_id.lower() not in new_referrals, (opp_id, bad_opps[opp_id])
    dead = store.dead_letter(crm)
    errors = {str(k).lower(): str(e) for k, e in zip(dead["record_key"], dead["last_error"], strict=True)}
    unnamed = []
    for rid, kind in bad_refs.items():
        field = BAD_REFERRALS[kind][-1] if len(BAD_REFERRALS[kind]) == 3 else BAD_REFERRALS[kind][0]
        if not names_field(errors.get(rid.lower(), ""), field):
            unnamed.append(f"referral {rid} ({kind}): {errors.get(rid.lower())!r} does not name {field}")
    for opp_id, kind in bad_opps.items():
        field = bad_opportunity_field(crm, kind)
        if not names_field(errors.get(opp_id.lower(), ""), field):
            unnamed.append(f"opportunity {opp_id} ({kind}): {errors.get(opp_id.lower())!r} does not name {field}")
    good_dead = sorted(set(errors) - {k.lower() for k in [*bad_refs, *bad_opps]})

    kinds = Counter(bad_refs.values()) + Counter(bad_opps.values())
    records = len(bad_refs) + len(good_refs) + len(bad_opps) + len(good_opps)
    print(
        f"\n[fuzz {crm}] {len(good_refs) + len(bad_refs)} referrals, {len(good_opps) + len(bad_opps)} opportunities;"
        f" bad {len(bad_refs) + len(bad_opps)} of {records} ({(len(bad_refs) + len(bad_opps)) / records:.0%})"
        f" in {len(kinds)} kinds ({len(set(bad_refs.values()))} referral, {len(set(bad_opps.values()))} opportunity);"
        f" good {len(good_refs) + len(good_opps)}; lost {len(lost)}; wrong values {len(wrong)};"
        f" bad not dead-lettered by field {len(unnamed)}; good dead-lettered {len(good_dead)}"
    )
    assert not lost, lost[:10]
    assert not wrong, wrong[:10]
    assert not unnamed, unnamed[:10]
    assert not good_dead, [(k, errors[k]) for k in good_dead[:10]]
    assert len(kinds) >= 25 and (len(bad_refs) + len(bad_opps)) / records >= 0.3, kinds
    assert report["pc_to_crm"]["created"] == len(good_refs), report["pc_to_crm"]
    assert report["crm_to_pc"]["created"] == len(good_opps), report["crm_to_pc"]
    assert report["pc_to_crm"]["failed"] == len(bad_refs), report["pc_to_crm"]
    assert report["crm_to_pc"]["failed"] == len(bad_opps), report["crm_to_pc"]

    # The next run: nothing new is created, the bad records stay dead-lettered (a further attempt).
    opportunities, referrals = len(opportunity_rows(pc, crm)), len(pc.partner_center.referrals)
    again = run(crm, store, tmp_path / "staging")
    assert (len(opportunity_rows(pc, crm)), len(pc.partner_center.referrals)) == (opportunities, referrals)
    assert again["pc_to_crm"]["created"] == 0 and again["crm_to_pc"]["created"] == 0, again
    dead = store.dead_letter(crm)
    assert set(dead["record_key"].str.lower()) == set(errors), "the dead letter changed"
    assert (dead["attempts"] == 2).all(), dead["attempts"].value_counts()
