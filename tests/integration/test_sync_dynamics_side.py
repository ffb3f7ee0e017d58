"""DynamicsSide (the Dynamics 365 side of the sync) against the Dataverse emulator, through
the real DynamicsHook (msal + requests over HTTPS)."""

from __future__ import annotations

import copy
import re
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cosell_sandbox.dynamics365.choices import DEFAULT_CHOICE_BASE
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.normalize import crm_frame, referrals_frame
from cosell_sync.errors import TransportError
from cosell_sync.hooks.batch import BatchRequest
from cosell_sync.sides.base import RunContext, match_key
from cosell_sync.sides.dynamics365 import DynamicsSide
from tests.helpers import with_paths

DV = load_mapping("dynamics365")
API = "/api/data/v9.2"
# The sync status options (Synced, Pending, Error) in the emulator's publisher prefix.
SYNCED, ERROR = DEFAULT_CHOICE_BASE, DEFAULT_CHOICE_BASE + 2
NOW = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def ctx(run_id: str = "manual__1", **over) -> RunContext:
    return RunContext(dag_id="cosell_sync_dynamics365", run_id=run_id, now=over.pop("now", NOW), **over)


def referral(rid: str, **over) -> dict:
    """A referral document; ``a__b=value`` sets a nested key."""
    doc = {
        "id": rid,
        "name": f"Deal {rid}",
        "status": "New",
        "substatus": "Pending",
        "direction": "Incoming",
        "updatedDateTime": NOW.isoformat(),
        "salesStage": "Develop",
        "customerProfile": {
            "name": f"Customer of {rid}",
            "address": {"country": "US", "postalCode": "98052", "city": "Redmond", "addressLine1": "1 Way"},
            "team": [
                {"firstName": "Ada", "lastName": f"Buyer {rid}"[:50], "email": f"buyer.{rid}@example.com"},
            ],
        },
        "details": {
            "dealValue": 1000,
            "currency": "USD",
            "closingDateTime": "2027-01-31T00:00:00Z",
            "notes": f"notes for {rid}",
            "requirements": {"solutions": [{"id": "SOL-2"}, {"id": "SOL-1"}]},
        },
        "inviteContext": {"assistanceRequestCode": "QuotesOrLicensing"},
    }
    return with_paths(doc, over)


def creates_of(docs: list[dict]) -> pd.DataFrame:
    """The planner's ``crm_creates`` shape: referral_id + every canonical field."""
    normalized = referrals_frame(docs, DV)
    assert normalized.errors.empty, normalized.errors
    return normalized.frame[["referral_id", *DV.fields]]


def updates_of(*items: tuple[str, str, dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"crm_id": c, "referral_id": r, "fields": f} for c, r, f in items], columns=["crm_id", "referral_id", "fields"]
    )


@pytest.fixture
def dv(pc):
    return pc.dynamics365


@pytest.fixture
def side(dyn_hook):
    return DynamicsSide(dyn_hook, DV)


@pytest.fixture
def batches(side, monkeypatch):
    """Every request the side sends through $batch, as (method, url, body, headers)."""
    seen: list[BatchRequest] = []
    real = side.hook.batch

    def spy(items, **kwargs):
        seen.extend(items)
        return real(items, **kwargs)

    monkeypatch.setattr(side.hook, "batch", spy)
    return seen


def opportunities(dv) -> dict[str, dict]:
    return {row["cosell_referralid"]: row for row in dv.rows("opportunities") if row.get("cosell_referralid")}


def writes(dv) -> list:
    return [e for e in dv.log if e.method in ("POST", "PATCH", "PUT", "DELETE") and e.path.startswith(API)]


# -- extract ------------------------------------------------------------------------------------------------


