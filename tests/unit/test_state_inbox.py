"""The state DB's webhook inbox: migration v2, dedup on insert, claim / done / release, concurrency.

Each test runs on SQLite and on PostgreSQL (a fresh database per test; tests/unit/conftest.py),
without Airflow.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from cosell_sync.state import SCHEMA_VERSION, StateStore
from cosell_sync.state import inbox as inbox_module
from cosell_sync.state import schema as schema_module

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _event(i: int, **kw: object) -> dict:
    event = {
        "dedup_key": f"{i:064x}",
        "event_name": "referral-updated",
        "referral_id": f"ref-{i}",
        "resource_uri": f"https://api.partnercenter.microsoft.com/engagements/v1/referrals/ref-{i}",
        "change_date": T0 + timedelta(seconds=i),
    }
    event.update(kw)
    return event


def test_a_v1_database_is_upgraded_to_the_inbox_and_keeps_its_data(db_url: str, monkeypatch: pytest.MonkeyPatch):
    with StateStore(db_url) as st:
        with monkeypatch.context() as m:
            m.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:1])
            m.setattr(schema_module, "SCHEMA_VERSION", 1)
            assert st.migrate() == 1
        assert "cosell_inbox" not in sa.inspect(st.engine).get_table_names()
        links = pd.DataFrame([{"referral_id": "R1", "crm_id": "C1", "base": {"name": "deal"}}])
        st.upsert_links("salesforce", links, "run-1")

        assert st.migrate() == SCHEMA_VERSION
        assert st.migrate() == SCHEMA_VERSION
        inspector = sa.inspect(st.engine)
        assert "cosell_inbox" in inspector.get_table_names()
        indexes = {tuple(ix["column_names"]): ix["unique"] for ix in inspector.get_indexes("cosell_inbox")}
        assert indexes[("dedup_key",)]
        assert ("status", "id") in indexes
        assert st.get_links("salesforce")["referral_id"].tolist() == ["R1"]
        assert st.inbox_counts() == {"pending": 0, "claimed": 0, "done": 0}


def test_inbox_add_stores_each_event_once(store: StateStore):
    assert store.inbox_add([]) == []
    assert store.inbox_add([_event(1), _event(2), _event(1)]) == [True, True, False]
    assert store.inbox_add([_event(2, referral_id="other")]) == [False]  # the key decides, not the content
    rows = store.inbox_pending()
    assert [r["referral_id"] for r in rows] == ["ref-1", "ref-2"]
    first = rows[0]
    assert set(first) == set(inbox_module.INBOX_COLUMNS)
    assert first["status"] == "pending" and first["attempts"] == 0
    assert first["claimed_by"] is None and first["claimed_at"] is None and first["done_at"] is None
    assert first["change_date"] == T0 + timedelta(seconds=1)
    assert first["received_at"].tzinfo is not None
    assert abs(first["received_at"] - datetime.now(UTC)) < timedelta(minutes=1)
    assert store.inbox_counts() == {"pending": 2, "claimed": 0, "done": 0}


def test_inbox_add_accepts_a_missing_change_date_and_validates_the_rest(store: StateStore):
    assert store.inbox_add([_event(1, change_date=None)]) == [True]
    assert store.inbox_pending()[0]["change_date"] is None
    with pytest.raises(ValueError, match="referral_id is required"):
        store.inbox_add([_event(2, referral_id="")])
    with pytest.raises(ValueError, match="dedup_key must be at most 64"):
        store.inbox_add([_event(3, dedup_key="x" * 65)])
    with pytest.raises(ValueError, match="timezone-aware"):
        store.inbox_add([_event(4, change_date=datetime(2025, 1, 1))])  # naive on purpose
    # a failing batch stores nothing
    with pytest.raises(ValueError):
        store.inbox_add([_event(5), _event(6, event_name=None)])
    assert store.inbox_counts()["pending"] == 1


def test_inbox_pending_is_oldest_first_with_a_limit(store: StateStore):
    store.inbox_add([_event(i) for i in (5, 3, 9)])
    assert [r["referral_id"] for r in store.inbox_pending(limit=2)] == ["ref-5", "ref-3"]


def test_claim_done_and_counts(store: StateStore):
    store.inbox_add([_event(i) for i in range(5)])
    claimed = store.inbox_claim("run-a", limit=3)
    assert [r["referral_id"] for r in claimed] == ["ref-0", "ref-1", "ref-2"]
    assert {r["status"] for r in claimed} == {"claimed"}
    assert {r["claimed_by"] for r in claimed} == {"run-a"}
    assert all(r["attempts"] == 1 and r["claimed_at"] is not None for r in claimed)
    assert [r["referral_id"] for r in store.inbox_pending()] == ["ref-3", "ref-4"]

    other = store.inbox_claim("run-b")
    assert [r["referral_id"] for r in other] == ["ref-3", "ref-4"]
    assert store.inbox_claim("run-c") == []
    assert store.inbox_counts() == {"pending": 0, "claimed": 5, "done": 0}

    ids_a = [r["id"] for r in claimed]
    assert store.inbox_done("run-b", ids_a) == 0  # not run-b's rows
    assert store.inbox_done("run-a", ids_a[:2]) == 2
    assert store.inbox_done("run-a", ids_a[:2]) == 0  # already done
    assert store.inbox_done("run-b") == 2  # everything run-b holds
    assert store.inbox_counts() == {"pending": 0, "claimed": 1, "done": 4}
    done = [r for r in store.inbox_claim("run-a") if r["id"] in ids_a]  # run-a's retry gets its open row again
    assert [r["referral_id"] for r in done] == ["ref-2"] and done[0]["attempts"] == 2

    # a redelivery of a done event is still a duplicate
    assert store.inbox_add([_event(0)]) == [False]


def test_release_hands_rows_back_and_a_stale_claim_is_taken_over(store: StateStore):
    store.inbox_add([_event(i) for i in range(3)])
    store.inbox_claim("run-a")
    assert store.inbox_release("run-b") == 0
    assert store.inbox_release("run-a") == 3
    rows = store.inbox_pending()
    assert len(rows) == 3 and {r["claimed_by"] for r in rows} == {None} and {r["attempts"] for r in rows} == {1}

    store.inbox_claim("run-dead")
    assert store.inbox_claim("run-b") == []  # a fresh claim is respected
    taken = store.inbox_claim("run-b", stale_after=timedelta(0))
    assert len(taken) == 3 and {r["claimed_by"] for r in taken} == {"run-b"} and {r["attempts"] for r in taken} == {3}
    assert store.inbox_done("run-dead") == 0
    assert store.inbox_done("run-b") == 3


def test_claim_requires_a_run_id(store: StateStore):
    with pytest.raises(ValueError, match="run_id is required"):
        store.inbox_claim("")


def test_concurrent_claims_never_share_a_row(db_url: str):
    with StateStore(db_url) as st:
        st.migrate()
        st.inbox_add([_event(i) for i in range(120)])
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        run_id = f"run-{n}"
        try:
            with StateStore(db_url) as st:
                barrier.wait(timeout=30)
                got: list[int] = []
                while batch := st.inbox_claim(run_id, limit=7):
                    got.extend(r["id"] for r in batch)
                    st.inbox_done(run_id, [r["id"] for r in batch])
                claims[run_id] = got
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    all_ids = [i for ids in claims.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 120
    with StateStore(db_url) as st:
        assert st.inbox_counts() == {"pending": 0, "claimed": 0, "done": 120}


def test_concurrent_adds_of_one_event_insert_it_once(db_url: str):
    with StateStore(db_url) as st:
        st.migrate()
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        with StateStore(db_url) as st:
            barrier.wait(timeout=30)
            results.extend(st.inbox_add([_event(42)]))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False] * 5 + [True]
