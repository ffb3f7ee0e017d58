"""SalesforceSyncHook (the provider's SalesforceHook, extended) against the Salesforce emulator,
through simple-salesforce over HTTPS."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime

import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync.errors import AuthenticationError, ThrottledError, ValidationError
from cosell_sync.hooks.http import RetryPolicy
from cosell_sync.hooks.salesforce import SalesforceSyncHook
from cosell_sync.hooks.soql import Condition, select

FAST = RetryPolicy(max_attempts=6, backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def sf(pc):
    return pc.salesforce


def opportunity(i: int, **extra):
    return {"Name": f"Deal {i:04d}", "StageName": "Prospecting", "CloseDate": "2027-03-31", "Amount": 1000 + i, **extra}


def test_collections_with_450_records_in_3_calls_and_one_bad_record(sf, sf_hook):
    records = [opportunity(i) for i in range(450)]
    records[317] = {**records[317], "StageName": "Not A Stage"}
    sf.log.clear()
    results = sf_hook.create_records("Opportunity", records)
    posts = sf.requests_matching("POST")
    assert [p.path.rsplit("/", 1)[-1] for p in posts] == ["sobjects"] * 3  # 200 + 200 + 50
    assert [r.index for r in results] == list(range(450))
    assert [r.index for r in results if not r.success] == [317]
    bad = results[317]
    assert bad.errors[0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST" and "StageName" in bad.error_message
    assert all(r.id and len(r.id) == 18 for r in results if r.success)
    assert sf_hook.conn.query("SELECT COUNT() FROM Opportunity")["totalSize"] == 449


def test_all_or_none_rolls_back_every_record(sf, sf_hook):
    records = [opportunity(i) for i in range(5)]
    records[2] = {**records[2], "Name": None}
    results = sf_hook.create_records("Opportunity", records, all_or_none=True)
    assert not any(r.success for r in results)
    assert results[2].errors[0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert {r.errors[0]["statusCode"] for i, r in enumerate(results) if i != 2} == {"ALL_OR_NONE_OPERATION_ROLLED_BACK"}
    assert sf_hook.conn.query("SELECT COUNT() FROM Opportunity")["totalSize"] == 0


def test_paging_across_more_than_2000_records(sf, sf_hook):
    sf_hook.create_records("Opportunity", [opportunity(i) for i in range(2300)])
    sf.log.clear()
    soql = select("Opportunity", ["Id", "Name"], order_by=["Name"])
    names = [r["Name"] for r in sf_hook.query_records(soql)]
    assert len(names) == 2300 and names == sorted(names) and "attributes" not in names
    assert len(sf.requests_matching("GET")) == 2  # 2,000 + 300, following nextRecordsUrl
    sf.log.clear()
    assert len(list(sf_hook.query_records(soql, batch_size=500))) == 2300
    gets = sf.requests_matching("GET")
    assert len(gets) == 5 and all(g.headers.get("Sforce-Query-Options") == "batchSize=500" for g in gets)


def test_incremental_query_by_systemmodstamp(sf, sf_hook):
    first = sf_hook.create_records("Opportunity", [opportunity(i) for i in range(20)])
    watermark = max(r["SystemModstamp"] for r in sf_hook.query_records(select("Opportunity", ["SystemModstamp"])))
    since = datetime.strptime(watermark, "%Y-%m-%dT%H:%M:%S.%f%z")
    sf.user_edit("Opportunity", first[3].id, {"Description": "edited by a seller"})
    later = sf_hook.create_records("Opportunity", [opportunity(99)])
    rows = list(sf_hook.query_modified_since("Opportunity", ["Name", "Description"], since))
    assert [r["Id"] for r in rows] == [first[3].id, later[0].id]
    stamps = [r["SystemModstamp"] for r in rows]
    assert stamps == sorted(stamps)


def test_upsert_by_external_id_created_then_updated(sf, sf_hook):
    ref = "8a0d3f0e-'quoted'\\path-100%"
    created = sf_hook.upsert_records("Opportunity", "PC_Referral_Id__c", [opportunity(1, PC_Referral_Id__c=ref)])
    updated = sf_hook.upsert_records("Opportunity", "PC_Referral_Id__c", [{"PC_Referral_Id__c": ref, "Amount": 4242}])
    assert created[0].success and created[0].created is True
    assert updated[0].success and updated[0].created is False and updated[0].id == created[0].id
    rows = list(sf_hook.query_records(select("Opportunity", ["Amount"], [Condition("PC_Referral_Id__c", "=", ref)])))
    assert [r["Amount"] for r in rows] == [4242]


def test_where_values_with_quote_backslash_and_percent_match_literally(sf, sf_hook):
    tricky = "O'Brien \\ Sons 100% Pure_Water"
    sf_hook.create_records("Account", [{"Name": tricky}, {"Name": "O'Brien X Sons 100 Pure Water"}, {"Name": "Other"}])
    eq = list(sf_hook.query_records(select("Account", ["Name"], [Condition("Name", "=", tricky)])))
    like = list(sf_hook.query_records(select("Account", ["Name"], [Condition("Name", "LIKE", "100% Pure_")])))
    assert [r["Name"] for r in eq] == [tricky]
    assert like == []  # the wildcards in the value are escaped: no partial match on "100 Pure W"
    injected = list(sf_hook.query_records(select("Account", ["Name"], [Condition("Name", "=", "x' OR Name != '")])))
    assert injected == []


def test_request_limit_exceeded_and_503_are_retried(sf, sf_conn):
    sf.set_limits(daily_api_requests=100, used=100)  # the org's allowance is used up
    waits = []

    def sleep(seconds: float) -> None:  # while we wait, the rolling 24 h window frees some calls
        waits.append(seconds)
        sf.set_limits(daily_api_requests=100_000, used=0)

    hook = SalesforceSyncHook(retry_policy=FAST, sleep=sleep)
    assert hook.conn.query("SELECT COUNT() FROM Account")["totalSize"] == 0
    assert hook.retrier.retries["HTTP 403"] == 1 and waits

    sf.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=503, max_faults=2, path_prefix="/services/data"))
    assert hook.conn.query("SELECT COUNT() FROM Account")["totalSize"] == 0
    assert hook.retrier.retries["HTTP 503"] == 2


def test_request_limit_that_stays_exceeded_is_a_typed_error(sf, sf_conn):
    sf.set_limits(daily_api_requests=10, used=10)
    hook = SalesforceSyncHook(retry_policy=RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.02))
    with pytest.raises(ThrottledError) as err:
        list(hook.query_records("SELECT Id FROM Account"))
    assert err.value.code == "REQUEST_LIMIT_EXCEEDED" and err.value.status == 403
    assert hook.retrier.calls["GET"] == 3


def test_invalid_token_is_a_clear_error(sf, sf_conn, monkeypatch):
    conn = json.loads(json.dumps(sf_conn))
    conn["extra"]["access_token"] = "00Dbogus!AQ0AQnot-a-real-session-token"
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", json.dumps(conn))
    with pytest.raises(AuthenticationError) as err:
        list(SalesforceSyncHook().query_records("SELECT Id FROM Account"))
    assert err.value.status == 401 and err.value.code == "INVALID_SESSION_ID"
    assert "not-a-real-session-token" not in str(err.value)


def test_malformed_query_is_a_validation_error(sf, sf_hook):
    with pytest.raises(ValidationError) as err:
        list(sf_hook.query_records("SELECT Id FROM Opportunity WHERE"))
    assert err.value.code == "MALFORMED_QUERY"


def test_describe_through_the_providers_get_available_fields(sf, sf_hook):
    fields = sf_hook.get_available_fields("Opportunity")
    for name in ("Name", "StageName", "CloseDate", "PC_Referral_Id__c", "PC_Sync_Status__c", "SystemModstamp"):
        assert name in fields
    describe = sf_hook.describe_object("Opportunity")
    referral = next(f for f in describe["fields"] if f["name"] == "PC_Referral_Id__c")
    assert referral["externalId"] and referral["unique"] and referral["length"] == 100


def test_bulk_api_2_above_the_threshold(sf, sf_conn):
    hook = SalesforceSyncHook(bulk_threshold=100)
    records = [opportunity(i, PC_Referral_Id__c=f"ref-{i}") for i in range(250)]
    records[42] = {**records[42], "CloseDate": "not-a-date"}
    sf.log.clear()
    results = hook.upsert_records("Opportunity", "PC_Referral_Id__c", records)
    assert any("/jobs/ingest" in r.path for r in sf.log)  # went through Bulk API 2.0
    assert not any(r.path.endswith("composite/sobjects/Opportunity/PC_Referral_Id__c") for r in sf.log)
    assert [r.index for r in results if not r.success] == [42]
    assert "CloseDate" in results[42].error_message
    assert all(r.created is True for i, r in enumerate(results) if i != 42)
    again = hook.upsert_records("Opportunity", "PC_Referral_Id__c", [{**r, "Amount": 1} for r in records[:150]])
    assert sum(1 for r in again if r.success and r.created is False) == 149


def test_a_bulk_job_is_looked_at_soon_after_it_is_closed(sf, sf_conn, monkeypatch):
    """simple-salesforce sleeps its ``wait`` before it first reads a closed job's state, 5 s
    unless told: every Bulk API 2.0 write of a run (10,000 new opportunities are one) would
    cost at least 5 s however fast Salesforce was. The hook asks for its ``bulk_poll``."""
    import simple_salesforce.bulk2 as bulk2

    slept: list[float] = []
    monkeypatch.setattr(bulk2, "sleep", lambda seconds: slept.append(seconds) or time.sleep(0.01))
    hook = SalesforceSyncHook(bulk_threshold=10)
    records = [opportunity(i, PC_Referral_Id__c=f"ref-{i}") for i in range(20)]
    results = hook.upsert_records("Opportunity", "PC_Referral_Id__c", records)
    assert all(r.success for r in results) and any("/jobs/ingest" in r.path for r in sf.log)
    updated = hook.update_records("Opportunity", [{"Id": r.id, "Amount": 7} for r in results])
    assert all(r.success for r in updated)
    assert len(slept) >= 2 and max(slept) < 5  # the first look comes after bulk_poll, never 5 s
    assert slept[0] == hook.bulk_poll == 0.5


def test_api_usage_is_logged_and_calls_slow_down_near_the_limit(sf, sf_conn, caplog):
    caplog.set_level(logging.INFO)
    sf.set_limits(daily_api_requests=1000, used=950)
    pauses = []
    hook = SalesforceSyncHook(sleep=pauses.append)
    hook.conn.query("SELECT COUNT() FROM Account")
    hook.conn.query("SELECT COUNT() FROM Account")
    assert hook.usage.used == 952 and hook.usage.limit == 1000
    assert "Salesforce API usage 951/1000" in caplog.text
    assert pauses and pauses[0] > 0  # the second call was spaced out


def test_access_token_needs_an_instance_url(sf, sf_conn, monkeypatch):
    from cosell_sync.errors import ConfigurationError

    conn = json.loads(json.dumps(sf_conn))
    del conn["extra"]["instance_url"]
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", json.dumps(conn))
    with pytest.raises(ConfigurationError, match="instance_url"):
        SalesforceSyncHook().conn  # noqa: B018


def test_provider_username_password_fields_still_work(sf, sf_conn, monkeypatch):
    """Without an access token, the provider's own login path is used, through our session."""
    import simple_salesforce.api

    seen = {}

    def fake_login(**kwargs):
        seen.update(kwargs)
        return sf.access_token, sf_conn["extra"]["instance_url"].removeprefix("https://")

    monkeypatch.setattr(simple_salesforce.api, "SalesforceLogin", fake_login)
    conn = {
        "conn_type": "salesforce",
        "login": "integration@contoso.example",
        "password": "pw-123456",
        "extra": {"security_token": "tok-abcdef", "ca_bundle": sf_conn["extra"]["ca_bundle"]},
    }
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", json.dumps(conn))
    hook = SalesforceSyncHook()
    assert hook.conn.query("SELECT COUNT() FROM Account")["totalSize"] == 0
    assert seen["username"] == "integration@contoso.example" and seen["security_token"] == "tok-abcdef"
    assert seen["session"] is hook.session and hook.retrier.calls["GET"] == 1