def test_initial_load_extracts_every_opportunity_nested_and_normalizable(dv, side):
    seeded = dv.seed(opportunities=25, accounts=4, flagged=5, seed=7)
    dv.log.clear()
    records = side.extract()
    assert sorted(r["opportunityid"] for r in records) == sorted(seeded["opportunities"])

    accounts = {a["accountid"]: a for a in dv.rows("accounts")}
    contacts = {c["contactid"]: c for c in dv.rows("contacts")}
    for record in records:
        raw = dv.row("opportunities", record["opportunityid"])
        assert record["account"]["name"] == accounts[raw["_parentaccountid_value"]]["name"]
        assert (
            record["account"]["address1_postalcode"] == accounts[raw["_parentaccountid_value"]]["address1_postalcode"]
        )
        if raw["_parentcontactid_value"]:
            assert record["contact"]["emailaddress1"] == contacts[raw["_parentcontactid_value"]]["emailaddress1"]
        else:
            assert record["contact"] is None
        assert record["transactioncurrency"]["isocurrencycode"] in {"USD", "GBP", "CAD", "AUD", "EUR"}
        assert "cosell_audit" in record and "@odata.etag" in record

    normalized = crm_frame(records, side.mapping, "opportunityid")  # choices in the org's values
    assert normalized.errors.empty, normalized.errors
    frame = normalized.frame.set_index("crm_id")
    assert len(frame) == 25 and int(frame["sync_flag"].sum()) == 5
    one = records[0]
    assert frame.loc[one["opportunityid"], "customer_name"] == one["account"]["name"]
    assert frame.loc[one["opportunityid"], "currency"] == one["transactioncurrency"]["isocurrencycode"]

    # one paged opportunity read with the needed columns; the currency table read once
    opp_reads = dv.requests_matching("GET", f"{API}/opportunities")
    assert len(opp_reads) == 1
    select = re.search(r"\$select=([^&]+)", opp_reads[0].target).group(1).split(",")
    needed = {
        "opportunityid",
        "modifiedon",
        "statecode",
        "cosell_audit",
        "_parentaccountid_value",
        "_parentcontactid_value",
        "_transactioncurrencyid_value",
        "estimatedvalue",
        "cosell_referralid",
    }
    assert needed <= set(select)
    assert len(dv.requests_matching("GET", f"{API}/transactioncurrencies")) == 1
    side.extract()
    assert len(dv.requests_matching("GET", f"{API}/transactioncurrencies")) == 1


def test_extract_by_modifiedon_window(dv, side):
    ids = dv.seed(opportunities=6, accounts=2)["opportunities"]
    time.sleep(1.1)  # modifiedon has second precision
    since = datetime.now(UTC)
    time.sleep(1.1)
    dv.edit("opportunities", ids[1], {"description": "changed 1"})
    dv.edit("opportunities", ids[4], {"description": "changed 4"})
    time.sleep(1.1)
    until = datetime.now(UTC)
    time.sleep(1.1)
    dv.edit("opportunities", ids[2], {"description": "changed later"})

    window = side.extract(since=since, until=until)
    assert sorted(r["opportunityid"] for r in window) == sorted([ids[1], ids[4]])
    assert all(r["account"] for r in window)
    assert sorted(r["opportunityid"] for r in side.extract(since=since)) == sorted([ids[1], ids[2], ids[4]])
    assert len(side.extract()) == 6


def test_extract_by_ids_escapes_quotes_and_chunks(dv, side):
    tricky = "ref-O'Brien-(1)"
    injection = "x' or cosell_referralid ne 'y"
    made = {}
    for n in range(60):
        rid = tricky if n == 0 else f"ref-{n:03d}"
        made[rid] = dv.create("opportunities", {"name": f"Deal {n}", "cosell_referralid": rid})["opportunityid"]
    dv.log.clear()

    wanted = [tricky, *(f"ref-{n:03d}" for n in range(1, 55))]
    got = side.extract(referral_ids=wanted)
    assert sorted(r["cosell_referralid"] for r in got) == sorted(wanted)
    assert len(dv.requests_matching("GET", f"{API}/opportunities")) == 2  # 55 ids: chunks of 50

    only = side.extract(referral_ids=[tricky])
    assert [r["opportunityid"] for r in only] == [made[tricky]]
    assert side.extract(referral_ids=[injection]) == []  # the quote does not escape the literal

    by_crm = side.extract(crm_ids=[made["ref-007"], made["ref-042"].upper(), "not-a-guid"])
    assert sorted(r["cosell_referralid"] for r in by_crm) == ["ref-007", "ref-042"]
    both = side.extract(crm_ids=[made["ref-001"]], referral_ids=["ref-001", "ref-002"])
    assert sorted(r["cosell_referralid"] for r in both) == ["ref-001", "ref-002"]
    assert side.extract(referral_ids=[]) == []


