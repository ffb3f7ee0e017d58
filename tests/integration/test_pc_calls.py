"""Partner Center calls in a first sync (issue 16): no engagement read before asking Microsoft in
an engagement this very call opened, engagements taken from the list on a full read, and the
bounded, configurable write concurrency."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.sides.base import RunContext
from cosell_sync.sides.partner_center import LOOKUP_CHUNK, MAX_WORKERS, PartnerCenterSide, microsoft_side
from tests.integration.test_sync_partner_center_side import crm_row

MAPPING = load_mapping("salesforce")
LIST = "/v1.0/engagements/referrals"


def _ctx() -> RunContext:
    return RunContext(dag_id="cosell_sync_salesforce", run_id="manual__calls")


def _side(**kw) -> PartnerCenterSide:
    return PartnerCenterSide(PartnerCenterHook(sleep=lambda _s: None), MAPPING, **kw)


def _lists(pc) -> list:
    return [r for r in pc.partner_center.requests_matching("GET") if r.path == LIST]


def _engagement_lookups(pc) -> list:
    return [r for r in _lists(pc) if "engagementId" in r.target]


def _asks(pc) -> list:
    return [d for d in pc.partner_center.referrals.values() if microsoft_side(d)]


def test_first_sync_asks_microsoft_without_reading_the_new_engagement(pc, pc_conn):
    n = 2 * LOOKUP_CHUNK + 3
    rows = pd.DataFrame([crm_row(f"006COSELL{i:03d}") for i in range(n)])
    pc.partner_center.log.clear()
    results = _side().create(rows, _ctx())
    assert all(r.ok and r.asked_microsoft and not r.adopted for r in results), results
    # The only list queries: the lookups by externalReferenceId before the creates (none per engagement).
    assert len(_lists(pc)) == -(-n // LOOKUP_CHUNK) and not _engagement_lookups(pc)
    assert len(pc.partner_center.requests_matching("POST", LIST)) == 2 * n
    assert len(_asks(pc)) == n and len({d["engagementId"] for d in _asks(pc)}) == n
    # Each result holds Microsoft's side as requested (the link's first base), as before.
    assert {r.fields.get("microsoft_status") for r in results} == {"requested"}, results[0].fields

    # A retry (the referrals are adopted): each engagement is read before asking, nothing is asked again.
    pc.partner_center.log.clear()
    again = _side().create(rows, _ctx())
    assert all(r.ok and r.adopted and not r.asked_microsoft for r in again)
    assert len(_engagement_lookups(pc)) == n and not pc.partner_center.requests_matching("POST")
    assert len(_asks(pc)) == n
    assert [r.fields for r in again] == [r.fields for r in results]


def test_a_lost_answer_to_the_request_to_microsoft_is_looked_up_before_sending_again(pc, pc_conn):
    # One row: the first POST creates the referral, the second asks Microsoft; its answer is lost.
    pc.partner_center.faults.configure(FaultConfig(drop_after_rate=1.0, max_faults=1, methods=("POST",), after=1))
    pc.partner_center.log.clear()
    [result] = _side().create(pd.DataFrame([crm_row("006LOST")]), _ctx())
    assert pc.partner_center.faults.injected["drop_after"] == 1
    assert result.ok and result.asked_microsoft, result
    assert len(_asks(pc)) == 1  # not asked twice
    assert len(_engagement_lookups(pc)) == 1  # the lookup before the retry, none before the first try
    assert len(pc.partner_center.requests_matching("POST", LIST)) == 2


def _engagements(docs) -> dict[str, object]:
    return {d["id"]: d.get("_engagement") for d in docs}


def test_a_full_read_takes_the_engagements_from_the_list(pc, pc_conn):
    pc.partner_center.seed(30, seed=5)
    side = _side()
    rows = [crm_row(f"006FULL{i:02d}") for i in range(5)] + [crm_row("006FULLIND", help_code=None)]
    side.create(pd.DataFrame(rows), _ctx())

    pc.partner_center.log.clear()
    docs = side.extract()
    assert len(_lists(pc)) == 1 and not _engagement_lookups(pc)  # the one page, no engagement query
    assert not any(microsoft_side(d) for d in docs)
    queried = side.with_engagements([{k: v for k, v in d.items() if k != "_engagement"} for d in docs])
    assert _engagements(docs) == _engagements(queried)  # the same as read engagement by engagement
    assert sum(1 for d in docs if d.get("_engagement")) == 5


def test_an_incremental_read_queries_only_the_engagements_not_in_the_list(pc, pc_conn):
    side = _side()
    created = side.create(pd.DataFrame([crm_row(f"006INC{i}") for i in range(3)]), _ctx())
    time.sleep(1.1)  # the window's bounds are whole seconds apart from the creates
    since = datetime.now(UTC) - timedelta(milliseconds=50)
    time.sleep(1.1)
    moved = created[0].referral_id
    doc = side.hook.get_referral(moved)
    side.hook.patch_referral(moved, [{"op": "replace", "path": "/details/notes", "value": "x"}], etag=doc["eTag"])

    pc.partner_center.log.clear()
    docs = side.extract(since=since)
    assert [d["id"] for d in docs] == [moved]
    assert len(_engagement_lookups(pc)) == 1  # its engagement: Microsoft's side did not move
    assert docs[0]["_engagement"]["microsoft"]["status"] == "New"


def test_partner_center_max_workers_is_a_bounded_setting(monkeypatch):
    hook = object.__new__(PartnerCenterHook)
    monkeypatch.delenv("AIRFLOW__COSELL__PARTNER_CENTER_MAX_WORKERS", raising=False)
    assert PartnerCenterSide(hook, MAPPING).max_workers == MAX_WORKERS == 32
    monkeypatch.setenv("AIRFLOW__COSELL__PARTNER_CENTER_MAX_WORKERS", "12")
    assert PartnerCenterSide(hook, MAPPING).max_workers == 12
    assert PartnerCenterSide(hook, MAPPING, max_workers=3).max_workers == 3
    for bad in ("0", "65", "many"):
        monkeypatch.setenv("AIRFLOW__COSELL__PARTNER_CENTER_MAX_WORKERS", bad)
        with pytest.raises(ConfigurationError, match="partner_center_max_workers"):
            PartnerCenterSide(hook, MAPPING)


def test_writes_run_on_the_configured_threads_and_back_off_on_429(pc, pc_conn, monkeypatch):
    monkeypatch.setenv("AIRFLOW__COSELL__PARTNER_CENTER_MAX_WORKERS", "16")
    seeded = [pc.partner_center.referrals[i] for i in pc.partner_center.seed(60, seed=8)]
    docs = [d for d in seeded if d["status"] != "Closed"][:40]
    side = _side()
    assert side.max_workers == 16
    pc.partner_center.faults.configure(FaultConfig(rate_429=1.0, max_faults=5, retry_after=0.01, methods=("PATCH",)))
    links = pd.DataFrame({"referral_id": [d["id"] for d in docs], "crm_id": [f"006T{i:03d}" for i in range(len(docs))]})
    results = side.write_links(links, _ctx(), side.current_by_id(side.extract()))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert pc.partner_center.faults.injected["429"] == 5
    held = {d["id"]: d.get("externalReferenceId") for d in pc.partner_center.referrals.values()}
    assert all(held[rid] == crm for rid, crm in zip(links["referral_id"], links["crm_id"], strict=True))
