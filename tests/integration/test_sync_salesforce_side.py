"""SalesforceSide (extract, create, update, mark, write_links) against the Salesforce emulator,
through SalesforceSyncHook and simple-salesforce over HTTPS."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.normalize import crm_frame, referrals_frame
from cosell_sync.errors import AuthenticationError, ServerError
from cosell_sync.sides.base import AUDIT_MAX_CHARS, RunContext
from cosell_sync.sides.salesforce import SalesforceSide

MAPPING = load_mapping("salesforce")
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CTX = RunContext(dag_id="cosell_sync_salesforce", run_id="manual__t1", now=NOW)
LATER = RunContext(dag_id="cosell_sync_salesforce", run_id="manual__t2", now=NOW + timedelta(hours=1))
DRY = RunContext(dag_id="cosell_sync_salesforce", run_id="manual__dry", dry_run=True, now=NOW)


@pytest.fixture
def sf(pc):
    return pc.salesforce


@pytest.fixture
def side(sf_hook):
    return SalesforceSide(sf_hook, MAPPING)


def referral(rid: str, *, company="Contoso Ltd", postal="98052", email="ada@contoso.example", **details) -> dict:
    team = [{"firstName": "Ada", "lastName": "Lovelace", "email": email, "phoneNumber": "+1 425 555 0100"}]
    return {
        "id": rid,
        "name": f"Deal {rid}",
        "status": "New",
        "substatus": "Pending",
        "direction": "Incoming",
        "updatedDateTime": "2026-10-31T10:00:00Z",
        "customerProfile": {
            "name": company,
            "address": {"country": "US", "postalCode": postal, "city": "Redmond", "addressLine1": "1 Way"},
            "team": team if email else [],
        },
        "details": {
            "dealValue": 1000,
            "currency": "USD",
            "closingDateTime": "2027-01-31T00:00:00Z",
            "notes": "hello",
            "requirements": {"solutions": [{"id": "SOL-2"}, {"id": "SOL-1"}]},
            **details,
        },
        "inviteContext": {"assistanceRequestCode": "QuotesOrLicensing"},
    }


def frame(docs: list[dict]) -> pd.DataFrame:
    normalized = referrals_frame(docs, MAPPING)
    assert normalized.errors.empty, normalized.errors.to_dict("records")
    return normalized.frame


def updates(*rows: tuple[str, str | None, dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"crm_id": c, "referral_id": r, "fields": f} for c, r, f in rows], columns=["crm_id", "referral_id", "fields"]
    )


def count(sf, obj: str) -> int:
    return len(sf.list_records(obj))


def by_ref(sf) -> dict[str, dict]:
    return {o["PC_Referral_Id__c"]: o for o in sf.list_records("Opportunity")}


def primary_roles(sf) -> dict[str, str]:
    roles = [r for r in sf.list_records("OpportunityContactRole") if r["IsPrimary"]]
    out: dict[str, str] = {}
    for role in roles:
        assert role["OpportunityId"] not in out, "two primary contact roles on one opportunity"
        out[role["OpportunityId"]] = role["ContactId"]
    return out


def stamp(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z")


def writes(sf) -> list:
    return [r for r in sf.requests_matching(path_prefix="/services/data") if r.method in ("POST", "PATCH", "DELETE")]


# -- extract -------------------------------------------------------------------------------------
def test_initial_load_reads_every_opportunity_with_account_and_primary_contact(sf, side):
    ids = sf.seed(opportunities=25, flagged=6, seed=3)
    lone = sf.user_create("Opportunity", {"Name": "No account", "StageName": "Closed Won", "CloseDate": "2026-12-01"})

    records = side.extract()

    assert sorted(r["Id"] for r in records) == sorted([*ids["opportunities"], lone["Id"]])
    assert "attributes" not in json.dumps(records)
    roles = primary_roles(sf)
    contacts = {c["Id"]: c for c in sf.list_records("Contact")}
    accounts = {a["Id"]: a for a in sf.list_records("Account")}
    for record in records:
        if record["Id"] == lone["Id"]:
            assert record["Account"] is None and record["Contact"] is None and record["IsClosed"] is True
            continue
        contact = contacts[roles[record["Id"]]]
        assert record["Contact"] == {
            "Id": contact["Id"],
            "FirstName": contact["FirstName"],
            "LastName": contact["LastName"],
            "Email": contact["Email"],
            "Phone": contact["Phone"],
        }
        account = accounts[record["AccountId"]]
        assert record["Account"]["Name"] == account["Name"]
        assert record["Account"]["BillingPostalCode"] == account["BillingPostalCode"]
        for field in ("PC_Audit__c", "PC_Sync_Status__c", "PC_Referral_Id__c", "SystemModstamp", "Amount"):
            assert field in record

    normalized = crm_frame(records, MAPPING, "Id")
    assert normalized.errors.empty, normalized.errors.to_dict("records")
    assert len(normalized.frame) == 26
    assert sorted(normalized.frame.loc[normalized.frame["sync_flag"], "crm_id"]) == sorted(ids["flagged"])
    emails = dict(zip(normalized.frame["crm_id"], normalized.frame["contact_email"], strict=True))
    some = ids["opportunities"][0]
    assert emails[some] == contacts[roles[some]]["Email"].lower()
    assert normalized.frame.set_index("crm_id").loc[lone["Id"], "closed"]


def test_extract_by_systemmodstamp_window(sf, side):
    ids = sf.seed(opportunities=8, seed=5)["opportunities"]
    since = max(stamp(r["SystemModstamp"]) for r in side.extract())
    sf.user_edit("Opportunity", ids[5], {"Description": "edited first"})
    sf.touch("Opportunity", ids[2])  # an automated update moves SystemModstamp too
    until = stamp(sf.get_record("Opportunity", ids[2])["SystemModstamp"])
    sf.user_edit("Opportunity", ids[0], {"Amount": 1})

    assert [r["Id"] for r in side.extract(since=since)] == [ids[5], ids[2], ids[0]]
    window = side.extract(since=since, until=until)
    assert [r["Id"] for r in window] == [ids[5], ids[2]]
    assert window[0]["Description"] == "edited first"
    assert side.extract(since=stamp(sf.get_record("Opportunity", ids[0])["SystemModstamp"])) == []


def test_extract_by_ids_escapes_quotes_chunks_and_unions(sf, sf_hook, side):
    tricky = "ref-'quoted' \\ OR Name != '"
    records = [
        {"Name": f"Deal {i}", "StageName": "Prospecting", "CloseDate": "2027-01-01", "PC_Referral_Id__c": f"ref-{i}"}
        for i in range(230)
    ]
    records.append(
        {"Name": "Tricky", "StageName": "Prospecting", "CloseDate": "2027-01-01", "PC_Referral_Id__c": tricky}
    )
    ids = [r.id for r in sf_hook.create_records("Opportunity", records)]

    assert [r["Id"] for r in side.extract(referral_ids=[tricky])] == [ids[230]]
    assert [r["PC_Referral_Id__c"] for r in side.extract(referral_ids=[tricky])] == [tricky]

    sf.log.clear()
    got = side.extract(crm_ids=ids[:230])
    assert sorted(r["Id"] for r in got) == sorted(ids[:230])
    queries = sf.requests_matching("GET", "/services/data")
    assert len(queries) == 2  # 200 + 30 ids per IN list

    both = side.extract(crm_ids=[ids[1], ids[2]], referral_ids=["ref-2", "ref-3", "ref-unknown"])
    assert sorted(r["Id"] for r in both) == sorted(ids[1:4])  # a union, without duplicates
    assert [r["Id"] for r in side.extract(crm_ids=["not an id", ids[7][:15]])] == [ids[7]]
    assert side.extract(crm_ids=[]) == [] and side.extract(referral_ids=[]) == []


# -- create --------------------------------------------------------------------------------------
def test_create_30_opportunities_matches_accounts_and_contacts(sf, side):
    northwind = sf.user_create(
        "Account", {"Name": "Northwind Traders", "BillingPostalCode": "EC2A 4NE", "BillingCountry": "GB"}
    )
    buyer = sf.user_create(
        "Contact", {"LastName": "Buyer", "Email": "Shared.Buyer@Northwind.example", "AccountId": northwind["Id"]}
    )
    docs = [
        referral(f"r-{i:02d}", company=f"Company {i}", postal=f"{10000 + i}", email=f"b{i}@c{i}.example")
        for i in range(20)
    ]
    shared = [
        ("Fabrikam Inc", "10017", "ana@fabrikam.example"),
        ("Tailspin Toys", "2000", None),
        ("Northwind Traders", "EC2A 4NE", "shared.buyer@northwind.example"),
    ]
    variants = [lambda s: s, lambda s: s.upper().replace(" ", "  "), lambda s: s.lower().replace(" ", "")]
    for i in range(10):
        company, postal, email = shared[i % 3]
        vary = variants[(i // 3) % 3]
        docs.append(referral(f"s-{i:02d}", company=vary(company), postal=vary(postal), email=email))

    results = side.create(frame(docs), CTX)

    assert [r.key for r in results] == [d["id"] for d in docs]
    assert all(r.ok and r.action == "create" for r in results), [r.error for r in results if not r.ok]
    assert count(sf, "Opportunity") == 30
    assert count(sf, "Account") == 23  # 20 + Fabrikam + Tailspin created, Northwind matched
    assert count(sf, "Contact") == 22  # 20 + ana@fabrikam; the Northwind buyer matched by email
    opps = by_ref(sf)
    accounts = {a["Id"]: a for a in sf.list_records("Account")}
    roles = primary_roles(sf)
    for i, result in enumerate(results):
        rid = docs[i]["id"]
        opp = opps[rid]
        assert result.crm_id == opp["Id"] and result.referral_id == rid
        assert opp["PC_Referral_Link__c"] == CTX.referral_link(rid)
        assert opp["PC_Sync_Status__c"] == "Synced"
        assert opp["PC_Audit__c"].startswith("2026-11-01T12:00:00Z manual__t1 pc_to_crm {")
        assert opp["StageName"] == "Prospecting" and opp["CloseDate"] == "2027-01-31" and opp["Amount"] == 1000
        assert opp["PC_Solutions__c"] == "SOL-1;SOL-2" and opp["PC_How_Can_Microsoft_Help__c"] == "QuotesOrLicensing"
        assert (
            result.fields["stage"] == "new" and result.fields["customer_name"] == frame([docs[i]])["customer_name"][0]
        )
        if i < 20:
            assert accounts[opp["AccountId"]]["Name"] == f"Company {i}"
            assert accounts[opp["AccountId"]]["BillingCity"] == "Redmond"
    shared_accounts = {docs[20 + i]["customerProfile"]["name"]: opps[f"s-{i:02d}"]["AccountId"] for i in range(10)}
    assert len(set(shared_accounts.values())) == 3
    assert all(opps[f"s-{i:02d}"]["AccountId"] == northwind["Id"] for i in range(2, 10, 3))
    # contacts: matched by email (case-insensitive), linked as the primary contact role
    assert len(roles) == 20 + 4 + 3  # Tailspin referrals have no contact
    assert all(roles[opps[f"s-{i:02d}"]["Id"]] == buyer["Id"] for i in range(2, 10, 3))
    fabrikam_contacts = {roles[opps[f"s-{i:02d}"]["Id"]] for i in range(0, 10, 3)}
    assert len(fabrikam_contacts) == 1
    assert sf.get_record("Contact", fabrikam_contacts.pop())["Email"] == "ana@fabrikam.example"
    assert all(opps[f"s-{i:02d}"]["Id"] not in roles for i in range(1, 10, 3))
    # the records read back as the deals that were written
    normalized = crm_frame(side.extract(), MAPPING, "Id")
    assert normalized.errors.empty
    assert sorted(normalized.frame["referral_ref"]) == sorted(d["id"] for d in docs)


def test_rerun_adopts_instead_of_duplicating_or_overwriting(sf, side):
    rows = frame([referral(f"r-{i}", company=f"Co {i % 2}", email=f"p{i % 2}@co.example") for i in range(5)])
    rows.loc[0, "close_date"] = None  # Salesforce needs one: the first try fills it in
    first = side.create(rows, CTX)
    roles = primary_roles(sf)
    # a crash between the upsert and the contact role: the rerun must add the missing role
    lost = next(r for r in sf.list_records("OpportunityContactRole") if r["OpportunityId"] == first[3].crm_id)
    sf.user_delete("OpportunityContactRole", lost["Id"])
    # a seller works on the new opportunities before the task is retried
    sf.user_edit("Opportunity", first[0].crm_id, {"CloseDate": "2027-06-01", "StageName": "Negotiation/Review"})
    sf.user_edit("Opportunity", first[1].crm_id, {"Amount": 777.0})

    again = side.create(rows, LATER)

    assert all(r.ok for r in first + again)
    assert [r.crm_id for r in again] == [r.crm_id for r in first]
    assert (count(sf, "Opportunity"), count(sf, "Account"), count(sf, "Contact")) == (5, 2, 2)
    assert primary_roles(sf) == roles
    assert count(sf, "OpportunityContactRole") == 5
    mine = by_ref(sf)
    assert (mine["r-0"]["CloseDate"], mine["r-0"]["StageName"]) == ("2027-06-01", "Negotiation/Review")  # kept
    assert mine["r-1"]["Amount"] == 777.0  # kept
    # Held as written: that is the base. Held otherwise (the seller's edit): no base, so the next
    # run reads both sides as changed and settles it by authority, as an audited conflict.
    assert again[2].fields["deal_value"] == first[2].fields["deal_value"] is not None
    assert again[1].fields["deal_value"] is None
    assert again[0].fields["close_date"] == "2027-06-01"  # a value we filled in: what it holds now
    audit = mine["r-0"]["PC_Audit__c"].split("\n")  # not written again
    assert [line.split(" ")[1] for line in audit] == ["manual__t1"]


def test_bad_values_fail_only_their_own_rows(sf, side):
    # Normalize rejects these values first (issue 12); the side must still fail only their rows.
    rows = frame([referral(f"r-{i}", company=f"Co {i}") for i in range(6)])
    rows.loc[1, "currency"] = "ZZZ"  # a well-formed code the org does not have
    rows.loc[3, "notes"] = "x" * 1_000_000  # Description holds 32,000
    rows.loc[4, "customer_name"] = "A" * 300  # Account Name holds 255
    rows.loc[5, "name"] = "N" * 121  # Opportunity Name holds 120

    results = side.create(rows, CTX)

    assert [r.ok for r in results] == [True, False, True, False, False, False]
    assert results[1].error_code == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST" and "CurrencyIsoCode" in results[1].error
    assert results[3].error_code == "STRING_TOO_LONG" and "Description" in results[3].error
    assert len(results[3].error) <= 2000
    assert results[4].error_code == "STRING_TOO_LONG" and results[4].error.startswith("account ")
    assert results[5].error_code == "STRING_TOO_LONG" and "Name" in results[5].error
    assert all(r.crm_id is None and r.fields == {} for r in results if not r.ok)
    assert sorted(by_ref(sf)) == ["r-0", "r-2"]


def test_missing_stage_and_close_date_get_the_documented_defaults(sf, side):
    rows = frame([referral("r-1")]).assign(stage=None, close_date=None)

    [result] = side.create(rows, CTX)

    opp = by_ref(sf)["r-1"]
    assert result.ok and opp["StageName"] == "Prospecting" and opp["CloseDate"] == "2027-01-30"  # now + 90 days
    assert result.fields["stage"] == "new" and result.fields["close_date"] == "2027-01-30"


def test_a_call_that_raises_fails_only_its_records(sf, sf_hook, side, monkeypatch):
    rows = pd.DataFrame({"referral_id": [f"r-{i:03d}" for i in range(250)], "name": [f"Deal {i}" for i in range(250)]})
    real = sf_hook.upsert_records
    calls = []

    def flaky(sobject, field, records, **kw):
        calls.append(len(records))
        if len(calls) == 2:
            raise ServerError("Salesforce", "upsert: unavailable", status=503, code="SERVER_UNAVAILABLE")
        return real(sobject, field, records, **kw)

    monkeypatch.setattr(sf_hook, "upsert_records", flaky)
    results = side.create(rows, CTX)

    assert calls == [200, 50]
    assert all(r.ok for r in results[:200])
    assert not any(r.ok for r in results[200:])
    assert {r.error_code for r in results[200:]} == {"SERVER_UNAVAILABLE"}
    assert "HTTP 503" in results[200].error and count(sf, "Opportunity") == 200

    def unauthorized(*args, **kw):
        raise AuthenticationError("Salesforce", "Session expired or invalid", status=401, code="INVALID_SESSION_ID")

    monkeypatch.setattr(sf_hook, "upsert_records", unauthorized)
    with pytest.raises(AuthenticationError):  # not about the records: the task fails and retries
        side.create(rows.iloc[200:203], CTX)


# -- update --------------------------------------------------------------------------------------
@pytest.fixture
def two(sf, side):
    results = side.create(frame([referral("r-a", company="Alpha"), referral("r-b", company="Beta")]), CTX)
    assert all(r.ok for r in results)
    return results[0].crm_id, results[1].crm_id


def test_update_writes_only_the_changed_fields_and_prepends_the_audit(sf, sf_hook, side, two, monkeypatch):
    a, b = two
    sf.user_edit("Opportunity", a, {"Description": "a seller's note"})
    untouched = sf.get_record("Opportunity", b)["SystemModstamp"]
    before = sf.get_record("Opportunity", a)
    sent = []
    real = sf_hook.update_records
    monkeypatch.setattr(sf_hook, "update_records", lambda obj, recs, **kw: sent.extend(recs) or real(obj, recs, **kw))

    [result] = side.update(updates((a, "r-a", {"deal_value": 5000.0, "customer_city": "Elsewhere"})), LATER)

    assert result.ok and result.key == "r-a" and result.action == "update" and result.crm_id == a
    assert result.fields == {"deal_value": 5000.0}  # account fields are shared: never updated from a deal
    assert [sorted(r) for r in sent] == [["Amount", "Id", "PC_Audit__c", "PC_Sync_Status__c"]]
    opp = sf.get_record("Opportunity", a)
    assert opp["Amount"] == 5000 and opp["Description"] == "a seller's note"
    assert sf.get_record("Account", opp["AccountId"])["BillingCity"] == "Redmond"
    lines = opp["PC_Audit__c"].split("\n")
    assert lines[0] == '2026-11-01T13:00:00Z manual__t2 pc_to_crm {"deal_value":5000.0}'
    assert lines[1:] == before["PC_Audit__c"].split("\n")
    assert sf.get_record("Opportunity", b)["SystemModstamp"] == untouched

    history = "\n".join(f"2026-01-{d:02d}T00:00:00Z old pc_to_crm {{}} {'x' * 80}" for d in range(1, 29)) * 2
    sf.user_edit("Opportunity", a, {"PC_Audit__c": history})
    [again] = side.update(updates((a, "r-a", {"notes": "n" * 5000})), LATER)
    audit = sf.get_record("Opportunity", a)["PC_Audit__c"]
    assert again.ok and len(audit) <= AUDIT_MAX_CHARS
    newest, *older = audit.split("\n")
    assert newest.startswith('2026-11-01T13:00:00Z manual__t2 pc_to_crm {"notes":"nnn') and "(5000 chars)" in newest
    assert older and history.startswith("\n".join(older) + "\n")  # whole lines kept, oldest dropped
    assert sf.get_record("Opportunity", a)["Description"] == "n" * 5000


def test_stage_won_becomes_closed_won(sf, side, two):
    a, _ = two
    [result] = side.update(updates((a, "r-a", {"stage": "won"})), LATER)

    opp = sf.get_record("Opportunity", a)
    assert result.ok and opp["StageName"] == "Closed Won" and opp["IsClosed"] and opp["IsWon"]
    row = crm_frame(side.extract(crm_ids=[a]), MAPPING, "Id").frame.iloc[0]
    assert row["stage"] == "won" and row["closed"]


def test_update_rows_fail_alone(sf, side, two):
    a, b = two
    sf.user_delete("Opportunity", b)
    results = side.update(
        updates(
            ("not-an-id", "r-x", {"deal_value": 1.0}),
            (None, "r-y", {"deal_value": 1.0}),
            (b, "r-b", {"deal_value": 2.0}),
            (a, "r-a", {"stage": "no-such-stage"}),
            (a, "r-a", {"close_date": "2027-06-30", "help_code": "GeneralOrOther"}),
        ),
        LATER,
    )
    assert [r.ok for r in results] == [False, False, False, False, True]
    assert results[0].error_code == "MALFORMED_ID"
    assert results[1].error_code == "MISSING_ARGUMENT"
    assert results[2].error_code in ("ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY")
    assert results[3].error_code == "INVALID_VALUE" and "StageName" in results[3].error
    opp = sf.get_record("Opportunity", a)
    assert opp["CloseDate"] == "2027-06-30" and opp["PC_How_Can_Microsoft_Help__c"] == "GeneralOrOther"
    assert opp["StageName"] == "Prospecting"


# -- mark, links, dry run --------------------------------------------------------------------------
def test_mark_error_then_synced(sf, side, two):
    a, b = two
    created_audit = sf.get_record("Opportunity", a)["PC_Audit__c"]

    side.mark([a, "bogus"], "Error", LATER, error="Partner Center refused: 'status' Closed -> New")

    opp = sf.get_record("Opportunity", a)
    assert opp["PC_Sync_Status__c"] == "Error"
    newest, rest = opp["PC_Audit__c"].split("\n", 1)
    assert newest.startswith("2026-11-01T13:00:00Z manual__t2 error ") and "Partner Center refused" in newest
    assert rest == created_audit
    assert sf.get_record("Opportunity", b)["PC_Sync_Status__c"] == "Synced"

    side.mark([a], "Synced", LATER)
    opp = sf.get_record("Opportunity", a)
    assert opp["PC_Sync_Status__c"] == "Synced" and opp["PC_Audit__c"].split("\n", 1)[1] == created_audit


def test_write_links(sf, side):
    opps = [
        sf.user_create(
            "Opportunity", {"Name": f"Seller deal {i}", "StageName": "Qualification", "CloseDate": "2027-02-01"}
        )
        for i in range(3)
    ]
    links = pd.DataFrame(
        {"crm_id": [opps[0]["Id"], opps[1]["Id"], opps[2]["Id"]], "referral_id": ["ref-1", "ref-2", "REF-1"]}
    )

    results = side.write_links(links, CTX)

    assert [r.key for r in results] == [o["Id"] for o in opps] and {r.action for r in results} == {"update"}
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].error_code == "DUPLICATE_VALUE"  # the link field is unique (case-insensitive)
    first = sf.get_record("Opportunity", opps[0]["Id"])
    assert first["PC_Referral_Id__c"] == "ref-1" and first["PC_Referral_Link__c"] == CTX.referral_link("ref-1")
    assert first["PC_Sync_Status__c"] == "Synced" and '{"referral_id":"ref-1"}' in first["PC_Audit__c"]
    assert sf.get_record("Opportunity", opps[2]["Id"])["PC_Referral_Id__c"] is None
    assert [r["Id"] for r in side.extract(referral_ids=["ref-2"])] == [opps[1]["Id"]]


def test_dry_run_writes_nothing(sf, side, two):
    a, b = two
    before = copy.deepcopy(sf.list_records("Opportunity"))
    sf.log.clear()

    created = side.create(frame([referral("r-new", company="Gamma")]), DRY)
    updated = side.update(updates((a, "r-a", {"deal_value": 7.0})), DRY)
    side.mark([a], "Error", DRY, error="boom")
    linked = side.write_links(pd.DataFrame({"crm_id": [b], "referral_id": ["ref-z"]}), DRY)

    assert writes(sf) == []
    assert sf.list_records("Opportunity") == before
    assert created[0].ok and created[0].crm_id is None and created[0].fields["deal_value"] == 1000
    assert updated[0].ok and updated[0].fields == {"deal_value": 7.0}
    assert linked[0].ok and linked[0].key == b


@pytest.fixture
def overlapping(sf, monkeypatch):
    """Salesforce queries stay in flight 0.2 s longer; ``peak``: the most at once."""
    import threading
    import time

    real, lock, now, peak = sf.dispatch, threading.Lock(), [0], [0]

    def dispatch(request):
        if "/query" not in request.path:
            return real(request)
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.2)
            return real(request)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(sf, "dispatch", dispatch)
    return peak


def test_chunked_reads_go_out_a_few_at_once_and_find_every_record(sf, side, overlapping, monkeypatch):
    from cosell_sync.sides.crm import Selection
    from cosell_sync.sides.salesforce import query

    ids = sf.seed(opportunities=12, seed=5)["opportunities"]
    monkeypatch.setattr(query, "_chunks", lambda values: (list(values[i : i + 3]) for i in range(0, len(values), 3)))
    found = side.read_opportunities(Selection(crm_ids=ids))
    assert sorted(r["Id"] for r in found) == sorted(ids)
    assert overlapping[0] > 1  # four chunks, read concurrently


def test_a_failed_chunk_of_an_audit_read_fails_its_values_only(sf, side, monkeypatch):
    from cosell_sync.sides.salesforce import query

    ids = sf.seed(opportunities=9, seed=6)["opportunities"]
    monkeypatch.setattr(query, "_chunks", lambda values: (list(values[i : i + 3]) for i in range(0, len(values), 3)))
    real = side.hook.query_records

    def query_records(soql, **kwargs):
        if ids[4] in soql:
            raise ServerError("Salesforce", "the query timed out", status=500)
        return real(soql, **kwargs)

    monkeypatch.setattr(side.hook, "query_records", query_records)
    audit, failed = side._read_audit(ids)
    assert sorted(failed) == sorted(i[:15] for i in ids[3:6])
    assert sorted(audit) == sorted(i[:15] for i in ids[:3] + ids[6:])
    assert "timed out" in failed[ids[4][:15]][0]