# -- create -------------------------------------------------------------------------------------------------


def test_create_matches_and_creates_accounts_and_contacts_and_writes_link_and_audit(dv, side, batches):
    existing_account = dv.create(
        "accounts", {"name": "NORTHWIND   traders", "address1_postalcode": "EC2A4NE", "address1_country": "GB"}
    )["accountid"]
    other_postal = dv.create("accounts", {"name": "Fabrikam Inc", "address1_postalcode": "99999"})["accountid"]
    existing_contact = dv.create(
        "contacts", {"lastname": "Existing", "emailaddress1": "Ada.Existing@Northwind.example"}
    )["contactid"]
    dv.log.clear()

    shared = [  # 10 rows share 3 accounts (spelled differently); one of them already exists
        ("Northwind Traders", "EC2A 4NE"),
        ("Fabrikam Inc", "10017"),
        ("fabrikam  INC", "100 17"),
        ("Tailspin Toys", "2000"),
    ]
    docs = []
    for n in range(30):
        rid = f"PC-{n:04d}"
        over = {}
        if n < 10:
            name, postal = shared[n % 4]
            over = {"customerProfile__name": name, "customerProfile__address__postalCode": postal}
        doc = referral(rid, **over)
        if n in (0, 4):  # the existing contact, in another case
            doc["customerProfile"]["team"][0]["email"] = "ada.existing@NORTHWIND.example"
        if n == 5:  # no last name: falls back to the e-mail's local part
            doc["customerProfile"]["team"][0].pop("lastName")
        if n == 6:
            doc["details"]["currency"] = "eur"
        docs.append(doc)
    creates = creates_of(docs)

    results = side.create(creates, ctx())

    assert [r.key for r in results] == [d["id"] for d in docs]
    assert all(r.ok and r.action == "create" for r in results), [r.error for r in results if not r.ok]
    assert all(GUID.match(r.crm_id) for r in results)
    assert results[4].fields["customer_name"] == "Northwind Traders" and results[4].fields["deal_value"] == 1000

    accounts = dv.rows("accounts")
    assert len(accounts) == 2 + 2 + 20  # existing two; Fabrikam 10017 and Tailspin; one per other row
    by_key = {match_key(a["name"], a["address1_postalcode"]): a["accountid"] for a in accounts}
    assert by_key[match_key("Northwind Traders", "EC2A 4NE")] == existing_account
    assert other_postal not in {r["_parentaccountid_value"] for r in dv.rows("opportunities")}

    contacts = {c["emailaddress1"].lower(): c for c in dv.rows("contacts")}
    assert len(contacts) == 1 + 28  # rows 0 and 4 matched the existing contact
    fallback = contacts["buyer.pc-0005@example.com"]
    assert fallback["lastname"] == "buyer.pc-0005" and fallback["firstname"] == "Ada"

    opps = opportunities(dv)
    assert len(dv.rows("opportunities")) == 30 and set(opps) == {d["id"] for d in docs}
    for n, (doc, result) in enumerate(zip(docs, results, strict=True)):
        row = opps[doc["id"]]
        assert row["opportunityid"] == result.crm_id
        name = doc["customerProfile"]["name"]
        postal = doc["customerProfile"]["address"]["postalCode"]
        assert row["_parentaccountid_value"] == by_key[match_key(name, postal)]
        email = doc["customerProfile"]["team"][0]["email"].lower()
        assert row["_parentcontactid_value"] == contacts[email]["contactid"]
        if n not in (0, 4):
            assert contacts[email]["_parentcustomerid_value"] == row["_parentaccountid_value"]
        assert row["cosell_referrallink"] == ctx().referral_link(doc["id"])
        assert row["cosell_syncstatus"] == SYNCED and row["statecode"] == 0
        assert row["cosell_audit"].startswith("2026-11-02T09:30:00Z manual__1 pc_to_crm {")
        assert f'"name":"Deal {doc["id"]}"' in row["cosell_audit"]
        assert row["estimatedvalue"] == 1000 and row["estimatedclosedate"] == "2027-01-31"
        assert row["cosell_howcanmicrosofthelp"] == DEFAULT_CHOICE_BASE + 3 and row["salesstage"] == 1
        assert row["cosell_solutions"] == "SOL-1;SOL-2" and row["description"] == f"notes for {doc['id']}"
    assert opps["PC-0000"]["_parentcontactid_value"] == existing_contact
    currencies = {c["transactioncurrencyid"]: c["isocurrencycode"] for c in dv.rows("transactioncurrencies")}
    assert currencies[opps["PC-0006"]["_transactioncurrencyid_value"]] == "EUR"
    assert currencies[opps["PC-0007"]["_transactioncurrencyid_value"]] == "USD"

    # batched: one $batch for the accounts, one for the contacts, one for the opportunities
    assert len(dv.requests_matching("POST", f"{API}/$batch")) == 3
    assert not dv.requests_matching("PATCH") and not dv.requests_matching("POST", f"{API}/accounts")
    upserts = [b for b in batches if b.method == "PATCH"]
    assert len(upserts) == 30 and all("cosell_referralid=" in b.url for b in upserts)
    assert all("statecode" not in b.body and "cosell_referralid" not in b.body for b in upserts)

    # what was created reads back as the same canonical deal
    normalized = crm_frame(side.extract(), side.mapping, "opportunityid")
    assert normalized.errors.empty, normalized.errors
    back = normalized.frame.set_index("referral_ref")
    source = creates.set_index("referral_id")
    for field in DV.fields:
        if field == "stage":
            assert set(back[field]) == {"*"}  # an open opportunity says nothing about new vs active
            continue
        if field in ("customer_name", "customer_postal_code", "customer_country", "customer_city", "customer_street"):
            continue  # rows 0-9 were matched to accounts spelled differently
        if field.startswith("contact_"):
            continue  # rows 0 and 4 were matched to an existing contact
        if field == "share_with_microsoft":  # these referrals carry no consent: the column's default (Yes)
            assert set(source[field]) == {"*"} and set(back[field]) == {True}
            continue
        assert back.loc[source.index, field].tolist() == source[field].tolist(), field
    assert back.loc["PC-0020", "customer_name"] == "Customer of PC-0020"


