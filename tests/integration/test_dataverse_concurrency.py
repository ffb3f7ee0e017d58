"""Dataverse ``$batch`` chunks go out concurrently (issue 16), as many at once as the org's
``x-ms-dop-hint`` says (at most 52), each split on its own, outcomes told in the requests' order."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.errors import AuthenticationError
from cosell_sync.hooks.batch import BatchRequest
from cosell_sync.sides.crm import Pending
from cosell_sync.sides.dynamics365 import DynamicsSide

N, CHUNK = 60, 10


@pytest.fixture
def dv(pc):
    return pc.dynamics365


@pytest.fixture
def slow(dv, monkeypatch):
    """Every Dataverse request stays in flight 0.2 s longer (so that concurrent ones overlap)."""
    real = dv.protection.leave

    def leave(user: str, entry: list[float], elapsed_ms: float) -> Any:
        time.sleep(0.2)
        return real(user, entry, elapsed_ms)

    monkeypatch.setattr(dv.protection, "leave", leave)


def _items(prefix: str) -> list[tuple[Pending, BatchRequest]]:
    rows = [Pending(pos=i, key=f"{prefix}-{i:03d}", referral_id=None, crm_id=None, values={}) for i in range(N)]
    return [(row, BatchRequest("POST", "accounts", {"name": f"{prefix} {i:03d}"})) for i, row in enumerate(rows)]


def test_batch_chunks_go_out_concurrently_and_answer_in_order(dv, dyn_hook, slow):
    side = DynamicsSide(dyn_hook, load_mapping("dynamics365"))
    side.batch_size = CHUNK
    items = _items("Concurrent")
    answered: list[int] = []
    side._run_batch(items, lambda row, response: answered.append(row.pos) if response.ok else None, lambda *a: None)

    assert answered == list(range(N))  # every request answered, told in their order
    assert dyn_hook.dop_hint == 4  # the emulator's x-ms-dop-hint, read from its answers
    assert dv.protection.peak_inflight > 1  # the chunks overlapped
    names = Counter(row["name"] for row in dv.rows("accounts") if str(row.get("name", "")).startswith("Concurrent"))
    assert len(names) == N and set(names.values()) == {1}


def test_an_error_failing_the_task_is_raised_after_the_other_chunks_are_told(dv, dyn_hook, monkeypatch):
    side = DynamicsSide(dyn_hook, load_mapping("dynamics365"))
    side.batch_size = CHUNK
    items = _items("Refused")
    real = dyn_hook.batch

    def batch(requests, **kwargs):
        requests = list(requests)
        if any(r.body and r.body["name"] == "Refused 025" for r in requests):
            raise AuthenticationError("Dataverse", "token refused", status=401)
        return real(requests, **kwargs)

    monkeypatch.setattr(dyn_hook, "batch", batch)
    answered: list[int] = []
    with pytest.raises(AuthenticationError):
        side._run_batch(items, lambda row, response: answered.append(row.pos), lambda *a: None)
    assert answered == [i for i in range(N) if not 20 <= i < 30]  # the other chunks' outcomes were told


def _pending(crm_ids: list[str]) -> list[Pending]:
    return [Pending(pos=i, key=f"read-{i:03d}", referral_id=None, crm_id=c, values={}) for i, c in enumerate(crm_ids)]


def test_chunked_reads_go_out_concurrently_and_find_every_row(dv, dyn_hook, slow):
    ids = dv.seed(opportunities=24, seed=7)["opportunities"]
    side = DynamicsSide(dyn_hook, load_mapping("dynamics365"))
    side.id_chunk = 4
    dv.log.clear()
    rows = _pending([str(i).lower() for i in ids])
    side.read_current(rows, None)

    assert all(row.ok and row.current and row.current["opportunityid"].lower() == row.crm_id for row in rows)
    reads = [e for e in dv.log if e.method == "GET" and e.path.endswith("/opportunities")]
    assert len(reads) == 6  # one query per chunk of 4 ids
    assert dv.protection.peak_inflight > 1  # the chunks overlapped


def test_lookups_by_referral_id_go_out_concurrently_and_find_every_row(dv, dyn_hook, slow):
    """A load's lookups before its creates (opportunities already holding the referral ids),
    one query per chunk of ids: concurrent, every holder found once, in the rows' order."""
    ids = dv.seed(opportunities=24, seed=11)["opportunities"]
    referral_ids = [f"ref-{n:02d}" for n in range(len(ids))]
    for crm_id, referral_id in zip(ids, referral_ids, strict=True):
        dv.edit("opportunities", str(crm_id), {"cosell_referralid": referral_id})
    side = DynamicsSide(dyn_hook, load_mapping("dynamics365"))
    side.id_chunk = 4
    dv.log.clear()
    records = side.extract(referral_ids=[*referral_ids, "ref-none"])

    assert sorted(r["cosell_referralid"] for r in records) == referral_ids
    reads = [e for e in dv.log if e.method == "GET" and e.path.endswith("/opportunities")]
    assert len(reads) == 7  # one query per chunk of 4 ids (25 ids)
    assert dv.protection.peak_inflight > 1  # the chunks overlapped


def _refusing(dv, dyn_hook, monkeypatch, n: int, bad: int, exc: Exception) -> tuple[DynamicsSide, list[str]]:
    """A side reading ``n`` seeded opportunities 4 ids a query; the query naming the ``bad``-th raises ``exc``."""
    ids = [str(i).lower() for i in dv.seed(opportunities=n, seed=n)["opportunities"]]
    side = DynamicsSide(dyn_hook, load_mapping("dynamics365"))
    side.id_chunk = 4
    real = dyn_hook.query

    def query(entity_set, **kwargs):
        if ids[bad] in (kwargs.get("filter") or ""):
            raise exc
        return real(entity_set, **kwargs)

    monkeypatch.setattr(dyn_hook, "query", query)
    return side, ids


def test_a_failed_chunk_read_fails_its_rows_only(dv, dyn_hook, monkeypatch):
    from cosell_sync.errors import ValidationError

    refused = ValidationError("Dataverse", "the filter was refused", status=400, code="0x80060888")
    side, ids = _refusing(dv, dyn_hook, monkeypatch, 12, 5, refused)
    rows = _pending(ids)
    side.read_current(rows, None)
    assert [row.ok for row in rows] == [True] * 4 + [False] * 4 + [True] * 4
    assert all(row.current for row in rows[:4] + rows[8:])
    assert "the filter was refused" in rows[5].error[0]


def test_a_failed_lookup_read_that_fails_the_task_is_raised(dv, dyn_hook, monkeypatch):
    refused = AuthenticationError("Dataverse", "token refused", status=401)
    side, ids = _refusing(dv, dyn_hook, monkeypatch, 8, 6, refused)
    with pytest.raises(AuthenticationError):
        side.read_current(_pending(ids), None)
