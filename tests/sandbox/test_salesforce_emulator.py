"""The Salesforce emulator exercised through the real clients: simple-salesforce, the Airflow
provider's SalesforceHook, and raw ``requests`` where the wire itself is the point."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceMoreThanOneRecord,
    SalesforceOperationError,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)
from simple_salesforce.format import format_external_id, format_soql

from cosell_sandbox.salesforce import SalesforceEmulator
from cosell_sandbox.salesforce.soql import normalize_id
from cosell_sandbox.server import EmulatorServer
from cosell_sandbox.tls import SandboxPKI

OPP = {"Name": "Contoso - Azure migration", "StageName": "Prospecting", "CloseDate": "2026-06-30", "Amount": 125000}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.ensure(tmp_path_factory.mktemp("salesforce-pki"))


@pytest.fixture(scope="module")
def server(pki: SandboxPKI) -> Iterator[EmulatorServer]:
    srv = EmulatorServer(SalesforceEmulator(), pki.server_context()).start()
    yield srv
    srv.stop()


@pytest.fixture
def emu(server: EmulatorServer, pki: SandboxPKI, monkeypatch: pytest.MonkeyPatch) -> Iterator[SalesforceEmulator]:
    # requests lets REQUESTS_CA_BUNDLE override Session.verify: make the sandbox CA the trusted bundle.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    app = server.app
    assert isinstance(app, SalesforceEmulator)
    app.reset()
    yield app
    app.reset()


@pytest.fixture
def session(pki: SandboxPKI) -> requests.Session:
    s = requests.Session()
    s.verify = str(pki.ca_cert)
    return s


@pytest.fixture
def sf(emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session) -> Salesforce:
    return Salesforce(instance_url=server.origin, session_id=emu.access_token, session=session)


@pytest.fixture
def api(emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session):
    """Raw HTTP against /services/data/v59.0/ with the default token."""

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {emu.access_token}", **kw.pop("headers", {})}
        url = path if path.startswith("/") else f"/services/data/v59.0/{path}"
        return session.request(method, server.origin + url, headers=headers, timeout=30, **kw)

    return call


def error_of(exc: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    content = exc.value.content
    assert isinstance(content, list) and len(content) == 1, content
    return content[0]


# ---------------------------------------------------------------------------
# auth, limits, headers


def test_session_token_is_required(emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session) -> None:
    bad = Salesforce(instance_url=server.origin, session_id="00D000000000000!AQ0AQnope", session=session)
    with pytest.raises(SalesforceExpiredSession) as exc:
        bad.query("SELECT Id FROM Opportunity")
    assert exc.value.status == 401
    assert exc.value.content == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    resp = session.get(server.origin + "/services/data/v59.0/sobjects/", timeout=10)
    assert resp.status_code == 401
    assert resp.json()[0]["errorCode"] == "INVALID_SESSION_ID"
    assert "Sforce-Limit-Info" not in resp.headers
    assert emu.api_used == 0  # unauthenticated calls are not counted


def test_issued_tokens_work_until_revoked(
    emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session
) -> None:
    token = emu.issue_token()
    assert token.startswith("00D5g000004SbXc!AQ0AQ") and len(token) > 80
    client = Salesforce(instance_url=server.origin, session_id=token, session=session)
    assert client.query("SELECT COUNT() FROM Account")["totalSize"] == 0
    resp = session.post(server.origin + "/_sandbox/tokens/revoke", json={"token": token}, timeout=10)
    assert resp.json() == {"revoked": 1}
    with pytest.raises(SalesforceExpiredSession):
        client.query("SELECT COUNT() FROM Account")
    # the default token is unaffected
    assert Salesforce(instance_url=server.origin, session_id=emu.access_token, session=session).query(
        "SELECT COUNT() FROM Account"
    )["done"]


def test_limit_info_header_is_parsed_into_api_usage(sf: Salesforce, emu: SalesforceEmulator) -> None:
    sf.query("SELECT Id FROM Opportunity")
    usage = sf.api_usage["api-usage"]
    assert (usage.used, usage.total) == (1, 15000)
    opportunity = sf.Opportunity  # each SFType parses the header into its own api_usage
    opportunity.describe()
    assert opportunity.api_usage["api-usage"] == (2, 15000)
    emu.set_limits(daily_api_requests=5000, used=17)
    sf.limits()
    assert sf.api_usage["api-usage"] == (18, 5000)
    limits = sf.limits()
    assert limits["DailyApiRequests"] == {"Max": 5000, "Remaining": 5000 - 19}


def test_request_limit_exceeded_after_small_limit(
    sf: Salesforce, server: EmulatorServer, session: requests.Session
) -> None:
    resp = session.post(server.origin + "/_sandbox/limits", json={"daily_api_requests": 3, "used": 0}, timeout=10)
    assert resp.json() == {"used": 0, "limit": 3}
    for _ in range(3):
        sf.query("SELECT Id FROM Account")
    with pytest.raises(SalesforceRefusedRequest) as exc:
        sf.query("SELECT Id FROM Account")
    assert exc.value.status == 403
    assert exc.value.content == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    state = session.get(server.origin + "/_sandbox/state", timeout=10).json()
    assert state["apiUsage"] == {"used": 3, "limit": 3}


def test_versions_paths_and_wire_details(api, server: EmulatorServer, session: requests.Session) -> None:
    versions = session.get(server.origin + "/services/data/", timeout=10).json()
    assert {"label": "Winter '24", "url": "/services/data/v59.0", "version": "59.0"} in versions
    assert [v["version"] for v in versions] == [f"{n}.0" for n in range(52, 63)]
    assert api("GET", "/services/data/v62.0/sobjects/Opportunity/describe/").status_code == 200
    assert api("GET", "/services/data/v62.0/sobjects/Opportunity/describe").status_code == 200
    old = api("GET", "/services/data/v40.0/sobjects/")
    assert old.status_code == 404 and old.json()[0]["errorCode"] == "NOT_FOUND"
    unknown = api("GET", "sobjects/Lead/describe")
    assert unknown.status_code == 404
    assert unknown.json() == [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]
    wrong_method = api("PUT", "sobjects/Opportunity/")
    assert wrong_method.status_code == 405
    assert wrong_method.json()[0]["errorCode"] == "METHOD_NOT_ALLOWED"
    assert "Sforce-Limit-Info" in wrong_method.headers
    bad_json = api("POST", "sobjects/Opportunity/", data="{nope", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()[0]["errorCode"] == "JSON_PARSER_ERROR"


def test_injected_faults_have_salesforce_shaped_bodies(api, server: EmulatorServer, session: requests.Session) -> None:
    session.post(server.origin + "/_sandbox/faults", json={"rate_429": 1.0, "retry_after": 2}, timeout=10)
    resp = api("GET", "sobjects/")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "2"
    assert resp.json()[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
    session.post(server.origin + "/_sandbox/faults", json={"rate_5xx": 1.0, "status_5xx": 503}, timeout=10)
    resp = api("GET", "sobjects/")
    assert resp.status_code == 503 and resp.json()[0]["errorCode"] == "SERVER_UNAVAILABLE"
    session.delete(server.origin + "/_sandbox/faults", timeout=10)
    assert api("GET", "sobjects/").status_code == 200


# ---------------------------------------------------------------------------
# query


def test_query_paging_default_batch_and_query_all(sf: Salesforce, emu: SalesforceEmulator) -> None:
    emu.seed(opportunities=2500, accounts=40, seed=3)
    first = sf.query("SELECT Id, Name FROM Opportunity")
    assert first["totalSize"] == 2500 and first["done"] is False and len(first["records"]) == 2000
    next_url = first["nextRecordsUrl"]
    assert next_url.startswith("/services/data/v59.0/query/01g") and next_url.endswith("-2000")
    assert "://" not in next_url
    assert first["records"][0]["attributes"]["url"].startswith("/services/data/v59.0/sobjects/Opportunity/006")
    second = sf.query_more(next_url, identifier_is_url=True)
    assert second["done"] is True and len(second["records"]) == 500 and "nextRecordsUrl" not in second
    everything = sf.query_all("SELECT Id FROM Opportunity")
    ids = [r["Id"] for r in everything["records"]]
    assert len(ids) == len(set(ids)) == 2500
    assert set(ids) == {r["Id"] for r in emu.list_records("Opportunity")}


def test_query_batch_size_header(sf: Salesforce, emu: SalesforceEmulator) -> None:
    emu.seed(opportunities=2100, accounts=10, seed=4)
    emu.log.clear()
    result = sf.query_all("SELECT Id FROM Opportunity", headers={"Sforce-Query-Options": "batchSize=500"})
    assert len({r["Id"] for r in result["records"]}) == 2100
    pages = emu.requests_matching("GET", "/services/data/v59.0/query")
    assert len(pages) == 5  # 500 * 4 + 100
    small = sf.query("SELECT Id FROM Opportunity", headers={"Sforce-Query-Options": "batchSize=50"})
    assert len(small["records"]) == 200  # below the minimum: Salesforce uses 200


def test_query_locators_snapshot_and_expire(sf: Salesforce, emu: SalesforceEmulator) -> None:
    emu.seed(opportunities=2300, accounts=10, seed=5)
    first = sf.query("SELECT Id, Name FROM Opportunity ORDER BY Name")
    remaining = {r["Id"] for r in emu.list_records("Opportunity")} - {r["Id"] for r in first["records"]}
    victim = sorted(remaining)[0]
    emu.user_delete("Opportunity", victim)
    emu.user_edit("Opportunity", sorted(remaining)[1], {"Name": "Renamed after the query started"})
    second = sf.query_more(first["nextRecordsUrl"], identifier_is_url=True)
    assert {r["Id"] for r in second["records"]} == remaining  # the snapshot taken at query time
    assert "Renamed after the query started" not in {r["Name"] for r in second["records"]}
    emu.configure(query_locator_ttl=0.2)
    again = sf.query("SELECT Id FROM Opportunity")
    time.sleep(0.4)
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query_more(again["nextRecordsUrl"], identifier_is_url=True)
    assert error_of(exc) == {"message": "invalid query locator", "errorCode": "INVALID_QUERY_LOCATOR"}


def test_incremental_query_by_system_modstamp(sf: Salesforce, emu: SalesforceEmulator) -> None:
    ids = [sf.Opportunity.create({**OPP, "Name": f"Deal {i}"})["id"] for i in range(5)]
    rows = sf.query_all("SELECT Id, SystemModstamp FROM Opportunity ORDER BY SystemModstamp, Id")["records"]
    stamps = [r["SystemModstamp"] for r in rows]
    assert [r["Id"] for r in rows] == ids
    assert stamps == sorted(stamps) and len(set(stamps)) == 5  # ms precision, strictly increasing
    assert all(len(s) == 28 and s.endswith("+0000") for s in stamps)  # 2026-01-02T03:04:05.000+0000
    watermark = stamps[-1][:23] + "Z"  # 2026-01-02T03:04:05.123Z
    emu.user_edit("Opportunity", ids[0], {"StageName": "Qualification"})
    emu.touch("Opportunity", ids[1])  # automation: SystemModstamp only
    query = (
        "SELECT Id, LastModifiedDate, SystemModstamp FROM Opportunity WHERE SystemModstamp > {} "
        "ORDER BY SystemModstamp, Id"
    )
    changed = sf.query_all(query.format(watermark))["records"]
    assert [r["Id"] for r in changed] == [ids[0], ids[1]]
    touched = emu.get_record("Opportunity", ids[1])
    assert touched is not None and touched["LastModifiedDate"] < touched["SystemModstamp"]
    # simple-salesforce quotes a datetime with an offset and whole seconds: records of that second match too
    as_datetime = datetime.strptime(stamps[-1], "%Y-%m-%dT%H:%M:%S.%f%z")
    soql = format_soql(query, as_datetime)
    assert "+00:00" in soql
    coarse = [r["Id"] for r in sf.query_all(soql)["records"]]
    assert coarse[-2:] == [ids[0], ids[1]] and set(coarse) <= set(ids)
    shifted = as_datetime.astimezone(timezone(timedelta(hours=1))).replace(microsecond=0).isoformat()
    assert shifted.endswith("+01:00")
    assert [r["Id"] for r in sf.query_all(query.format(shifted))["records"]] == coarse


def test_malformed_query_and_invalid_field_errors(sf: Salesforce) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FRM Opportunity")
    err = error_of(exc)
    assert err["errorCode"] == "MALFORMED_QUERY"
    assert "ERROR at Row:1:Column:" in err["message"] and "unexpected token" in err["message"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunity WHERE Amount > 1 AND Amount < 5 OR Name = 'x'")
    assert error_of(exc)["errorCode"] == "MALFORMED_QUERY"  # AND/OR mixed without parentheses
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id, Foo FROM Opportunity")
    err = error_of(exc)
    assert err["errorCode"] == "INVALID_FIELD"
    assert err["message"] == (
        "\nSELECT Id, Foo FROM Opportunity\n           ^\nERROR at Row:1:Column:12\n"
        "No such column 'Foo' on entity 'Opportunity'. If you are attempting to use a custom field, be sure to "
        "append the '__c' after the custom field name. Please reference your WSDL or the describe call for the "
        "appropriate names."
    )
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunityy")
    err = error_of(exc)
    assert err["errorCode"] == "INVALID_TYPE" and "sObject type 'Opportunityy' is not supported" in err["message"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunity WHERE Amount = '5'")
    assert "must be of type double and should not be enclosed in quotes" in error_of(exc)["message"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunity WHERE Description = 'x'")
    assert "can not be filtered" in error_of(exc)["message"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunity WHERE Id = 'not-an-id'")
    assert error_of(exc)["errorCode"] == "INVALID_QUERY_FILTER_OPERATOR"
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query("SELECT Id FROM Opportunity OFFSET 2001")
    assert error_of(exc) == {
        "message": "Maximum SOQL offset allowed is 2000",
        "errorCode": "NUMBER_OUTSIDE_VALID_RANGE",
    }


def test_escaped_values_match_literally_and_never_inject(sf: Salesforce) -> None:
    tricky = 'O\'Brien \\ 100% "Daughters"_Ltd'
    target = sf.Opportunity.create({**OPP, "Name": tricky})["id"]
    sf.Opportunity.create({**OPP, "Name": 'O\'Brien \\ 100X "Daughters"-Ltd'})  # differs only at % and _
    sf.Opportunity.create({**OPP, "Name": "Unrelated"})
    found = sf.query(format_soql("SELECT Id, Name FROM Opportunity WHERE Name = {}", tricky))
    assert [(r["Id"], r["Name"]) for r in found["records"]] == [(target, tricky)]
    injection = "x' OR Name != '"
    assert sf.query(format_soql("SELECT Id FROM Opportunity WHERE Name = {}", injection))["totalSize"] == 0
    # the same value unescaped is a syntax error, not an injected condition
    with pytest.raises(SalesforceMalformedRequest):
        sf.query("SELECT Id FROM Opportunity WHERE Name = '" + tricky + "'")  # noqa: S608 - deliberately unescaped
    # equality is case-insensitive, as in SOQL
    assert sf.query(format_soql("SELECT Id FROM Opportunity WHERE Name = {}", tricky.upper()))["totalSize"] == 1


def test_like_with_escaped_wildcards(sf: Salesforce) -> None:
    for name in ("50% off", "50X off", "a_b deal", "axb deal"):
        sf.Opportunity.create({**OPP, "Name": name})

    def names(soql: str) -> set[str]:
        return {r["Name"] for r in sf.query(soql)["records"]}

    assert names(format_soql("SELECT Name FROM Opportunity WHERE Name LIKE '{:like}'", "50% off")) == {"50% off"}
    assert names("SELECT Name FROM Opportunity WHERE Name LIKE '50% off'") == {"50% off", "50X off"}
    assert names(format_soql("SELECT Name FROM Opportunity WHERE Name LIKE '{:like}%'", "a_b")) == {"a_b deal"}
    assert names("SELECT Name FROM Opportunity WHERE Name LIKE 'a_b%'") == {"a_b deal", "axb deal"}
    assert names("SELECT Name FROM Opportunity WHERE Name LIKE '%DEAL'") == {"a_b deal", "axb deal"}


def test_relationships_subqueries_and_operators(sf: Salesforce, emu: SalesforceEmulator) -> None:
    acct = sf.Account.create({"Name": "Northwind Traders", "BillingCountry": "GB", "BillingPostalCode": "EC2A 4NE"})[
        "id"
    ]
    contact = sf.Contact.create(
        {"LastName": "Okafor", "FirstName": "Amara", "Email": "amara@northwind.example", "AccountId": acct}
    )["id"]
    opp = sf.Opportunity.create({**OPP, "AccountId": acct, "PC_Sync_With_Partner_Center__c": True})["id"]
    sf.OpportunityContactRole.create(
        {"OpportunityId": opp, "ContactId": contact, "IsPrimary": True, "Role": "Decision Maker"}
    )
    orphan = sf.Opportunity.create({**OPP, "Name": "No account", "Amount": None})["id"]
    rows = sf.query(
        "select id, name, account.name, account.billingcountry, "
        "(SELECT ContactId, Contact.Email FROM OpportunityContactRoles WHERE IsPrimary = true) "
        "FROM opportunity ORDER BY Amount DESC NULLS LAST"
    )["records"]
    assert [r["Id"] for r in rows] == [opp, orphan]
    assert list(rows[0]) == ["attributes", "Id", "Name", "Account", "OpportunityContactRoles"]
    assert rows[0]["Account"] == {
        "attributes": {"type": "Account", "url": f"/services/data/v59.0/sobjects/Account/{acct}"},
        "Name": "Northwind Traders",
        "BillingCountry": "GB",
    }
    roles = rows[0]["OpportunityContactRoles"]
    assert roles["totalSize"] == 1 and roles["records"][0]["Contact"]["Email"] == "amara@northwind.example"
    assert rows[1]["Account"] is None and rows[1]["OpportunityContactRoles"] is None
    assert sf.query("SELECT COUNT() FROM Opportunity WHERE Account.BillingCountry = 'GB'")["totalSize"] == 1
    assert sf.query("SELECT Id FROM Opportunity WHERE Amount = null")["records"][0]["Id"] == orphan
    in_rows = sf.query(format_soql("SELECT Id FROM Opportunity WHERE Id IN {}", [opp[:15], "0065g000000000AAAA"]))
    assert [r["Id"] for r in in_rows["records"]] == [opp]  # 15-character ids match too
    not_in = sf.query("SELECT Id FROM Opportunity WHERE StageName NOT IN ('Closed Won', 'Closed Lost')")
    assert not_in["totalSize"] == 2
    semi = sf.query("SELECT Id FROM Opportunity WHERE Id IN (SELECT OpportunityId FROM OpportunityContactRole)")
    assert [r["Id"] for r in semi["records"]] == [opp]
    dated = sf.query("SELECT Id FROM Opportunity WHERE CloseDate >= 2026-06-30 AND CreatedDate = TODAY")
    assert dated["totalSize"] == 2
    assert sf.query("SELECT Id FROM Opportunity WHERE CloseDate > 2026-06-30")["totalSize"] == 0
    assert sf.query("SELECT Id FROM Opportunity WHERE CreatedDate < LAST_N_DAYS:3")["totalSize"] == 0
    paged = sf.query("SELECT Id FROM Opportunity ORDER BY Name LIMIT 1 OFFSET 1")
    assert [r["Id"] for r in paged["records"]] == [orphan]
    counted = sf.query("SELECT COUNT(Id) cnt FROM Opportunity")
    assert counted["records"] == [{"attributes": {"type": "AggregateResult"}, "cnt": 2}]
    emu.user_delete("Opportunity", orphan)
    assert sf.query("SELECT COUNT() FROM Opportunity")["totalSize"] == 1
    deleted = sf.query_all("SELECT Id, IsDeleted FROM Opportunity WHERE IsDeleted = true", include_deleted=True)
    assert [(r["Id"], r["IsDeleted"]) for r in deleted["records"]] == [(orphan, True)]


# ---------------------------------------------------------------------------
# records


def test_create_get_update_delete(sf: Salesforce, emu: SalesforceEmulator) -> None:
    created = sf.Opportunity.create({**OPP, "CurrencyIsoCode": "EUR", "PC_Solutions__c": "SOL-6115380-IPC"})
    assert created == {"id": created["id"], "success": True, "errors": []}
    record_id = created["id"]
    assert record_id.startswith("006") and len(record_id) == 18 and normalize_id(record_id[:15]) == record_id
    record = sf.Opportunity.get(record_id)
    assert record["attributes"] == {
        "type": "Opportunity",
        "url": f"/services/data/v59.0/sobjects/Opportunity/{record_id}",
    }
    assert (record["Amount"], record["CurrencyIsoCode"], record["IsClosed"], record["IsWon"]) == (
        125000.0,
        "EUR",
        False,
        False,
    )
    assert record["PC_Sync_With_Partner_Center__c"] is False and record["CreatedDate"] == record["SystemModstamp"]
    assert sf.Opportunity.update(record_id, {"StageName": "Closed Won", "Amount": 99.999}) == 204
    after = sf.Opportunity.get(record_id, params={"fields": "StageName,Amount,IsWon,SystemModstamp,LastModifiedDate"})
    assert set(after) == {"attributes", "StageName", "Amount", "IsWon", "SystemModstamp", "LastModifiedDate"}
    assert (after["StageName"], after["Amount"], after["IsWon"]) == ("Closed Won", 100.0, True)
    assert after["SystemModstamp"] > record["SystemModstamp"] and after["LastModifiedDate"] == after["SystemModstamp"]
    assert sf.Opportunity.delete(record_id) == 204
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.get(record_id)
    assert error_of(exc)["errorCode"] == "ENTITY_IS_DELETED"
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.get("nonsense")
    assert error_of(exc) == {
        "message": "Provided external ID field does not exist or is not accessible: nonsense",
        "errorCode": "NOT_FOUND",
    }
    account = sf.Account.create({"Name": "Tailspin Toys"})["id"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(account, {"Name": "x"})
    assert error_of(exc)["errorCode"] == "MALFORMED_ID"
    missing = normalize_id("0065g0009999999")
    assert missing is not None
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.get(missing)
    assert error_of(exc)["message"] == "The requested resource does not exist"


def test_validation_errors(sf: Salesforce) -> None:
    def failure(obj: str, data: dict[str, Any]) -> dict[str, Any]:
        with pytest.raises(SalesforceMalformedRequest) as exc:
            getattr(sf, obj).create(data)
        return error_of(exc)

    assert failure("Opportunity", {"Amount": 5}) == {
        "message": "Required fields are missing: [Name, StageName, CloseDate]",
        "errorCode": "REQUIRED_FIELD_MISSING",
        "fields": ["Name", "StageName", "CloseDate"],
    }
    assert failure("Opportunity", {**OPP, "StageName": "Won"}) == {
        "message": "Stage: bad value for restricted picklist field: Won",
        "errorCode": "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        "fields": ["StageName"],
    }
    assert (
        failure("Opportunity", {**OPP, "CurrencyIsoCode": "XYZ"})["errorCode"]
        == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    )
    assert failure("Opportunity", {**OPP, "PC_How_Can_Microsoft_Help__c": "Unknown"})["fields"] == [
        "PC_How_Can_Microsoft_Help__c"
    ]
    too_long = failure("Opportunity", {**OPP, "Name": "x" * 121})
    assert too_long["errorCode"] == "STRING_TOO_LONG" and too_long["message"].endswith("(max length=120)")
    assert failure("Opportunity", {**OPP, "PC_Referral_Id__c": "r" * 101})["fields"] == ["PC_Referral_Id__c"]
    email = failure("Contact", {"LastName": "Chen", "Email": "not-an-email"})
    assert email == {
        "message": "Email: invalid email address: not-an-email",
        "errorCode": "INVALID_EMAIL_ADDRESS",
        "fields": ["Email"],
    }
    assert failure("Opportunity", {**OPP, "Foo__c": 1}) == {
        "message": "No such column 'Foo__c' on sobject of type Opportunity",
        "errorCode": "INVALID_FIELD",
    }
    read_only = failure("Opportunity", {**OPP, "IsClosed": True})
    assert read_only["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE" and read_only["fields"] == ["IsClosed"]
    wrong_type = failure("Opportunity", {**OPP, "Amount": "lots"})
    assert wrong_type["errorCode"] == "JSON_PARSER_ERROR"
    assert wrong_type["message"].startswith("Cannot deserialize instance of currency from VALUE_STRING value lots")
    bad_date = failure("Opportunity", {**OPP, "CloseDate": "30/06/2026"})
    assert bad_date["errorCode"] == "JSON_PARSER_ERROR" and "instance of date" in bad_date["message"]
    bad_ref = failure("Opportunity", {**OPP, "AccountId": "001000000000000AAA"})
    assert bad_ref["errorCode"] == "INVALID_CROSS_REFERENCE_KEY"
    wrong_ref = failure("Contact", {"LastName": "X", "AccountId": sf.Opportunity.create(OPP)["id"]})
    assert wrong_ref["errorCode"] == "FIELD_INTEGRITY_EXCEPTION" and wrong_ref["fields"] == ["AccountId"]
    sf.Opportunity.create({**OPP, "PC_Referral_Id__c": "REF-1"})
    duplicate = failure("Opportunity", {**OPP, "PC_Referral_Id__c": "ref-1"})  # unique is case-insensitive
    assert duplicate["errorCode"] == "DUPLICATE_VALUE" and "PC_Referral_Id__c duplicates value" in duplicate["message"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(sf.Opportunity.create(OPP)["id"], {"StageName": None})
    assert error_of(exc)["errorCode"] == "REQUIRED_FIELD_MISSING"


def test_upsert_created_then_updated_and_quoted_values(sf: Salesforce, emu: SalesforceEmulator) -> None:
    first = sf.Opportunity.upsert("PC_Referral_Id__c/REF-100", OPP, raw_response=True)
    assert first.status_code == 201
    body = first.json()
    assert body == {"id": body["id"], "success": True, "errors": [], "created": True}
    second = sf.Opportunity.upsert("PC_Referral_Id__c/REF-100", {"StageName": "Negotiation/Review"}, raw_response=True)
    assert second.status_code == 200
    assert second.json() == {"id": body["id"], "success": True, "errors": [], "created": False}
    stored = emu.get_record("Opportunity", body["id"])
    assert stored is not None and (stored["StageName"], stored["PC_Referral_Id__c"]) == (
        "Negotiation/Review",
        "REF-100",
    )
    odd = "a/b c#d?e&ü"
    created = sf.Opportunity.upsert(format_external_id("PC_Referral_Id__c", odd), OPP, raw_response=True)
    assert created.status_code == 201
    fetched = sf.Opportunity.get(format_external_id("PC_Referral_Id__c", odd))
    assert fetched["PC_Referral_Id__c"] == odd and fetched["Id"] == created.json()["id"]
    # get_by_custom_id uses quote_plus: fine without spaces (in a path "+" is a plus sign, not a space)
    sf.Opportunity.upsert(format_external_id("PC_Referral_Id__c", "x/y#z&ü"), OPP)
    assert sf.Opportunity.get_by_custom_id("PC_Referral_Id__c", "x/y#z&ü")["PC_Referral_Id__c"] == "x/y#z&ü"
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.upsert("Name/Whatever", OPP)
    assert error_of(exc)["message"] == "Provided external ID field does not exist or is not accessible: Name"


def test_upsert_on_non_unique_external_id_answers_300(
    sf: Salesforce, emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session
) -> None:
    resp = session.post(
        server.origin + "/_sandbox/schema/external-id",
        json={"object": "Opportunity", "field": "Legacy_Id__c", "unique": False},
        timeout=10,
    )
    assert resp.json()["externalId"] is True and resp.json()["unique"] is False
    a = sf.Opportunity.create({**OPP, "Legacy_Id__c": "L-1"})["id"]
    b = sf.Opportunity.create({**OPP, "Legacy_Id__c": "L-1"})["id"]  # not unique: allowed
    with pytest.raises(SalesforceMoreThanOneRecord) as exc:
        sf.Opportunity.upsert("Legacy_Id__c/L-1", {"StageName": "Qualification"})
    assert exc.value.status == 300
    assert exc.value.content == [
        f"/services/data/v59.0/sobjects/Opportunity/{a}",
        f"/services/data/v59.0/sobjects/Opportunity/{b}",
    ]
    assert {r["StageName"] for r in emu.list_records("Opportunity")} == {"Prospecting"}  # nothing was written
    with pytest.raises(SalesforceMoreThanOneRecord):
        sf.Opportunity.get_by_custom_id("Legacy_Id__c", "L-1")
    fields = {f["name"]: f for f in sf.Opportunity.describe()["fields"]}
    assert fields["Legacy_Id__c"]["externalId"] is True and fields["Legacy_Id__c"]["unique"] is False


# ---------------------------------------------------------------------------
# sObject collections


def _records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"attributes": {"type": "Opportunity"}, **OPP, "Name": f"Bulk deal {start + i}"} for i in range(n)]


def test_collections_450_records_in_three_calls(sf: Salesforce, emu: SalesforceEmulator) -> None:
    records = _records(450)
    del records[250]["StageName"]  # one invalid record, in the second call
    results = []
    for chunk in (records[:200], records[200:400], records[400:]):
        results.extend(sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": chunk}))
    assert len(results) == 450
    bad = results[250]
    assert bad == {
        "success": False,
        "errors": [
            {
                "statusCode": "REQUIRED_FIELD_MISSING",
                "message": "Required fields are missing: [StageName]",
                "fields": ["StageName"],
            }
        ],
    }
    good = [r for i, r in enumerate(results) if i != 250]
    assert all(r["success"] and r["errors"] == [] and r["id"].startswith("006") for r in good)
    assert len(emu.list_records("Opportunity")) == 449
    names = {r["Name"] for r in emu.list_records("Opportunity")}
    assert "Bulk deal 250" not in names and "Bulk deal 449" in names


def test_collections_all_or_none_rolls_back(sf: Salesforce, emu: SalesforceEmulator) -> None:
    records = _records(200)
    records[7]["StageName"] = "Nope"
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": True, "records": records})
    assert len(results) == 200
    assert results[7]["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    rolled = [r for i, r in enumerate(results) if i != 7]
    assert all(not r["success"] for r in rolled)
    assert {r["errors"][0]["statusCode"] for r in rolled} == {"ALL_OR_NONE_OPERATION_ROLLED_BACK"}
    assert rolled[0]["errors"][0]["message"] == (
        "Record rolled back because not all records were valid and the request was using AllOrNone header"
    )
    assert all("errorCode" not in e for r in results for e in r["errors"])
    assert emu.list_records("Opportunity") == []
    # updates roll back too, and keep their ids
    ids = [r["id"] for r in sf.restful("composite/sobjects", method="POST", json={"records": _records(3)})]
    updates = [
        {"attributes": {"type": "Opportunity"}, "id": ids[0], "Amount": 1},
        {"attributes": {"type": "Opportunity"}, "id": ids[1], "Name": "y" * 200},
        {"attributes": {"type": "Opportunity"}, "id": "006bogus", "Amount": 2},
    ]
    results = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": True, "records": updates})
    assert results[0] == {"id": ids[0], "success": False, "errors": [dict(results[0]["errors"][0])]}
    assert results[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert results[1]["errors"][0]["statusCode"] == "STRING_TOO_LONG"
    assert results[2]["errors"][0]["statusCode"] == "MALFORMED_ID" and "id" not in results[2]
    stored = emu.get_record("Opportunity", ids[0])
    assert stored is not None and stored["Amount"] == 125000.0
    partial = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": False, "records": updates})
    assert [r["success"] for r in partial] == [True, False, False]
    stored = emu.get_record("Opportunity", ids[0])
    assert stored is not None and stored["Amount"] == 1.0


def test_collections_reject_more_than_200_records(sf: Salesforce, emu: SalesforceEmulator) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": _records(201)})
    assert error_of(exc) == {
        "message": "record limit reached. cannot submit more than 200 records into this call",
        "errorCode": "EXCEEDED_ID_LIMIT",
    }
    assert emu.list_records("Opportunity") == []


def test_collections_upsert_by_referral_id(sf: Salesforce, emu: SalesforceEmulator) -> None:
    existing = sf.Opportunity.create({**OPP, "PC_Referral_Id__c": "ref-a"})["id"]
    records = [
        {"attributes": {"type": "Opportunity"}, "PC_Referral_Id__c": "REF-A", "StageName": "Qualification"},
        {"attributes": {"type": "Opportunity"}, **OPP, "PC_Referral_Id__c": "REF-B"},
        {"attributes": {"type": "Opportunity"}, "PC_Referral_Id__c": "REF-C", "Name": "missing stage"},
    ]
    results = sf.restful(
        "composite/sobjects/Opportunity/PC_Referral_Id__c",
        method="PATCH",
        json={"allOrNone": False, "records": records},
    )
    assert results[0] == {"id": existing, "success": True, "errors": [], "created": False}
    assert results[1]["success"] is True and results[1]["created"] is True
    assert results[2]["success"] is False and results[2]["created"] is False
    assert results[2]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    by_ref = {r["PC_Referral_Id__c"]: r for r in emu.list_records("Opportunity")}
    assert by_ref["ref-a"]["StageName"] == "Qualification" and set(by_ref) == {"ref-a", "REF-B"}
    fetched = sf.restful(
        "composite/sobjects/Opportunity",
        params={"ids": f"{existing},{results[1]['id']},0065g0009999999AAA", "fields": "Id,PC_Referral_Id__c"},
    )
    assert [r and r["PC_Referral_Id__c"] for r in fetched] == ["ref-a", "REF-B", None]
    deleted = sf.restful("composite/sobjects", method="DELETE", params={"ids": f"{existing},bad", "allOrNone": "false"})
    assert deleted[0] == {"id": existing, "success": True, "errors": []}
    assert deleted[1]["errors"][0] == {"statusCode": "MALFORMED_ID", "message": "malformed id bad", "fields": []}


def test_concurrent_writers(sf: Salesforce, emu: SalesforceEmulator) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                sf.Opportunity.upsert(f"PC_Referral_Id__c/T{n}-{i}", OPP)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records = emu.list_records("Opportunity")
    assert len(records) == 60 and len({r["Id"] for r in records}) == 60
    stamps = sorted(r["SystemModstamp"] for r in records)
    assert len(set(stamps)) == 60


# ---------------------------------------------------------------------------
# describe, replication, bulk, control plane


def test_describe_through_the_airflow_provider_hook(
    sf: Salesforce, emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_SALESFORCE_DEFAULT",
        json.dumps({"conn_type": "salesforce", "extra": {"instance_url": server.origin}}),
    )
    from airflow.providers.salesforce.hooks.salesforce import SalesforceHook

    hook = SalesforceHook(session_id=emu.access_token, session=session)
    fields = hook.get_available_fields("Opportunity")
    for name in (
        "Id",
        "Name",
        "Amount",
        "CurrencyIsoCode",
        "CloseDate",
        "StageName",
        "AccountId",
        "IsClosed",
        "SystemModstamp",
        "PC_Referral_Id__c",
        "PC_Sync_Status__c",
        "PC_Audit__c",
    ):
        assert name in fields
    described = hook.describe_object("Opportunity")
    assert (described["name"], described["keyPrefix"], described["label"]) == ("Opportunity", "006", "Opportunity")
    by_name = {f["name"]: f for f in described["fields"]}
    ref = by_name["PC_Referral_Id__c"]
    assert (ref["type"], ref["length"], ref["externalId"], ref["unique"], ref["custom"]) == (
        "string",
        100,
        True,
        True,
        True,
    )
    stage = by_name["StageName"]
    assert stage["restrictedPicklist"] is True and stage["nillable"] is False
    assert [p["value"] for p in stage["picklistValues"]][-2:] == ["Closed Won", "Closed Lost"]
    assert by_name["AccountId"]["referenceTo"] == ["Account"] and by_name["AccountId"]["relationshipName"] == "Account"
    assert by_name["IsClosed"]["createable"] is False and by_name["Description"]["filterable"] is False
    assert {"USD", "EUR", "JPY"} <= {p["value"] for p in by_name["CurrencyIsoCode"]["picklistValues"]}
    assert set(hook.get_available_fields("Contact")) >= {"FirstName", "LastName", "Email", "Phone", "AccountId"}
    assert described["childRelationships"][0]["relationshipName"] == "OpportunityContactRoles"
    sf.Opportunity.create(OPP)
    result = hook.make_query("SELECT Id, Name FROM Opportunity")
    assert result["totalSize"] == 1 and result["records"][0]["Name"] == OPP["Name"]
    glob = sf.describe()
    assert {o["name"]: o["keyPrefix"] for o in glob["sobjects"]} == {
        "Account": "001",
        "Contact": "003",
        "Opportunity": "006",
        "OpportunityContactRole": "00K",
    }
    assert sf.Opportunity.metadata()["objectDescribe"]["name"] == "Opportunity"


def test_updated_and_deleted(sf: Salesforce, emu: SalesforceEmulator) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    keep = sf.Opportunity.create(OPP)["id"]
    gone = sf.Opportunity.create(OPP)["id"]
    sf.Opportunity.delete(gone)
    real = emu.clock
    emu.clock = lambda: real() + 120  # two minutes later: the writes are inside a whole covered minute
    try:
        end = datetime.now(UTC) + timedelta(minutes=10)
        updated = sf.Opportunity.updated(start, end)
        assert updated["ids"] == [keep]
        covered = datetime.strptime(updated["latestDateCovered"], "%Y-%m-%dT%H:%M:%S.%f%z")
        assert covered.second == 0 and covered <= datetime.now(UTC) + timedelta(minutes=3)
        deleted = sf.Opportunity.deleted(start, end)
        assert [d["id"] for d in deleted["deletedRecords"]] == [gone]
        assert deleted["deletedRecords"][0]["deletedDate"].endswith("+0000")
        assert {"earliestDateAvailable", "latestDateCovered"} <= set(deleted)
        with pytest.raises(SalesforceMalformedRequest) as exc:
            sf.Opportunity.updated(end, start)
        assert error_of(exc)["errorCode"] == "INVALID_REPLICATION_DATE"
        with pytest.raises(SalesforceMalformedRequest) as exc:
            sf.Opportunity.updated(datetime.now(UTC) - timedelta(days=40), end)
        assert error_of(exc)["errorCode"] == "INVALID_REPLICATION_DATE"
        with pytest.raises(SalesforceMalformedRequest) as exc:
            sf.Opportunity.deleted(datetime.now(UTC) - timedelta(days=20), end)
        assert error_of(exc)["errorCode"] == "INVALID_REPLICATION_DATE"
    finally:
        emu.clock = real


def test_bulk2_insert_and_upsert(sf: Salesforce, emu: SalesforceEmulator) -> None:
    emu.configure(bulk_delay=0.01)
    rows = [
        {
            "Name": "Bulk A",
            "StageName": "Prospecting",
            "CloseDate": "2026-07-01",
            "Amount": "1000",
            "PC_Referral_Id__c": "B-1",
        },
        {
            "Name": 'Bulk B, "quoted"',
            "StageName": "Qualification",
            "CloseDate": "2026-07-02",
            "Amount": "2000.5",
            "PC_Referral_Id__c": "B-2",
        },
        {"Name": "Bulk C", "StageName": "Bogus", "CloseDate": "2026-07-03", "Amount": "3", "PC_Referral_Id__c": "B-3"},
    ]
    [summary] = sf.bulk2.Opportunity.insert(records=rows, wait=0.05)
    assert (summary["numberRecordsProcessed"], summary["numberRecordsFailed"], summary["numberRecordsTotal"]) == (
        3,
        1,
        3,
    )
    job_id = summary["job_id"]
    assert job_id.startswith("750")
    results = sf.bulk2.Opportunity.get_all_ingest_records(job_id)
    ok = {r["Name"]: r for r in results["successfulRecords"]}
    assert set(ok) == {"Bulk A", 'Bulk B, "quoted"'} and all(r["sf__Created"] == "true" for r in ok.values())
    assert all(r["sf__Id"].startswith("006") for r in ok.values())
    [failed] = results["failedRecords"]
    assert failed["sf__Id"] == "" and failed["Name"] == "Bulk C"
    assert failed["sf__Error"] == (
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:Stage: bad value for restricted picklist field: Bogus:StageName --"
    )
    assert results["unprocessedRecords"] == []
    raw = sf.bulk2.Opportunity.get_successful_records(job_id)
    assert raw.splitlines()[0].startswith('"sf__Id","sf__Created",')
    stored = {r["PC_Referral_Id__c"]: r for r in emu.list_records("Opportunity")}
    assert stored["B-2"]["Amount"] == 2000.5 and stored["B-2"]["CloseDate"] == "2026-07-02"
    upserts = [
        {"PC_Referral_Id__c": "B-1", "StageName": "Closed Won"},
        {"PC_Referral_Id__c": "B-9", "Name": "Bulk new", "StageName": "Prospecting", "CloseDate": "2026-08-01"},
    ]
    [summary] = sf.bulk2.Opportunity.upsert(records=upserts, external_id_field="PC_Referral_Id__c", wait=0.05)
    assert (summary["numberRecordsProcessed"], summary["numberRecordsFailed"]) == (2, 0)
    created = {
        r["PC_Referral_Id__c"]: r["sf__Created"]
        for r in sf.bulk2.Opportunity.get_all_ingest_records(summary["job_id"])["successfulRecords"]
    }
    assert created == {"B-1": "false", "B-9": "true"}
    stored = {r["PC_Referral_Id__c"]: r for r in emu.list_records("Opportunity")}
    assert stored["B-1"]["StageName"] == "Closed Won" and stored["B-1"]["IsWon"] is True
    assert stored["B-1"]["Name"] == "Bulk A"  # blank/absent columns leave fields untouched
    [summary] = sf.bulk2.Opportunity.delete(records=[{"Id": stored["B-9"]["Id"]}], wait=0.05)
    assert summary["numberRecordsFailed"] == 0
    assert "B-9" not in {r["PC_Referral_Id__c"] for r in emu.list_records("Opportunity")}
    assert "B-9" in {r["PC_Referral_Id__c"] for r in emu.list_records("Opportunity", include_deleted=True)}
    [summary] = sf.bulk2.Opportunity.hard_delete(records=[{"Id": stored["B-2"]["Id"]}], wait=0.05)
    assert summary["numberRecordsFailed"] == 0
    assert "B-2" not in {r["PC_Referral_Id__c"] for r in emu.list_records("Opportunity", include_deleted=True)}
    sf.Opportunity.create({**OPP, "PC_Referral_Id__c": "B-2"})  # the unique value is free again


def test_bulk2_unknown_column_fails_the_job(sf: Salesforce, emu: SalesforceEmulator) -> None:
    emu.configure(bulk_delay=0.01)
    with pytest.raises(SalesforceOperationError) as exc:
        sf.bulk2.Opportunity.insert(records=[{"Name": "x", "Stage": "Prospecting"}], wait=0.05)
    assert "InvalidBatch : Field name not found : Stage" in str(exc.value)
    jobs = [j for j in emu.bulk.jobs.values()]
    assert [j.state for j in jobs] == ["Failed"]
    assert emu.list_records("Opportunity") == []
    unprocessed = sf.bulk2.Opportunity.get_unprocessed_records(jobs[0].id)
    assert len(unprocessed.splitlines()) == 2


def test_bulk2_job_lifecycle_over_http(api, emu: SalesforceEmulator) -> None:
    emu.configure(bulk_delay=0.3)
    job = api(
        "POST",
        "jobs/ingest/",
        json={"object": "Account", "operation": "insert", "contentType": "CSV", "lineEnding": "LF"},
    )
    assert job.status_code == 200 and job.json()["state"] == "Open"
    job_id = job.json()["id"]
    bad = api("POST", "jobs/ingest", json={"object": "Opportunity", "operation": "upsert"})
    assert bad.status_code == 400 and "External ID was blank" in bad.json()[0]["message"]
    put = api(
        "PUT",
        f"jobs/ingest/{job_id}/batches/",
        data=b"Name,BillingCountry\nFabrikam,US\n",
        headers={"Content-Type": "text/csv"},
    )
    assert put.status_code == 201 and put.content == b""
    closed = api("PATCH", f"jobs/ingest/{job_id}/", json={"state": "UploadComplete"})
    assert closed.json()["state"] == "UploadComplete"
    assert (
        api("PUT", f"jobs/ingest/{job_id}/batches", data=b"Name\nX\n", headers={"Content-Type": "text/csv"}).status_code
        == 409
    )
    seen = []
    for _ in range(100):
        state = api("GET", f"jobs/ingest/{job_id}").json()["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "JobComplete":
            break
        time.sleep(0.05)
    assert seen == ["UploadComplete", "InProgress", "JobComplete"]
    info = api("GET", f"jobs/ingest/{job_id}").json()
    assert (info["numberRecordsProcessed"], info["numberRecordsFailed"], info["jobType"]) == (1, 0, "V2Ingest")
    assert [a["Name"] for a in emu.list_records("Account")] == ["Fabrikam"]
    crlf = api("POST", "jobs/ingest", json={"object": "Account", "operation": "insert", "lineEnding": "LF"}).json()[
        "id"
    ]
    api("PUT", f"jobs/ingest/{crlf}/batches", data=b"Name\r\nX\r\n", headers={"Content-Type": "text/csv"})
    api("PATCH", f"jobs/ingest/{crlf}", json={"state": "UploadComplete"})
    time.sleep(0.9)
    info = api("GET", f"jobs/ingest/{crlf}").json()
    assert info["state"] == "Failed" and "LineEnding is invalid" in info["errorMessage"]
    assert api("DELETE", f"jobs/ingest/{crlf}").status_code == 204
    assert api("GET", f"jobs/ingest/{crlf}").status_code == 404


def test_seed_and_control_plane(
    emu: SalesforceEmulator, server: EmulatorServer, session: requests.Session, sf: Salesforce
) -> None:
    ids = session.post(
        server.origin + "/_sandbox/seed",
        json={"opportunities": 30, "accounts": 5, "flagged": 7, "seed": 11},
        timeout=30,
    ).json()
    assert (len(ids["accounts"]), len(ids["opportunities"]), len(ids["flagged"])) == (5, 30, 7)
    state = session.get(server.origin + "/_sandbox/state", timeout=10).json()
    assert state["records"]["Opportunity"] == 30 and state["flagged"] == 7
    flagged = sf.query_all(
        "SELECT Id, PC_How_Can_Microsoft_Help__c, PC_Solutions__c, CurrencyIsoCode, Account.BillingCountry, "
        "(SELECT Contact.Email FROM OpportunityContactRoles WHERE IsPrimary = true) "
        "FROM Opportunity WHERE PC_Sync_With_Partner_Center__c = true"
    )["records"]
    assert sorted(r["Id"] for r in flagged) == sorted(ids["flagged"])
    for r in flagged:
        assert r["PC_How_Can_Microsoft_Help__c"] and r["PC_Solutions__c"].startswith("SOL-")
        assert r["Account"]["BillingCountry"] and r["CurrencyIsoCode"] in (
            "USD",
            "EUR",
            "GBP",
            "CAD",
            "AUD",
            "JPY",
            "CHF",
            "INR",
            "BRL",
            "ZAR",
            "SGD",
        )
        assert "@" in r["OpportunityContactRoles"]["records"][0]["Contact"]["Email"]
    accounts = session.get(server.origin + "/_sandbox/records/Account", timeout=10).json()["records"]
    assert all(a["BillingPostalCode"] and a["BillingCity"] for a in accounts)
    target = ids["opportunities"][0]
    before = session.get(server.origin + f"/_sandbox/records/Opportunity/{target}", timeout=10).json()
    edited = session.post(
        server.origin + f"/_sandbox/records/Opportunity/{target}/edit", json={"Amount": 4242}, timeout=10
    ).json()
    assert edited["Amount"] == 4242.0 and edited["LastModifiedDate"] > before["LastModifiedDate"]
    assert edited["SystemModstamp"] == edited["LastModifiedDate"]
    bad = session.post(
        server.origin + f"/_sandbox/records/Opportunity/{target}/edit", json={"StageName": "x"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()[0]["errorCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert session.delete(server.origin + f"/_sandbox/records/Opportunity/{target}", timeout=10).status_code == 204
    with pytest.raises(SalesforceResourceNotFound):
        sf.Opportunity.get(target)
    account = ids["accounts"][0]
    emu.user_delete("Account", account)  # cascades to its contacts and opportunities
    assert all(c["AccountId"] != account for c in emu.list_records("Contact"))
    assert session.post(server.origin + "/_sandbox/reset", timeout=10).status_code == 204
    assert session.get(server.origin + "/_sandbox/state", timeout=10).json()["records"]["Opportunity"] == 0


# -- values the real API rejects per record are answered per record, never with a 500 ------------------
RANGE_OPP = {"attributes": {"type": "Opportunity"}, "StageName": "Prospecting", "CloseDate": "2026-06-30"}


def _range_records(n: int) -> list[dict[str, Any]]:
    return [{**RANGE_OPP, "Name": f"Deal {i}", "Amount": 1000 + i} for i in range(n)]


@pytest.mark.parametrize("amount", [1e300, -1e300, 1e18, 1.7976931348623157e308])
def test_out_of_range_amount_is_answered_per_record(sf: Salesforce, emu: SalesforceEmulator, amount: float) -> None:
    records = _range_records(200)
    records[42]["Amount"] = amount
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": records})
    assert len(results) == 200
    assert results[42]["success"] is False and "id" not in results[42]
    (error,) = results[42]["errors"]
    assert error["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    assert error["fields"] == ["Amount"]
    assert error["message"].startswith("Amount: value outside of valid range on numeric field: ")
    assert all(r["success"] for i, r in enumerate(results) if i != 42)
    assert len(emu.list_records("Opportunity")) == 199


def test_out_of_range_amount_on_update_and_upsert(sf: Salesforce, emu: SalesforceEmulator) -> None:
    created = sf.restful("composite/sobjects", method="POST", json={"records": _range_records(3)})
    ids = [r["id"] for r in created]
    updates = [
        {"attributes": {"type": "Opportunity"}, "id": i, "Amount": a} for i, a in zip(ids, (5, 1e300, 6), strict=True)
    ]
    results = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": False, "records": updates})
    assert [r["success"] for r in results] == [True, False, True]
    assert results[1]["id"] == ids[1]
    assert results[1]["errors"][0]["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    stored = emu.get_record("Opportunity", ids[1])
    assert stored is not None and stored["Amount"] == 1001.0
    # the all-or-none form rolls back the others, still answering 200 per record
    results = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": True, "records": updates})
    assert results[1]["errors"][0]["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    assert {r["errors"][0]["statusCode"] for i, r in enumerate(results) if i != 1} == {
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    }


def test_string_too_long_is_answered_per_record(sf: Salesforce, emu: SalesforceEmulator) -> None:
    records = _range_records(5)
    records[3]["Name"] = "x" * 121
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": records})
    assert [r["success"] for r in results] == [True, True, True, False, True]
    assert results[3]["errors"][0]["statusCode"] == "STRING_TOO_LONG"
    assert results[3]["errors"][0]["fields"] == ["Name"]