def test_creating_the_same_rows_again_adopts_instead_of_duplicating_or_overwriting(dv, side):
    docs = [referral(f"again-{n}") for n in range(4)]
    docs.append(referral("again-O'Brien & Co 100% (x)"))
    docs[4]["customerProfile"]["team"][0]["email"] = "obrien@example.com"
    first = side.create(creates_of(docs), ctx("run_1"))
    assert all(r.ok for r in first)
    counts = {t: len(dv.rows(t)) for t in ("opportunities", "accounts", "contacts")}

    docs[2]["details"]["dealValue"] = 2500
    later = NOW + timedelta(hours=1)
    second = side.create(creates_of(docs), ctx("run_2", now=later))
    assert all(r.ok for r in second)
    assert [r.crm_id for r in second] == [r.crm_id for r in first]
    assert {t: len(dv.rows(t)) for t in counts} == counts == {"opportunities": 5, "accounts": 5, "contacts": 5}
    assert opportunities(dv)["again-O'Brien & Co 100% (x)"]["opportunityid"] == first[4].crm_id
    row = opportunities(dv)["again-2"]
    assert row["estimatedvalue"] == 1000  # adopted as it is: never written over
    assert len(row["cosell_audit"].split("\n")) == 1 and " run_1 " in row["cosell_audit"]
    # It holds another value than this plan's: no base for it, so the next run settles it as a conflict.
    assert second[2].fields["deal_value"] is None and second[3].fields["deal_value"] == 1000


