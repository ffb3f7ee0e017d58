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
    return pc.dataverse


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
