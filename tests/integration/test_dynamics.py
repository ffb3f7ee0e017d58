"""DynamicsHook against the Dataverse emulator, through the real msal and requests over HTTPS."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from cosell_sync.errors import NotFoundError, PreconditionFailedError, ThrottledError, ValidationError
from cosell_sync.hooks.batch import BatchRequest, ChangeSet
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.http import RetryPolicy
from cosell_sync.hooks.odata import quote


@pytest.fixture
def dv(pc):
    """The Dataverse emulator, reset."""
    return pc.dynamics365


def make_accounts(hook: DynamicsHook, n: int, prefix: str = "Account") -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 1000):
        chunk = [{"name": f"{prefix} {i:05d}", "address1_country": "US"} for i in range(start, min(n, start + 1000))]
        ids += hook.create_multiple("accounts", "account", chunk)
    return ids


def test_whoami_and_connection_test(dv, dyn_hook):
    me = dyn_hook.whoami()
    assert me["UserId"] and me["OrganizationId"]
    ok, message = dyn_hook.test_connection()
    assert ok, message


def test_paging_across_more_than_5000_rows(dv, dyn_hook):
    ids = make_accounts(dyn_hook, 5300)
    dv.log.clear()
    pages = list(dyn_hook.iter_pages("accounts", select=["name"]))
    assert [len(p) for p in pages] == [5000, 300]
    got = [row["accountid"] for page in pages for row in page]
    assert sorted(got) == sorted(ids) and len(set(got)) == 5300
    gets = dv.requests_matching("GET", "/api/data/v9.2/accounts")
    assert len(gets) == 2
    assert all(g.headers.get("Prefer") == "odata.maxpagesize=5000" for g in gets)  # same Prefer on every page


def test_small_pages_and_filter_escaping(dv, dyn_hook):
    tricky = "O'Brien) or (name ne 'x"
    dyn_hook.create("accounts", {"name": tricky, "address1_postalcode": "D02"})
    make_accounts(dyn_hook, 30)
    rows = list(dyn_hook.query("accounts", select=["name"], filter=f"name eq {quote(tricky)}"))
    assert [r["name"] for r in rows] == [tricky]
    assert len(list(dyn_hook.query("accounts", select=["name"], page_size=7))) == 31


def test_incremental_read_by_modifiedon(dv, dyn_hook):
    old = make_accounts(dyn_hook, 5)
    time.sleep(1.1)  # modifiedon has second precision
    watermark = datetime.now(UTC)
    time.sleep(1.1)
    new_id = dyn_hook.create("accounts", {"name": "Fresh"})
    dyn_hook.update("accounts", old[0], {"address1_city": "Redmond"})
    rows = list(dyn_hook.read_modified_since("accounts", watermark, select=["name"]))
    assert {r["accountid"] for r in rows} == {new_id, old[0]}
    stamps = [r["modifiedon"] for r in rows]
    assert stamps == sorted(stamps)


def test_change_tracking_with_updates_creates_and_deletes(dv, dyn_hook):
    ids = make_accounts(dyn_hook, 12)
    initial = dyn_hook.track_changes("accounts", select=["name", "address1_city"])
    assert {r["accountid"] for r in initial.rows} == set(ids) and initial.deleted == []
    assert initial.delta_link

    dyn_hook.update("accounts", ids[1], {"address1_city": "Oslo"})
    created = dyn_hook.create("accounts", {"name": "New one"})
    dyn_hook.delete("accounts", ids[2])
    delta = dyn_hook.track_changes("accounts", delta_link=initial.delta_link)
    assert {r["accountid"] for r in delta.rows} == {ids[1], created}
    assert delta.deleted == [ids[2]]
    assert delta.delta_link and delta.delta_link != initial.delta_link

    again = dyn_hook.track_changes("accounts", delta_link=delta.delta_link)
    assert again.rows == [] and again.deleted == []


def test_stale_etag_gets_412(dv, dyn_hook):
    row = dyn_hook.create("opportunities", {"name": "Deal", "estimatedvalue": 1000}, return_representation=True)
    etag = row["@odata.etag"]
    assert etag.startswith('W/"')
    dyn_hook.update("opportunities", row["opportunityid"], {"description": "v2"}, etag=etag)
    with pytest.raises(PreconditionFailedError) as err:
        dyn_hook.update("opportunities", row["opportunityid"], {"description": "v3"}, etag=etag)
    assert err.value.status == 412 and err.value.code == "0x80060882"
    assert dyn_hook.get("opportunities", row["opportunityid"], select=["description"])["description"] == "v2"
    with pytest.raises(NotFoundError):  # If-Match: * never creates
        dyn_hook.update("opportunities", str(uuid.uuid4()), {"description": "x"})


def test_create_returns_entity_id_or_representation(dv, dyn_hook):
    row_id = dyn_hook.create("accounts", {"name": "A"})
    assert isinstance(row_id, str) and len(row_id) == 36
    row = dyn_hook.create("accounts", {"name": "B"}, return_representation=True)
    assert row["name"] == "B" and row["accountid"]


def test_upsert_by_alternate_key_creates_then_updates(dv, dyn_hook):
    key = {"cosell_referralid": "ref-'quoted')-001"}
    first = dyn_hook.upsert("opportunities", key, {"name": "From referral", "estimatedvalue": 5000})
    second = dyn_hook.upsert("opportunities", key, {"estimatedvalue": 7500})
    assert first.created and not second.created and first.id == second.id
    row = dyn_hook.get("opportunities", first.id, select=["estimatedvalue", "cosell_referralid"])
    assert row["estimatedvalue"] == 7500 and row["cosell_referralid"] == key["cosell_referralid"]
    with pytest.raises(ValueError, match="must not be in the body"):
        dyn_hook.upsert("opportunities", key, {"cosell_referralid": "x"})


def test_lookups_and_currency(dv, dyn_hook):
    account = dyn_hook.create("accounts", {"name": "Contoso"})
    usd = dyn_hook.currency_id("usd")
    opp = dyn_hook.create(
        "opportunities",
        {
            "name": "Deal",
            "parentaccountid@odata.bind": DynamicsHook.bind("accounts", account),
            "transactioncurrencyid@odata.bind": DynamicsHook.bind("transactioncurrencies", usd),
        },
        return_representation=True,
    )
    assert opp["_parentaccountid_value"] == account and opp["_transactioncurrencyid_value"] == usd
    before = dv.requests_matching("GET", "/api/data/v9.2/transactioncurrencies")
    assert dyn_hook.currency_id("EUR") != usd
    assert dv.requests_matching("GET", "/api/data/v9.2/transactioncurrencies") == before  # cached
    with pytest.raises(LookupError, match="XYZ"):
        dyn_hook.currency_id("XYZ")


def test_batch_of_1000_with_one_bad_row_continues(dv, dyn_hook):
    requests_ = [BatchRequest("POST", "accounts", {"name": f"Batch {i}"}) for i in range(1000)]
    requests_[500] = BatchRequest("POST", "accounts", {"name": "Bad", "no_such_column": 1})
    responses = dyn_hook.batch(requests_, continue_on_error=True)
    assert len(responses) == 1000
    failed = [i for i, r in enumerate(responses) if not r.ok]
    assert failed == [500]
    assert (
        responses[500].status == 400 and responses[500].error_code and "no_such_column" in responses[500].error_message
    )
    assert sum(1 for r in responses if r.status == 204 and r.entity_id) == 999
    assert len(list(dyn_hook.query("accounts", select=["name"]))) == 999


def test_batch_without_continue_on_error_stops_at_the_failure(dv, dyn_hook):
    requests_ = [BatchRequest("POST", "accounts", {"name": f"Stop {i}"}) for i in range(10)]
    requests_[3] = BatchRequest("POST", "accounts", {"name": "Bad", "no_such_column": 1})
    responses = dyn_hook.batch(requests_, continue_on_error=False)
    assert [r.ok for r in responses] == [True, True, True, False]
    assert len(list(dyn_hook.query("accounts", select=["name"]))) == 3


def test_atomic_change_set_rolls_back_as_a_whole(dv, dyn_hook):
    good = BatchRequest("POST", "accounts", {"name": "In change set"})
    bad = BatchRequest("POST", "accounts", {"name": "x" * 500})  # longer than the column allows
    outside = BatchRequest("POST", "accounts", {"name": "Outside"})
    responses = dyn_hook.batch([ChangeSet([good, good, bad]), outside], continue_on_error=True)
    assert not responses[0].ok and responses[0].status == 400
    assert responses[-1].ok
    assert [r["name"] for r in dyn_hook.query("accounts", select=["name"])] == ["Outside"]


def test_change_set_content_id_reference(dv, dyn_hook):
    responses = dyn_hook.batch(
        [
            ChangeSet(
                [
                    BatchRequest("POST", "accounts", {"name": "Parent"}, content_id="1"),
                    BatchRequest(
                        "POST",
                        "contacts",
                        {"lastname": "Child", "parentcustomerid_account@odata.bind": "$1"},
                        content_id="2",
                    ),
                ]
            )
        ]
    )
    assert all(r.ok for r in responses)
    contact = dyn_hook.get("contacts", responses[1].entity_id, select=["_parentcustomerid_value"])
    assert contact["_parentcustomerid_value"] == responses[0].entity_id


def test_upsert_multiple_and_create_multiple(dv, dyn_hook):
    targets = [{"cosell_referralid": f"ref-{i}", "name": f"Deal {i}", "estimatedvalue": i * 100} for i in range(49)]
    targets.append({"cosell_referralid": "ref-'49' (O'Brien & Co) 100%", "name": "Deal 49", "estimatedvalue": 4900})
    dyn_hook.upsert_multiple("opportunities", "opportunity", targets, key="cosell_referralid")
    dyn_hook.upsert_multiple(
        "opportunities", "opportunity", [{**t, "estimatedvalue": 1} for t in targets[:10]], key="cosell_referralid"
    )
    rows = {
        r["cosell_referralid"]: r
        for r in dyn_hook.query("opportunities", select=["cosell_referralid", "estimatedvalue"])
    }
    assert len(rows) == 50
    assert rows["ref-3"]["estimatedvalue"] == 1 and rows["ref-30"]["estimatedvalue"] == 3000
    assert rows["ref-'49' (O'Brien & Co) 100%"]["estimatedvalue"] == 4900

    with pytest.raises(ValidationError):  # one bad target: nothing is created
        dyn_hook.create_multiple("accounts", "account", [{"name": "ok"}, {"name": None}, {"name": "ok2"}])
    assert list(dyn_hook.query("accounts", select=["name"])) == []


def test_win_and_lose_opportunities(dv, dyn_hook):
    won = dyn_hook.create("opportunities", {"name": "Win me", "estimatedvalue": 10})
    lost = dyn_hook.create("opportunities", {"name": "Lose me", "estimatedvalue": 10})
    with pytest.raises(ValidationError):  # statecode is not patched in Dataverse
        dyn_hook.update("opportunities", won, {"statecode": 1, "statuscode": 3})
    dyn_hook.win_opportunity(won, "Won via cosell-sync")
    dyn_hook.lose_opportunity(lost, "Lost via cosell-sync", status=5)
    won_row = dyn_hook.get("opportunities", won, select=["statecode", "statuscode"])
    assert (won_row["statecode"], won_row["statuscode"]) == (1, 3)
    lost_row = dyn_hook.get("opportunities", lost, select=["statecode", "statuscode"])
    assert (lost_row["statecode"], lost_row["statuscode"]) == (2, 5)
    with pytest.raises(ValidationError):  # closing twice is an error
        dyn_hook.win_opportunity(lost, "again")


def test_service_protection_429_is_waited_out(dv, dyn_hook, dyn_conn):
    make_accounts(dyn_hook, 40)
    dv.configure_limits(requests=5, window_seconds=2)
    hook = DynamicsHook(retry_policy=RetryPolicy(max_attempts=10))
    started = time.monotonic()
    count = len(list(hook.query("accounts", select=["name"], page_size=4)))  # 10 pages
    elapsed = time.monotonic() - started
    assert count == 40
    assert hook.api.retries["HTTP 429"] >= 1
    assert elapsed >= hook.api.waited > 0  # really waited the Retry-After it was given


def test_throttling_beyond_the_budget_is_a_typed_error(dv, dyn_hook, dyn_conn):
    dv.configure_limits(requests=1, window_seconds=600)
    hook = DynamicsHook(retry_policy=RetryPolicy(max_attempts=3, max_retry_after=5))
    hook.whoami()
    with pytest.raises(ThrottledError) as err:
        hook.whoami()
    assert err.value.code == "0x80072322" and err.value.retry_after and err.value.retry_after > 5


def test_5xx_and_dropped_connections_are_retried(dv, dyn_hook, dyn_conn):
    from cosell_sandbox.server import FaultConfig

    make_accounts(dyn_hook, 60)
    dv.faults.configure(
        FaultConfig(seed=3, rate_5xx=0.3, status_5xx=502, drop_rate=0.1, path_prefix="/api/data/v9.2/accounts")
    )
    hook = DynamicsHook(retry_policy=RetryPolicy(max_attempts=8, backoff_base=0.01, backoff_max=0.05))
    assert len(list(hook.query("accounts", select=["name"], page_size=10))) == 60
    injected = dv.faults.injected
    assert injected["5xx"] + injected["drop"] >= 1
    assert hook.api.retries["HTTP 502"] == injected["5xx"]


def test_parallel_requests_follow_the_orgs_dop_hint(dv, dyn_hook, monkeypatch):
    """Dataverse tells each client how many requests to send at once (``x-ms-dop-hint``); the
    hook reads it from every answer and never sends more at once than it says (nor more than
    the 52 concurrent requests the service protection limits allow)."""
    import threading

    from cosell_sandbox.server import FaultConfig
    from cosell_sync.hooks.dynamics365 import DEFAULT_PARALLELISM, MAX_CONCURRENT

    hint = {"value": "3"}
    decorate = dv.decorate

    def with_hint(request, response):
        decorate(request, response)
        response.headers.set("x-ms-dop-hint", hint["value"])

    in_flight, peak, lock = [0], [0], threading.Lock()
    dispatch = dv.dispatch

    def counting(request):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return dispatch(request)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(dv, "decorate", with_hint)
    monkeypatch.setattr(dv, "dispatch", counting)
    ids = make_accounts(dyn_hook, 12)
    assert dyn_hook.dop_hint == 3 and dyn_hook.parallelism == 3
    dv.faults.configure(FaultConfig(latency_ms=(150, 150), path_prefix="/api/data/v9.2/accounts("))
    peak[0] = 0
    names = dyn_hook.map_concurrently(lambda i: dyn_hook.get("accounts", i, select=["name"])["name"], ids)
    assert names == [f"Account {i:05d}" for i in range(12)]  # in the order asked
    assert peak[0] == 3  # as many at once as the hint says, no more
    hint["value"] = "500"
    dyn_hook.whoami()
    assert dyn_hook.parallelism == MAX_CONCURRENT == 52
    assert DynamicsHook().parallelism == DEFAULT_PARALLELISM  # no answer yet: a modest default