def test_bad_currency_bad_choice_and_oversized_text_fail_only_their_own_rows(dv, side):
    # Normalize rejects these values first (issue 12); the side must still fail only their rows.
    creates = creates_of([referral(f"mixed-{n}") for n in range(6)])
    creates.loc[1, "currency"] = "XYZ"
    creates.loc[3, "notes"] = "x" * 1_000_000
    creates.loc[4, "help_code"] = "NoSuchHelp"
    creates.loc[5, "customer_name"] = "A" * 500  # longer than account.name allows

    results = side.create(creates, ctx())

    assert [r.ok for r in results] == [True, False, True, False, False, False]
    assert "currency" in results[1].error and "'XYZ'" in results[1].error
    assert results[3].error_code == "0x80044331" and "'description'" in results[3].error and "2000" in results[3].error
    assert "help_code" in results[4].error and "NoSuchHelp" in results[4].error
    assert results[5].error_code == "0x80044331" and results[5].error.startswith("account 'AAAA")
    assert all(r.crm_id is None for r in results if not r.ok)
    assert set(opportunities(dv)) == {"mixed-0", "mixed-2"}


def test_a_failed_batch_call_fails_its_records_and_a_bug_fails_the_task(dv, side, monkeypatch):
    real = side.hook.batch
    error: Exception = TransportError("Dataverse", "connection reset by a very unlucky peer", method="POST")

    def flaky(items, **kwargs):
        if any(b.method == "PATCH" for b in items):
            raise error
        return real(items, **kwargs)

    monkeypatch.setattr(side.hook, "batch", flaky)
    results = side.create(creates_of([referral("boom-1"), referral("boom-2")]), ctx())
    assert [r.ok for r in results] == [False, False]
    assert all("unlucky peer" in r.error for r in results)
    assert opportunities(dv) == {}

    error = KeyError("a bug, not a record's problem")  # the same rule as Salesforce and Partner Center
    with pytest.raises(KeyError):
        side.create(creates_of([referral("boom-3")]), ctx())


# -- update -------------------------------------------------------------------------------------------------


def test_update_writes_only_the_given_fields_and_prepends_the_audit(dv, side, batches):
    created = side.create(creates_of([referral("upd-1"), referral("upd-2"), referral("upd-3")]), ctx("run_1"))
    one, two, three = (r.crm_id for r in created)
    # a CRM user changes the description after the plan was made: it must survive
    dv.edit("opportunities", one, {"description": "edited in the CRM"})
    untouched = dv.row("opportunities", three)["versionnumber"]
    account_before = dv.row("accounts", dv.row("opportunities", one)["_parentaccountid_value"])
    batches.clear()
    dv.log.clear()

    later = NOW + timedelta(hours=2)
    results = side.update(
        updates_of(
            (one, "upd-1", {"deal_value": 2500.5, "customer_city": "Elsewhere"}),
            (two, "upd-2", {"notes": None, "close_date": "2027-03-01", "sales_stage": "close"}),
        ),
        ctx("run_2", now=later),
    )

    assert [(r.key, r.action, r.ok, r.crm_id) for r in results] == [
        ("upd-1", "update", True, one),
        ("upd-2", "update", True, two),
    ]
    assert results[0].fields == {"deal_value": 2500.5}
    patches = [b for b in batches if b.method == "PATCH"]
    assert len(patches) == 2 and all(b.headers.get("If-Match") == "*" for b in patches)
    assert set(patches[0].body) == {"estimatedvalue", "cosell_syncstatus", "cosell_audit"}
    assert set(patches[1].body) == {"description", "estimatedclosedate", "salesstage", "cosell_syncstatus",
                                    "cosell_audit"}  # fmt: skip
    assert len(dv.requests_matching("POST", f"{API}/$batch")) == 1
    assert not [w for w in writes(dv) if not w.path.endswith("$batch")]

    row1, row2 = dv.row("opportunities", one), dv.row("opportunities", two)
    assert row1["estimatedvalue"] == 2500.5 and row1["description"] == "edited in the CRM"
    assert row2["description"] is None and row2["estimatedclosedate"] == "2027-03-01" and row2["salesstage"] == 3
    assert row1["cosell_syncstatus"] == SYNCED
    lines = row1["cosell_audit"].split("\n")
    assert lines[0] == '2026-11-02T11:30:00Z run_2 pc_to_crm {"deal_value":2500.5}'
    assert " run_1 " in lines[1] and len(lines) == 2
    assert dv.row("opportunities", three)["versionnumber"] == untouched
    account_after = dv.row("accounts", account_before["accountid"])
    assert account_after["versionnumber"] == account_before["versionnumber"]  # accounts are shared


