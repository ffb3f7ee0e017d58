"""Batch isolation (issue 12): one poisoned record in a batch of 200 costs only that record,
on Salesforce (sObject Collections and Bulk API 2.0) and on Dataverse (``$batch``), through
the sides, the real hooks and the emulators.

Two kinds of poison: a value that cannot even be encoded as JSON (``Infinity``, placed in the
side's input so it reaches the write), and a record the service rejects for the whole call
(a hook method wrapped to fail any call that holds the poisoned value). The 199 others are
written exactly once each; the poisoned one fails with a per-record error; the calls stay
bounded (about 2·log2(n) extra for one bad record, logged)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pytest

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.normalize import referrals_frame
from cosell_sync.errors import ServerError, TransportError, ValidationError
from cosell_sync.hooks.batch import BatchRequest
from cosell_sync.sides.base import RunContext
from cosell_sync.sides.crm import Pending
from cosell_sync.sides.dynamics365 import DynamicsSide
from cosell_sync.sides.salesforce import CREATE_ATTEMPTS, SalesforceSide

log = logging.getLogger(__name__)
N = 200
BAD = 137  # the poisoned row
POISON_AMOUNT = 31337.25
POISON_NAME = "Poisoned Customer Ltd"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SF_MAP = load_mapping("salesforce")
DV_MAP = load_mapping("dynamics365")
# One bad record among n: a failed call per level of halving, two calls per level.
BOUND = 2 * math.ceil(math.log2(N)) + 2


def ctx(crm: str) -> RunContext:
    return RunContext(dag_id=f"cosell_sync_{crm}", run_id="manual__isolation", now=NOW)


def referral(i: int) -> dict[str, Any]:
    rid = f"iso-{i:03d}"
    return {
        "id": rid,
        "name": f"Deal {rid}",
        "status": "New",
        "substatus": "Pending",
        "direction": "Incoming",
        "updatedDateTime": "2026-10-31T10:00:00Z",
        "salesStage": "Develop",
        "customerProfile": {
            "name": f"Customer {i:03d}",
            "address": {"country": "US", "postalCode": "98052", "city": "Redmond", "addressLine1": "1 Way"},
            "team": [{"firstName": "Ada", "lastName": f"Buyer {i:03d}", "email": f"buyer.{i:03d}@example.com"}],
        },
        "details": {
            "dealValue": 1000 + i,
            "currency": "USD",
            "closingDateTime": "2027-01-31T00:00:00Z",
            "notes": "hello",
            "requirements": {"solutions": [{"id": "SOL-1"}]},
        },
        "inviteContext": {"assistanceRequestCode": "QuotesOrLicensing"},
    }


def creates(mapping: Any, **poison: Any) -> pd.DataFrame:
    """200 valid referrals as the side's ``creates`` input; ``poison`` overwrites row BAD's
    canonical values after validation (so it reaches the write)."""
    normalized = referrals_frame([referral(i) for i in range(N)], mapping)
    assert normalized.errors.empty, normalized.errors.to_dict("records")
    frame = normalized.frame[["referral_id", *mapping.fields]].copy()
    for column, value in poison.items():
        frame[column] = frame[column].astype(object)
        frame.at[BAD, column] = value
    return frame


def rid(i: int) -> str:
    return f"iso-{i:03d}"


def check_only_the_poisoned_row_failed(results: list[Any], *words: str) -> None:
    assert len(results) == N
    failed = [r for r in results if not r.ok]
    assert [r.key for r in failed] == [rid(BAD)], [(r.key, r.error) for r in failed[:5]]
    [bad] = failed
    assert bad.referral_id == rid(BAD) and bad.error
    for word in words:
        assert word in bad.error, bad.error


# -- Salesforce -----------------------------------------------------------------------------------------------
@pytest.fixture
def sf(pc):
    return pc.salesforce


@pytest.fixture
def sf_side(sf_hook):
    return SalesforceSide(sf_hook, SF_MAP)


class SfCalls:
    """Wraps the hook's write methods: every call's sobject and records, and which succeeded;
    a call holding the poison raises ``error`` when one is set."""

    def __init__(self, hook: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, list[dict[str, Any]], bool]] = []
        self.error: Exception | None = None
        self.poisoned = lambda record: False
        for name in ("create_records", "update_records", "upsert_records"):
            monkeypatch.setattr(hook, name, self._wrap(name, getattr(hook, name)))

    def _wrap(self, name: str, real: Any) -> Any:
        def call(sobject: str, *args: Any, **kwargs: Any) -> Any:
            records = list(args[-1])
            if self.error is not None and any(self.poisoned(r) for r in records):
                self.calls.append((name, sobject, records, False))
                raise self.error
            try:
                answer = real(sobject, *args, **kwargs)
            except Exception:
                self.calls.append((name, sobject, records, False))
                raise
            self.calls.append((name, sobject, records, True))
            return answer

        return call

    def of(self, name: str, sobject: str) -> list[tuple[list[dict[str, Any]], bool]]:
        return [(records, ok) for n, s, records, ok in self.calls if n == name and s == sobject]


def opportunities_by_referral(sf: Any) -> Counter[str]:
    return Counter(o["PC_Referral_Id__c"] for o in sf.list_records("Opportunity"))


def test_salesforce_unencodable_amount_costs_only_its_record(sf, sf_side, sf_hook, monkeypatch):
    spy = SfCalls(sf_hook, monkeypatch)
    results = sf_side.create(creates(SF_MAP, deal_value=float("inf")), ctx("salesforce"))

    check_only_the_poisoned_row_failed(results, "Amount", "JSON")
    assert opportunities_by_referral(sf) == Counter({rid(i): 1 for i in range(N) if i != BAD})
    upserts = spy.of("upsert_records", "Opportunity")
    log.info("Salesforce Infinity: %d Opportunity upsert call(s)", len(upserts))
    assert len(upserts) <= BOUND


@pytest.mark.parametrize(
    ("column", "value", "method", "sobject"),
    [
        ("deal_value", POISON_AMOUNT, "upsert_records", "Opportunity"),
        ("customer_name", POISON_NAME, "create_records", "Account"),
    ],
)
def test_salesforce_call_rejected_as_a_whole_is_split(
    sf, sf_side, sf_hook, monkeypatch, column, value, method, sobject
):
    spy = SfCalls(sf_hook, monkeypatch)
    spy.poisoned = lambda r: r.get("Amount") == POISON_AMOUNT or r.get("Name") == POISON_NAME
    spy.error = ValidationError("Salesforce", "JSON_PARSER_ERROR: poisoned", status=400, code="JSON_PARSER_ERROR")

    results = sf_side.create(creates(SF_MAP, **{column: value}), ctx("salesforce"))

    check_only_the_poisoned_row_failed(results, "poisoned")
    assert results[BAD].error_code == "JSON_PARSER_ERROR"
    assert opportunities_by_referral(sf) == Counter({rid(i): 1 for i in range(N) if i != BAD})
    calls = spy.of(method, sobject)
    written = Counter(json.dumps(r, sort_keys=True, default=str) for records, ok in calls if ok for r in records)
    assert set(written.values()) == {1} and len(written) == N - 1  # each good record sent in one successful call
    log.info("Salesforce whole-call 400 on %s: %d %s call(s)", sobject, len(calls), method)
    assert len(calls) <= BOUND and sum(1 for _, ok in calls if not ok) > 1  # it was split


def test_salesforce_create_is_not_split_after_a_lost_answer(sf, sf_side, sf_hook, monkeypatch):
    spy = SfCalls(sf_hook, monkeypatch)
    spy.poisoned = lambda r: r.get("Name") == POISON_NAME
    spy.error = TransportError("Salesforce", "connection failed: ConnectionError", method="POST")

    results = sf_side.create(creates(SF_MAP, customer_name=POISON_NAME), ctx("salesforce"))

    # The accounts may have been created before the answer was lost: the call is never split, and
    # it is sent again (CREATE_ATTEMPTS calls in all) only for the accounts a new lookup does not find.
    calls = spy.of("create_records", "Account")
    assert len(calls) == CREATE_ATTEMPTS and all(records == calls[0][0] for records, _ in calls)
    assert not any(r.ok for r in results) and all("connection failed" in (r.error or "") for r in results)
    assert sf.list_records("Opportunity") == []


def test_salesforce_out_of_range_amount_is_answered_per_record(sf, sf_side, sf_hook, monkeypatch):
    spy = SfCalls(sf_hook, monkeypatch)
    results = sf_side.create(creates(SF_MAP, deal_value=1e300), ctx("salesforce"))

    check_only_the_poisoned_row_failed(results, "Amount")
    assert results[BAD].error_code == "NUMBER_OUTSIDE_VALID_RANGE"
    assert opportunities_by_referral(sf) == Counter({rid(i): 1 for i in range(N) if i != BAD})
    assert [ok for _, ok in spy.of("upsert_records", "Opportunity")] == [True]  # one call, answered per record


def test_salesforce_bulk_update_rejected_as_a_whole_is_split(sf, sf_side, sf_hook, monkeypatch):
    created = sf_side.create(creates(SF_MAP), ctx("salesforce"))
    assert all(r.ok for r in created)
    sf_hook.bulk_threshold = 50  # 200 updates go as a Bulk API 2.0 job, halves of 100 too
    paths: list[tuple[str, int, bool]] = []
    real_bulk, real_collections = sf_hook._bulk, sf_hook._collections

    def poisoned(records: Any) -> bool:
        return any(r.get("Amount") == POISON_AMOUNT for r in records)

    def bulk(operation, sobject, records, key):
        if poisoned(records):
            paths.append(("bulk", len(records), False))
            raise ServerError("Salesforce", "bulk update Opportunity: job failed", status=500, code="UNKNOWN_EXCEPTION")
        paths.append(("bulk", len(records), True))
        return real_bulk(operation, sobject, records, key)

    def collections(method, path, sobject, records, all_or_none):
        if poisoned(records):
            paths.append(("collections", len(records), False))
            raise ServerError("Salesforce", "PATCH composite/sobjects: failed", status=500, code="UNKNOWN_EXCEPTION")
        paths.append(("collections", len(records), True))
        return real_collections(method, path, sobject, records, all_or_none)

    monkeypatch.setattr(sf_hook, "_bulk", bulk)
    monkeypatch.setattr(sf_hook, "_collections", collections)
    rows = pd.DataFrame(
        [
            {
                "crm_id": r.crm_id,
                "referral_id": r.key,
                "fields": {"deal_value": POISON_AMOUNT if r.key == rid(BAD) else 5000.0 + i},
            }
            for i, r in enumerate(created)
        ],
        columns=["crm_id", "referral_id", "fields"],
    )
    later = RunContext(dag_id="cosell_sync_salesforce", run_id="manual__isolation2", now=NOW.replace(hour=13))
    results = sf_side.update(rows, later)

    check_only_the_poisoned_row_failed(results, "UNKNOWN_EXCEPTION")
    amounts = {o["PC_Referral_Id__c"]: o["Amount"] for o in sf.list_records("Opportunity")}
    assert all(amounts[rid(i)] == 5000.0 + i for i in range(N) if i != BAD)
    assert amounts[rid(BAD)] == 1000 + BAD
    log.info("Salesforce bulk update split: %s", paths)
    assert paths[0] == ("bulk", N, False) and any(p[0] == "bulk" and p[2] for p in paths)
    assert len(paths) <= BOUND + 8  # halves under the bulk threshold go out as collections of at most 200


# -- Dataverse ------------------------------------------------------------------------------------------------
@pytest.fixture
def dv(pc):
    return pc.dynamics365


@pytest.fixture
def dv_side(dyn_hook):
    return DynamicsSide(dyn_hook, DV_MAP)


class DvCalls:
    """Wraps ``hook.batch``: every call's requests, and which succeeded; a call holding the
    poison raises ``error`` when one is set."""

    def __init__(self, hook: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[BatchRequest], bool]] = []
        self.error: Exception | None = None
        self.poisoned = lambda request: False
        real = hook.batch

        def batch(items, **kwargs):
            items = list(items)
            if self.error is not None and any(self.poisoned(r) for r in items):
                self.calls.append((items, False))
                raise self.error
            answer = real(items, **kwargs)
            self.calls.append((items, True))
            return answer

        monkeypatch.setattr(hook, "batch", batch)


def dv_opportunities(dv: Any) -> Counter[str]:
    return Counter(row["cosell_referralid"] for row in dv.rows("opportunities") if row.get("cosell_referralid"))


def body_has(request: BatchRequest, value: Any) -> bool:
    return request.body is not None and value in request.body.values()


def test_dataverse_unencodable_amount_costs_only_its_record(dv, dv_side, monkeypatch):
    spy = DvCalls(dv_side.hook, monkeypatch)
    results = dv_side.create(creates(DV_MAP, deal_value=float("inf")), ctx("dynamics365"))

    check_only_the_poisoned_row_failed(results, "deal_value")
    assert dv_opportunities(dv) == Counter({rid(i): 1 for i in range(N) if i != BAD})
    sent = [r for items, _ in spy.calls for r in items if r.body]
    assert not any(
        isinstance(v, float) and not math.isfinite(v) for r in sent for v in (r.body or {}).values()
    )  # never sent as non-standard JSON
    log.info("Dataverse Infinity: %d $batch call(s)", len(spy.calls))


@pytest.mark.parametrize(
    ("column", "value", "method"),
    [("deal_value", POISON_AMOUNT, "PATCH"), ("customer_name", POISON_NAME, "POST")],
)
def test_dataverse_batch_rejected_as_a_whole_is_split(dv, dv_side, monkeypatch, column, value, method):
    spy = DvCalls(dv_side.hook, monkeypatch)
    spy.poisoned = lambda r: body_has(r, POISON_AMOUNT) or body_has(r, POISON_NAME)
    spy.error = ValidationError("Dataverse", "0x80048d19: poisoned payload", status=400, code="0x80048d19")

    results = dv_side.create(creates(DV_MAP, **{column: value}), ctx("dynamics365"))

    check_only_the_poisoned_row_failed(results, "poisoned")
    assert dv_opportunities(dv) == Counter({rid(i): 1 for i in range(N) if i != BAD})
    if method == "POST":
        names = Counter(row["name"] for row in dv.rows("accounts"))
        assert POISON_NAME not in names and set(names.values()) == {1}
    poisoned_calls = [ok for items, ok in spy.calls if any(r.method == method and body_has(r, value) for r in items)]
    sent_ok = Counter(
        json.dumps(r.body, sort_keys=True, default=str)
        for items, ok in spy.calls
        if ok
        for r in items
        if r.method == method and r.body
    )
    assert set(sent_ok.values()) == {1}  # no good request sent twice
    log.info("Dataverse whole-call 400 on %s: %d $batch call(s) in all", method, len(spy.calls))
    assert 1 < len(poisoned_calls) <= BOUND and not any(poisoned_calls)


def test_dataverse_create_is_not_split_after_a_lost_answer(dv, dv_side, monkeypatch):
    spy = DvCalls(dv_side.hook, monkeypatch)
    spy.poisoned = lambda r: body_has(r, POISON_NAME)
    spy.error = TransportError("Dataverse", "connection failed: ConnectionError", method="POST")

    results = dv_side.create(creates(DV_MAP, customer_name=POISON_NAME), ctx("dynamics365"))

    assert sum(1 for items, _ in spy.calls if any(body_has(r, POISON_NAME) for r in items)) == 1
    assert not any(r.ok for r in results)
    assert dv_opportunities(dv) == Counter()


def test_dataverse_unencodable_body_fails_alone_before_any_call(dv, dv_side, monkeypatch):
    """Past the side's own checks: a body holding ``Infinity`` reaching ``$batch`` fails its
    record, naming the field, and is never sent (Python's json would write non-standard JSON)."""
    spy = DvCalls(dv_side.hook, monkeypatch)
    rows = [Pending(pos=i, key=f"acct-{i:03d}", referral_id=None, crm_id=None, values={}) for i in range(N)]
    items = [(row, BatchRequest("POST", "accounts", {"name": f"Isolated {i:03d}"})) for i, row in enumerate(rows)]
    items[BAD] = (rows[BAD], BatchRequest("POST", "accounts", {"name": "Isolated bad", "address1_city": float("nan")}))
    answered: list[int] = []

    def on_response(row: Pending, response: Any) -> None:
        if response.ok:
            answered.append(row.pos)
        else:
            row.fail(str(response.error_message), response.error_code)

    dv_side._run_batch(items, on_response, lambda row, message, code: row.fail(message, code))

    assert [r.key for r in rows if not r.ok] == [f"acct-{BAD:03d}"], [r.error for r in rows[:2]]
    message, code = rows[BAD].error or ("", None)
    assert "address1_city" in message and "JSON" in message and code == "JSON_SERIALIZATION"
    assert sorted(answered) == [i for i in range(N) if i != BAD]
    assert [len(items) for items, _ in spy.calls] == [N - 1]
    names = Counter(row["name"] for row in dv.rows("accounts"))
    assert "Isolated bad" not in names and len(names) == N - 1 and set(names.values()) == {1}


def test_salesforce_bulk_job_answers_out_of_range_amount_per_record(sf, sf_side, sf_hook):
    created = sf_side.create(creates(SF_MAP), ctx("salesforce"))
    assert all(r.ok for r in created)
    sf_hook.bulk_threshold = 50
    rows = pd.DataFrame(
        [
            {"crm_id": r.crm_id, "referral_id": r.key, "fields": {"deal_value": 1e300 if r.key == rid(BAD) else 7.0}}
            for r in created
        ],
        columns=["crm_id", "referral_id", "fields"],
    )
    later = RunContext(dag_id="cosell_sync_salesforce", run_id="manual__isolation3", now=NOW.replace(hour=13))
    results = sf_side.update(rows, later)

    check_only_the_poisoned_row_failed(results, "Amount")
    assert results[BAD].error_code == "NUMBER_OUTSIDE_VALID_RANGE"
    assert len(sf.bulk.jobs) == 1  # one job, answered per record
    assert sorted({o["Amount"] for o in sf.list_records("Opportunity")}) == [7.0, 1000.0 + BAD]
