"""PartnerCenterHook against the sandbox emulator, through the real msal and requests over HTTPS."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests

from cosell_sandbox.server import FaultConfig
from cosell_sync.errors import (
    AuthenticationError,
    PreconditionFailedError,
    ThrottledError,
    TransportError,
    ValidationError,
)
from cosell_sync.hooks.http import RetryPolicy
from cosell_sync.hooks.odata import quote
from cosell_sync.hooks.partner_center import PartnerCenterHook

FAST = RetryPolicy(max_attempts=6, backoff_base=0.01, backoff_max=0.05)


def new_referral(**overrides):
    doc = {
        "name": "Contoso - Azure migration",
        "externalReferenceId": "opp-0001",
        "status": "New",
        "substatus": "Pending",
        "type": "Independent",
        "qualification": "SalesQualified",
        "customerProfile": {
            "name": "Contoso Ltd",
            "address": {"addressLine1": "1 Main St", "city": "Seattle", "postalCode": "98101", "country": "US"},
            "team": [{"firstName": "Ada", "lastName": "Lovelace", "email": "ada@contoso.example"}],
        },
        "consent": {"consentToContact": True, "consentToShareReferralWithMicrosoftSellers": True},
        "details": {
            "dealValue": 125000.0,
            "currency": "USD",
            "notes": "first",
            "closingDateTime": "2027-01-31T00:00:00Z",
        },
    }
    doc.update(overrides)
    return doc


def seeded(pc, n, seed=7):
    return pc.partner_center.seed(n, seed=seed)


# -- paging ---------------------------------------------------------------------------------------------


def test_paging_across_1050_referrals_follows_documented_next_links(pc, hook):
    ids = seeded(pc, 1050)
    pc.partner_center.log.clear()

    got = [r["id"] for r in hook.list_referrals()]

    assert sorted(got) == sorted(ids)
    assert len(got) == len(set(got)) == 1050
    gets = pc.partner_center.requests_matching("GET")
    assert len(gets) == 11  # ceil(1050 / 100) pages
    # every page after the first came from the documented odd nextLink shape
    assert [g.path for g in gets[1:]] == ["/v1.0/referrals"] * 10
    assert hook.referrals.calls["GET"] == 11


def test_paging_with_small_top_and_orderby_keeps_order(pc, hook):
    seeded(pc, 250)
    docs = list(hook.list_referrals(orderby="updatedDateTime asc", top=37))
    stamps = [d["updatedDateTime"] for d in docs]
    assert len(docs) == 250
    assert stamps == sorted(stamps)


def test_top_above_100_is_refused_by_the_client(hook):
    with pytest.raises(ValueError, match="top"):
        next(hook.iter_referral_pages(top=500))


def test_next_link_to_another_host_is_refused(hook):
    base = hook.settings.referrals_url
    assert hook._next_link(base.replace("https://", "http://") + "?$skiptoken=x").startswith("https://")
    with pytest.raises(Exception, match="another host"):
        hook._next_link("http://evil.example/v1.0/referrals?$skiptoken=abc")


# -- filters ----------------------------------------------------------------------------------------------


FILTER_CASES = [
    ("status eq 'New'", lambda d: d["status"] == "New"),
    ("status ne 'Closed'", lambda d: d["status"] != "Closed"),
    ("details/dealValue gt 500000", lambda d: d["details"]["dealValue"] > 500000),
    ("details/dealValue ge 500000", lambda d: d["details"]["dealValue"] >= 500000),
    ("details/dealValue lt 100000", lambda d: d["details"]["dealValue"] < 100000),
    ("details/dealValue le 100000", lambda d: d["details"]["dealValue"] <= 100000),
    (
        "status eq 'New' and qualification eq 'SalesQualified'",
        lambda d: d["status"] == "New" and d["qualification"] == "SalesQualified",
    ),
    ("substatus eq 'Won' or substatus eq 'Lost'", lambda d: d["substatus"] in ("Won", "Lost")),
    (
        "customerProfile/address/country eq 'US' and direction eq 'Incoming'",
        lambda d: d["customerProfile"]["address"]["country"] == "US" and d["direction"] == "Incoming",
    ),
]


@pytest.mark.parametrize(("expr", "predicate"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_each_filter_operator(pc, hook, expr, predicate):
    seeded(pc, 300, seed=3)
    expected = {d["id"] for d in pc.partner_center.referrals.values() if predicate(d)}
    assert expected, "the seed data must exercise the filter"
    assert len(expected) < 300, "the filter must exclude something"
    got = {d["id"] for d in hook.list_referrals(filter=expr)}
    assert got == expected


def test_updated_datetime_filter_for_incremental_reads(pc, hook):
    seeded(pc, 200, seed=5)
    cut = datetime.now(UTC) - timedelta(days=30)
    literal = cut.strftime("%Y-%m-%dT%H:%M:%SZ")
    expected = {
        d["id"]
        for d in pc.partner_center.referrals.values()
        if datetime.fromisoformat(d["updatedDateTime"][:26] + "+00:00") > cut
    }
    got = {d["id"] for d in hook.list_referrals(filter=f"updatedDateTime gt {literal}")}
    assert got == expected and 0 < len(got) < 200


def test_filter_values_are_escaped_not_injected(pc, hook):
    tricky = "O'Brien) or (status eq 'New"
    hook.create_referral(new_referral(externalReferenceId=tricky))
    hook.create_referral(new_referral(externalReferenceId="plain"))
    seeded(pc, 20)
    found = hook.find_by_external_reference(tricky)
    assert [d["externalReferenceId"] for d in found] == [tricky]
    assert quote(tricky) == "'O''Brien) or (status eq ''New'"


def test_bad_filter_gets_400_with_documented_body(pc, hook):
    with pytest.raises(ValidationError) as err:
        list(hook.list_referrals(filter="status eq"))
    assert err.value.status == 400 and err.value.code == "invalidRequest"
    assert err.value.request_id


# -- auth ---------------------------------------------------------------------------------------------------


def test_missing_and_bad_tokens_get_401(pc, pc_conn):
    url = pc_conn["extra"]["referrals_url"]
    ca = pc_conn["extra"]["ca_bundle"]
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        resp = requests.get(url, headers=headers, verify=ca, timeout=10)
        assert resp.status_code == 401
        body = resp.json()
        assert body["error"]["code"] == "unauthenticated" and body["error"]["message"]


def test_token_for_the_wrong_audience_gets_401(pc, hook):
    # A token for the webhooks resource must not open the referrals API.
    token = hook.get_token(hook.settings.webhooks_scope)
    resp = requests.get(
        hook.settings.referrals_url,
        headers={"Authorization": f"Bearer {token}"},
        verify=hook.settings.ca_bundle,
        timeout=10,
    )
    assert resp.status_code == 401
    assert "audience" in resp.json()["error"]["message"]


def test_wrong_client_secret_is_a_clear_authentication_error(pc, pc_conn, monkeypatch):
    import json

    conn = copy.deepcopy(pc_conn)
    conn["password"] = "wrong-secret-value"
    monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
    with pytest.raises(AuthenticationError) as err:
        list(PartnerCenterHook().list_referrals())
    assert "AADSTS7000215" in str(err.value)
    assert "wrong-secret-value" not in str(err.value)


def test_access_token_is_cached_until_it_expires(pc, hook):
    pc.entra.config.token_lifetime = 302  # the hook refreshes 300 s before expiry
    before = pc.entra.grants["refresh_token"]
    list(hook.list_referrals())
    list(hook.list_referrals())
    assert pc.entra.grants["refresh_token"] == before + 1
    time.sleep(2.2)
    list(hook.list_referrals())
    assert pc.entra.grants["refresh_token"] == before + 2


def test_rotated_refresh_token_is_persisted_and_used_by_the_next_process(pc, pc_conn):
    from cosell_sync.hooks.entra import forget_tokens

    pc.entra.config.single_use_refresh_tokens = True  # the original token dies on first use
    original = pc_conn["extra"]["refresh_token"]
    list(PartnerCenterHook().list_referrals())
    store = PartnerCenterHook().token_store
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert original not in store.path.read_text()

    forget_tokens()  # as a new task process would start
    list(PartnerCenterHook().list_referrals())  # works only with the persisted rotated token
    assert pc.entra.refresh_tokens_presented[-1] != original


def test_expired_session_token_is_refreshed_once_on_401(pc, hook):
    list(hook.list_referrals())
    before = pc.entra.grants["refresh_token"]
    # Rotate the emulator's signing key: every issued access token is now invalid.
    pc.entra._signing_key = b"rotated-key-" + bytes(20)
    assert len(list(hook.list_referrals())) == 0
    assert pc.entra.grants["refresh_token"] == before + 1


# -- writes -----------------------------------------------------------------------------------------------


def test_create_get_and_etag(pc, hook):
    created = hook.create_referral(new_referral())
    assert created["id"] and created["eTag"].startswith('"')
    assert created["direction"] == "Outgoing" and created["externalReferenceId"] == "opp-0001"
    fetched = hook.get_referral(created["id"])
    assert fetched["eTag"] == created["eTag"]
    assert fetched["links"]["self"]["uri"].endswith(created["id"])


def test_stale_if_match_gets_412(pc, hook):
    created = hook.create_referral(new_referral())
    first = hook.patch_referral(
        created["id"], [{"op": "replace", "path": "/details/notes", "value": "v2"}], etag=created["eTag"]
    )
    assert first["eTag"] != created["eTag"]
    with pytest.raises(PreconditionFailedError) as err:
        hook.patch_referral(
            created["id"], [{"op": "replace", "path": "/details/notes", "value": "v3"}], etag=created["eTag"]
        )
    assert err.value.status == 412 and err.value.code == "preconditionFailed" and err.value.request_id
    assert pc.partner_center.referrals[created["id"]]["details"]["notes"] == "v2"


def test_put_requires_if_match_and_replaces(pc, hook):
    created = hook.create_referral(new_referral())
    body = dict(created, name="Renamed deal")
    replaced = hook.replace_referral(created["id"], body, created["eTag"])
    assert replaced["name"] == "Renamed deal"
    with pytest.raises(PreconditionFailedError):
        hook.replace_referral(created["id"], body, created["eTag"])
    resp = requests.put(
        f"{hook.settings.referrals_url}/{created['id']}",
        json=new_referral(),
        headers={"Authorization": f"Bearer {hook.get_token(hook.settings.referrals_scope)}"},
        verify=hook.settings.ca_bundle,
        timeout=10,
    )
    assert resp.status_code == 400 and "If-Match" in resp.json()["error"]["message"]


def test_json_patch_replace_and_add(pc, hook):
    created = hook.create_referral(new_referral())
    member = {"firstName": "Grace", "lastName": "Hopper", "email": "grace@partner.example"}
    out = hook.patch_referral(
        created["id"],
        [
            {"op": "replace", "path": "/details/dealValue", "value": 250000.5},
            {"op": "add", "path": "/team/-", "value": member},
            {"op": "add", "path": "/details/requirements", "value": {"solutions": [{"id": "SOL-6115380-IPC"}]}},
        ],
        etag=created["eTag"],
    )
    assert out["details"]["dealValue"] == 250000.5
    assert out["team"][-1] == member
    assert out["details"]["requirements"]["solutions"][0]["id"] == "SOL-6115380-IPC"
    # without Prefer: return=representation the API answers 204, with the new ETag in its header
    answer = hook.patch_referral(
        created["id"], [{"op": "replace", "path": "/name", "value": "n"}], return_representation=False
    )
    assert pc.partner_center.referrals[created["id"]]["name"] == "n"
    assert answer == {"eTag": pc.partner_center.referrals[created["id"]]["eTag"]}
    assert pc.partner_center.log[-1].status == 204


def test_unsupported_patch_op_is_refused(pc, hook):
    created = hook.create_referral(new_referral())
    with pytest.raises(ValueError, match="remove"):
        hook.patch_referral(created["id"], [{"op": "remove", "path": "/name"}])
    token = hook.get_token(hook.settings.referrals_scope)
    resp = requests.patch(
        f"{hook.settings.referrals_url}/{created['id']}",
        json=[{"op": "remove", "path": "/name"}],
        headers={"Authorization": f"Bearer {token}"},
        verify=hook.settings.ca_bundle,
        timeout=10,
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalidRequest"


def test_invalid_status_transition_is_rejected_with_documented_error(pc, hook):
    created = hook.create_referral(new_referral(status="Active", substatus="Accepted"))
    token = hook.get_token(hook.settings.referrals_scope)
    resp = requests.patch(
        f"{hook.settings.referrals_url}/{created['id']}",
        json=[
            {"op": "replace", "path": "/status", "value": "New"},
            {"op": "replace", "path": "/substatus", "value": "Pending"},
        ],
        headers={"Authorization": f"Bearer {token}", "If-Match": created["eTag"]},
        verify=hook.settings.ca_bundle,
        timeout=10,
    )
    assert resp.status_code == 400
    assert set(resp.json()) == {"error"} and resp.json()["error"]["code"] == "invalidRequest"
    assert "Active" in resp.json()["error"]["message"] and "New" in resp.json()["error"]["message"]
    assert resp.headers["request-id"]

    with pytest.raises(ValidationError, match="substatus"):  # substatus must fit the status
        hook.patch_referral(created["id"], [{"op": "replace", "path": "/substatus", "value": "Won"}])
    closed = hook.patch_referral(
        created["id"],
        [
            {"op": "replace", "path": "/status", "value": "Closed"},
            {"op": "replace", "path": "/substatus", "value": "Won"},
        ],
    )
    assert closed["closedDateTime"]
    with pytest.raises(ValidationError, match="terminal"):  # Closed is terminal
        hook.patch_referral(created["id"], [{"op": "replace", "path": "/details/notes", "value": "late"}])


def test_create_validation_names_the_field(pc, hook):
    bad = new_referral()
    bad["customerProfile"]["address"]["country"] = "USA"
    with pytest.raises(ValidationError, match=r"customerProfile\.address\.country"):
        hook.create_referral(bad)


# -- retries ------------------------------------------------------------------------------------------------


def test_429_waits_retry_after(pc, pc_conn):
    seeded(pc, 300)
    pc.partner_center.faults.configure(FaultConfig(seed=11, rate_429=0.5, retry_after=1.0, path_prefix="/v1.0"))
    hook = PartnerCenterHook(retry_policy=RetryPolicy(max_attempts=10))
    started = time.monotonic()
    docs = list(hook.list_referrals())
    elapsed = time.monotonic() - started
    throttled = pc.partner_center.faults.injected["429"]

    assert len(docs) == 300
    assert throttled >= 1
    assert hook.referrals.retries["HTTP 429"] == throttled
    assert hook.referrals.waited == pytest.approx(throttled * 1.0)
    assert elapsed >= throttled * 1.0  # really waited Retry-After, measured by the clock


def test_5xx_and_dropped_connections_back_off_and_recover(pc, pc_conn):
    seeded(pc, 200)
    pc.partner_center.faults.configure(
        FaultConfig(seed=5, rate_5xx=0.25, status_5xx=500, drop_rate=0.15, path_prefix="/v1.0")
    )
    hook = PartnerCenterHook(retry_policy=FAST)
    assert len(list(hook.list_referrals(top=20))) == 200
    injected = pc.partner_center.faults.injected
    assert injected["5xx"] + injected["drop"] >= 1
    assert hook.referrals.retries["HTTP 500"] == injected["5xx"]
    assert sum(v for k, v in hook.referrals.retries.items() if k != "HTTP 500") == injected["drop"]


def test_retries_are_bounded(pc, pc_conn):
    pc.partner_center.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=502, path_prefix="/v1.0"))
    hook = PartnerCenterHook(retry_policy=RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.02))
    with pytest.raises(Exception) as err:
        list(hook.list_referrals())
    assert getattr(err.value, "status", None) == 502
    assert hook.referrals.calls["GET"] == 3


def test_long_retry_after_fails_fast(pc, pc_conn):
    pc.partner_center.faults.configure(FaultConfig(rate_429=1.0, retry_after=3600, path_prefix="/v1.0"))
    hook = PartnerCenterHook(retry_policy=RetryPolicy(max_retry_after=60))
    with pytest.raises(ThrottledError) as err:
        list(hook.list_referrals())
    assert err.value.retry_after == 3600


def test_create_never_creates_twice_when_the_answer_is_lost(pc, pc_conn):
    # The POST is processed, then the connection drops: the client cannot know it landed.
    pc.partner_center.faults.configure(
        FaultConfig(drop_after_rate=1.0, max_faults=1, methods=("POST",), path_prefix="/v1.0")
    )
    hook = PartnerCenterHook(retry_policy=FAST)
    created = hook.create_referral(new_referral(externalReferenceId="opp-lost-answer"))
    matches = [d for d in pc.partner_center.referrals.values() if d.get("externalReferenceId") == "opp-lost-answer"]
    assert len(matches) == 1 and created["id"] == matches[0]["id"]
    assert hook.referrals.calls["POST"] == 1  # found by externalReferenceId, not re-posted


def test_create_is_retried_when_the_first_attempt_did_not_land(pc, pc_conn):
    pc.partner_center.faults.configure(FaultConfig(drop_rate=1.0, max_faults=1, methods=("POST",), path_prefix="/v1.0"))
    hook = PartnerCenterHook(retry_policy=FAST)
    created = hook.create_referral(new_referral(externalReferenceId="opp-dropped"))
    assert created["externalReferenceId"] == "opp-dropped"
    assert hook.referrals.calls["POST"] == 2
    assert sum(1 for d in pc.partner_center.referrals.values() if d.get("externalReferenceId") == "opp-dropped") == 1


def test_create_without_external_id_is_not_retried_blindly(pc, pc_conn):
    pc.partner_center.faults.configure(
        FaultConfig(drop_after_rate=1.0, max_faults=1, methods=("POST",), path_prefix="/v1.0")
    )
    hook = PartnerCenterHook(retry_policy=FAST)
    doc = new_referral()
    del doc["externalReferenceId"]
    with pytest.raises(TransportError):
        hook.create_referral(doc)
    assert len(pc.partner_center.referrals) == 1  # one landed; no blind second POST


# -- parsing -----------------------------------------------------------------------------------------------


def test_malformed_referral_gives_a_clear_error_and_keeps_the_good_ones(pc, hook):
    """The sync's parse of a listing (normalize): a bad value dead-letters its referral, naming the
    field, and never hides the good ones."""
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.engine.normalize import referrals_frame

    ids = seeded(pc, 30)
    bad = pc.partner_center.referrals[ids[4]]
    bad["details"]["dealValue"] = "lots"
    result = referrals_frame(list(hook.list_referrals()), load_mapping("salesforce"))
    assert len(result.frame) == 29 and ids[4] not in set(result.frame["referral_id"])
    (error,) = result.errors.to_dict("records")
    assert error["key"] == ids[4] and error["field"] == "details.dealValue" and "lots" in str(error["value"])


def test_seeded_referrals_parse_with_the_mapping(pc, hook):
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.engine.normalize import referrals_frame

    seeded(pc, 120, seed=9)
    for crm in ("salesforce", "dynamics365"):
        result = referrals_frame(list(hook.list_referrals()), load_mapping(crm))
        assert result.errors.empty and len(result.frame) == 120


def test_select_and_odata_annotations(pc, hook):
    seeded(pc, 130)
    docs = list(hook.list_referrals(select=["id", "status", "customerProfile"]))
    assert len(docs) == 130
    assert all(set(d) == {"id", "status", "customerProfile"} for d in docs)
    first = next(hook.iter_referral_pages(top=5))
    assert len(first) == 5
    token = hook.get_token(hook.settings.referrals_scope)
    raw = requests.get(
        f"{hook.settings.referrals_url}?$top=5&$filter=status eq 'New'",
        headers={"Authorization": f"Bearer {token}"},
        verify=hook.settings.ca_bundle,
        timeout=10,
    ).json()
    assert raw["@odata.context"].endswith("$metadata#Referrals")
    assert raw["@odata.count"] == len(raw["value"]) == 5  # the page's item count, as the documented example has it
    assert raw["@odata.nextLink"].startswith("http://")
    one = hook.get_referral(docs[0]["id"])
    assert not any(k.startswith("@odata") for k in one)  # the hook hands back the resource only
    with pytest.raises(ValidationError, match="nosuchfield"):
        list(hook.list_referrals(select=["nosuchfield"]))


def test_writes_on_many_threads_reuse_their_connections(pc, hook, caplog):
    """Partner Center has no batch API: the sync writes referrals from a thread pool. With
    requests' default pool (10 connections a host), a 16th thread's connection was thrown away
    after each call ("Connection pool is full") and the next call paid a new TLS handshake.
    The hook's session keeps as many as the threads use."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    ids = pc.partner_center.seed(16, seed=3)
    hook.get_referral(ids[0])  # the token, once
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    pc.partner_center.faults.configure(FaultConfig(latency_ms=(100, 100)))  # all 16 calls in flight at once
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(3):
            assert len(list(pool.map(hook.get_referral, ids))) == 16
    assert "Connection pool is full" not in caplog.text