def test_update_failures_are_per_record(dv, side):
    created = side.create(creates_of([referral("uf-1"), referral("uf-2")]), ctx())
    one, two = (r.crm_id for r in created)
    dv.delete("opportunities", two)
    missing = "00000000-0000-0000-0000-000000000001"
    results = side.update(
        updates_of(
            (one, "uf-1", {"notes": "fine"}),
            (two, "uf-2", {"notes": "deleted meanwhile"}),
            ("not-a-guid", "uf-3", {"notes": "x"}),
            (one, "uf-1", {"name": "n" * 400}),
            (missing, "uf-5", {"currency": "QQQ"}),
        ),
        ctx(),
    )
    assert [r.ok for r in results] == [True, False, False, False, False]
    assert results[1].error_code == "0x80040217"
    assert "not a Dataverse row id" in results[2].error
    assert results[3].error_code == "0x80044331" and "'name'" in results[3].error
    assert "QQQ" in results[4].error
    assert dv.row("opportunities", one)["description"] == "fine"


def test_stage_won_and_lost_go_through_win_and_lose_opportunity(dv, side, batches):
    created = side.create(creates_of([referral(f"stage-{n}") for n in range(3)]), ctx())
    won, lost, active = (r.crm_id for r in created)
    batches.clear()
    dv.log.clear()

    updates = updates_of(
        (won, "stage-0", {"stage": "won", "deal_value": 5000.0}),
        (lost, "stage-1", {"stage": "lost"}),
        (active, "stage-2", {"stage": "active", "notes": "accepted"}),
    )
    results = side.update(updates, ctx())
    assert [(r.action, r.ok) for r in results] == [("win", True), ("lose", True), ("update", True)]
    assert all("statecode" not in b.body and "statuscode" not in b.body for b in batches)
    assert len(dv.requests_matching("POST", f"{API}/WinOpportunity")) == 1
    assert len(dv.requests_matching("POST", f"{API}/LoseOpportunity")) == 1
    rows = {i: dv.row("opportunities", i) for i in (won, lost, active)}
    assert (rows[won]["statecode"], rows[won]["statuscode"], rows[won]["estimatedvalue"]) == (1, 3, 5000)
    assert (rows[lost]["statecode"], rows[lost]["statuscode"]) == (2, 4)
    assert (rows[active]["statecode"], rows[active]["statuscode"]) == (0, 1)
    assert rows[active]["description"] == "accepted"

    again = side.update(updates, ctx())  # already closed: not closed a second time
    assert all(r.ok for r in again)
    assert len(dv.requests_matching("POST", f"{API}/WinOpportunity")) == 1

    closed = side.create(creates_of([referral("born-won", status="Closed", substatus="Won")]), ctx())
    assert closed[0].ok
    row = dv.row("opportunities", closed[0].crm_id)
    assert (row["statecode"], row["statuscode"]) == (1, 3) and row["cosell_referralid"] == "born-won"


# -- mark, links, dry run ---------------------------------------------------------------------------------


def test_mark_error_then_synced(dv, side):
    created = side.create(creates_of([referral("mk-1"), referral("mk-2")]), ctx("run_1"))
    one, two = (r.crm_id for r in created)
    before_two = dv.row("opportunities", two)["versionnumber"]

    message = "Partner Center rejected the update: 'dealValue' must not be 0"
    side.mark([one, "garbage", "00000000-0000-0000-0000-000000000002"], "Error", ctx("run_2"), error=message)
    row = dv.row("opportunities", one)
    assert row["cosell_syncstatus"] == ERROR
    lines = row["cosell_audit"].split("\n")
    assert len(lines) == 2 and " run_2 error " in lines[0] and "must not be 0" in lines[0]
    assert " run_1 pc_to_crm " in lines[1]
    assert dv.row("opportunities", two)["versionnumber"] == before_two

    side.mark([one.upper()], "Synced", ctx("run_3"))
    row = dv.row("opportunities", one)
    assert row["cosell_syncstatus"] == SYNCED and row["cosell_audit"].count("\n") == 1
    with pytest.raises(ValueError, match="sync status"):
        side.mark([one], "Broken", ctx())


def test_write_links_stores_the_referral_on_existing_opportunities(dv, side):
    ids = dv.seed(opportunities=3, accounts=1, flagged=3)["opportunities"]
    taken = dv.create("opportunities", {"name": "Holder", "cosell_referralid": "taken-ref"})["opportunityid"]
    missing = "00000000-0000-0000-0000-000000000003"
    links = pd.DataFrame(
        {
            "crm_id": [ids[0], ids[1], ids[2], missing],
            "referral_id": ["new-ref-0", "new-'ref'-1", "taken-ref", "new-ref-3"],
        }
    )
    results = side.write_links(links, ctx())
    assert [(r.key, r.action, r.ok) for r in results] == [
        (ids[0], "update", True),
        (ids[1], "update", True),
        (ids[2], "update", False),
        (missing, "update", False),
    ]
    assert results[2].error_code == "0x80040237" and results[3].error_code == "0x80040217"
    for crm_id, rid in ((ids[0], "new-ref-0"), (ids[1], "new-'ref'-1")):
        row = dv.row("opportunities", crm_id)
        assert row["cosell_referralid"] == rid and row["cosell_referrallink"] == ctx().referral_link(rid)
        assert row["cosell_syncstatus"] == SYNCED and " crm_to_pc " in row["cosell_audit"]
    assert dv.row("opportunities", ids[2])["cosell_referralid"] is None
    assert dv.row("opportunities", taken)["cosell_referralid"] == "taken-ref"
    refs = {r["cosell_referralid"] for r in side.extract(referral_ids=["new-ref-0", "new-'ref'-1"])}
    assert refs == {"new-ref-0", "new-'ref'-1"}


def test_dry_run_writes_nothing_and_reports_what_it_would_write(dv, side):
    created = side.create(creates_of([referral("dry-1")]), ctx())
    crm_id = created[0].crm_id
    snapshot = {t: copy.deepcopy(dv.rows(t)) for t in ("opportunities", "accounts", "contacts")}
    dv.log.clear()
    dry = ctx(dry_run=True)

    made = side.create(creates_of([referral("dry-2"), referral("dry-3")]), dry)
    assert [(r.key, r.ok, r.action) for r in made] == [("dry-2", True, "create"), ("dry-3", True, "create")]
    assert made[0].fields["name"] == "Deal dry-2" and made[0].fields["customer_name"] == "Customer of dry-2"
    changed = side.update(updates_of((crm_id, "dry-1", {"stage": "won", "deal_value": 9.0})), dry)
    assert [(r.ok, r.action, r.fields) for r in changed] == [(True, "win", {"stage": "won", "deal_value": 9.0})]
    linked = side.write_links(pd.DataFrame({"crm_id": [crm_id], "referral_id": ["dry-x"]}), dry)
    assert linked[0].ok and linked[0].fields["cosell_referralid"] == "dry-x"
    side.mark([crm_id], "Error", dry, error="nope")

    assert writes(dv) == []
    assert {t: dv.rows(t) for t in snapshot} == snapshot
