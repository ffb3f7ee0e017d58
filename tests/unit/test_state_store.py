"""The state DB (cosell_sync.state): schema, links, watermarks, audit, dead letter, atomic commits, concurrency.

Every test that takes ``db_url`` or ``store`` runs on SQLite (a file under tmp_path) and on
PostgreSQL (a fresh database of its own): see tests/unit/conftest.py. Tests named ``sqlite_``
check SQLite's own settings; ``postgresql_`` ones check PostgreSQL's. Without Airflow (only the
``from_airflow`` tests import it).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from cosell_sync.state import SCHEMA_VERSION, LinkConflictError, StateStore, sqlalchemy_url_from_connection
from cosell_sync.state import audit as audit_module
from cosell_sync.state import schema as schema_module
from cosell_sync.state import values as values_module
from cosell_sync.state import watermarks as watermarks_module
from tests import services

CRM = "salesforce"
DAG = "cosell_sync_salesforce"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _links(*pairs: tuple[str, str], **base: object) -> pd.DataFrame:
    return pd.DataFrame(
        [{"referral_id": r, "crm_id": c, "base": {"name": f"deal {r}", **base}} for r, c in pairs],
        columns=["referral_id", "crm_id", "base"],
    )


def _audit_entry(i: int = 0, **kw: object) -> dict:
    entry = {
        "dag_id": DAG,
        "run_id": "run-1",
        "crm": CRM,
        "direction": "pc_to_crm",
        "referral_id": f"R{i}",
        "crm_id": f"C{i}",
        "action": "update",
        "field": "amount",
        "old_value": i,
        "new_value": {"amount": i + 1, "currency": "EUR"},
    }
    entry.update(kw)
    return entry


def _count(store: StateStore, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


# --------------------------------------------------------------------------- engine and schema


def test_module_does_not_import_airflow():
    code = "import sys, cosell_sync.state; assert not [m for m in sys.modules if m.split('.')[0] == 'airflow']"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(sqlite_store: StateStore):
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_writes_begin_immediate_and_reads_begin_deferred(sqlite_store: StateStore):
    statements: list[str] = []

    @sa.event.listens_for(sqlite_store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, *args):
        statements.append(statement.strip().upper())

    sqlite_store.set_watermark(DAG, "crm", T0, "run-1")
    assert statements[0] == "BEGIN IMMEDIATE"
    statements.clear()
    sqlite_store.get_watermark(DAG, "crm")
    assert statements[0] == "BEGIN"


def test_sqlite_a_locked_write_is_retried_as_a_whole(sqlite_store: StateStore, monkeypatch: pytest.MonkeyPatch):
    real = audit_module.write_audit
    calls = []

    def flaky(conn, rows):
        real(conn, rows)  # written, then rolled back by the failure below
        calls.append(len(rows))
        if len(calls) == 1:
            raise sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        return len(rows)

    monkeypatch.setattr(audit_module, "write_audit", flaky)
    assert sqlite_store.append_audit([_audit_entry(1), _audit_entry(2)]) == 2
    assert calls == [2, 2]
    assert len(sqlite_store.audit()) == 2


def test_sqlite_a_non_lock_error_is_not_retried(sqlite_store: StateStore, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def broken(conn, rows):
        calls.append(1)
        raise sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(audit_module, "write_audit", broken)
    with pytest.raises(sa.exc.OperationalError, match="disk I/O"):
        sqlite_store.append_audit([_audit_entry(1)])
    assert calls == [1]


def test_migrate_twice_is_a_noop(db_url: str):
    with StateStore(db_url) as st:
        assert st.schema_version() == 0
        assert st.migrate() == SCHEMA_VERSION == 4
        st.upsert_links(CRM, _links(("R1", "C1")), "run-1")
        tables = set(sa.inspect(st.engine).get_table_names())
        assert st.migrate() == SCHEMA_VERSION
        assert set(sa.inspect(st.engine).get_table_names()) == tables
        assert {
            "cosell_schema_version",
            "cosell_links",
            "cosell_watermarks",
            "cosell_audit",
            "cosell_dead_letter",
            "cosell_runs",
            "cosell_inbox",
            "cosell_leases",
        } <= tables
        assert _count(st, schema_module.schema_version_t) == 4
        assert st.get_links(CRM)["referral_id"].tolist() == ["R1"]


def test_migrate_applies_only_the_missing_steps(db_url: str, monkeypatch: pytest.MonkeyPatch):
    applied = []
    nxt = SCHEMA_VERSION + 1
    step = schema_module.Migration(nxt, "test step", lambda conn: applied.append(nxt))
    with StateStore(db_url) as st:
        assert st.migrate() == SCHEMA_VERSION
        monkeypatch.setattr(schema_module, "MIGRATIONS", (*schema_module.MIGRATIONS, step))
        monkeypatch.setattr(schema_module, "SCHEMA_VERSION", nxt)
        assert st.migrate() == nxt
        assert st.migrate() == nxt
        assert applied == [nxt]
        assert st.schema_version() == nxt


def test_a_version_3_database_gets_the_audit_index_of_version_4(db_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:3])
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(
        schema_module.audit_t,
        "indexes",
        {ix for ix in schema_module.audit_t.indexes if ix.name != "ix_cosell_audit_crm_action_at"},
    )
    with StateStore(db_url) as st:
        assert st.migrate() == 3
        st.append_audit([_audit_entry(1)])
    monkeypatch.undo()
    with StateStore(db_url) as st:
        names = {ix["name"] for ix in sa.inspect(st.engine).get_indexes("cosell_audit")}
        assert "ix_cosell_audit_crm_action_at" not in names
        assert st.migrate() == 4
        names = {ix["name"] for ix in sa.inspect(st.engine).get_indexes("cosell_audit")}
        assert "ix_cosell_audit_crm_action_at" in names
        assert len(st.audit()) == 1


def test_indexes(store: StateStore):
    inspector = sa.inspect(store.engine)
    links = {tuple(ix["column_names"]): ix["unique"] for ix in inspector.get_indexes("cosell_links")}
    assert links[("crm", "crm_id")]
    audit = {tuple(ix["column_names"]) for ix in inspector.get_indexes("cosell_audit")}
    assert {("crm", "referral_id"), ("run_id",), ("crm", "action", "at")} <= audit
    pk = inspector.get_pk_constraint("cosell_dead_letter")["constrained_columns"]
    assert pk == ["crm", "direction", "record_key"]


def _migrate_worker(url: str, barrier, results) -> None:
    try:
        st = StateStore(url)
        barrier.wait(timeout=60)
        results.put(("ok", st.migrate()))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def test_migrate_from_several_processes_at_once(db_url: str):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_migrate_worker, args=(db_url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcomes == [("ok", SCHEMA_VERSION)] * 4
    with StateStore(db_url) as st:
        assert st.schema_version() == SCHEMA_VERSION
        assert _count(st, schema_module.schema_version_t) == len(schema_module.MIGRATIONS)
        assert st.upsert_links(CRM, _links(("R1", "C1")), "run-1") == 1


# --------------------------------------------------------------------------- links


def test_hash_values_is_sha256_of_canonical_json():
    values = {"b": 1, "a": {"y": [1, 2], "x": None}, "when": datetime(2025, 1, 2, tzinfo=UTC)}
    expected = '{"a":{"x":null,"y":[1,2]},"b":1,"when":"2025-01-02 00:00:00+00:00"}'
    assert StateStore.hash_values(values) == hashlib.sha256(expected.encode()).hexdigest()
    assert StateStore.hash_values(dict(reversed(list(values.items())))) == StateStore.hash_values(values)
    assert StateStore.hash_values({"b": 2}) != StateStore.hash_values({"b": 1})


def test_links_round_trip(store: StateStore):
    base = {"name": "Contoso", "amount": 1200.5, "stage": "Active", "solutions": ["S1", "S2"], "close": None}
    frame = pd.DataFrame(
        [
            {"referral_id": "R1", "crm_id": "C1", "base": base},
            {"referral_id": "R2", "crm_id": "C2", "base": {"name": "Fabrikam"}, "base_hash": "given-hash"},
        ]
    )
    before = datetime.now(UTC)
    assert store.upsert_links(CRM, frame, "run-1") == 2
    links = store.get_links(CRM)
    assert list(links.columns) == ["referral_id", "crm_id", "base", "base_hash", "synced_at", "run_id"]
    r1 = links.set_index("referral_id").loc["R1"]
    assert r1["crm_id"] == "C1"
    assert r1["base"] == base
    assert r1["base_hash"] == StateStore.hash_values(base)
    assert r1["run_id"] == "run-1"
    assert r1["synced_at"].tzinfo is not None
    assert r1["synced_at"].utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= r1["synced_at"] <= datetime.now(UTC) + timedelta(seconds=1)
    assert links.set_index("referral_id").loc["R2", "base_hash"] == "given-hash"
    assert store.get_links("dynamics365").empty


def test_links_update(store: StateStore):
    store.upsert_links(CRM, _links(("R1", "C1"), ("R2", "C2")), "run-1")
    assert store.upsert_links(CRM, _links(("R1", "C1-new"), stage="Won"), "run-2") == 1
    links = store.get_links(CRM).set_index("referral_id")
    assert len(links) == 2
    assert links.loc["R1", "crm_id"] == "C1-new"
    assert links.loc["R1", "base"] == {"name": "deal R1", "stage": "Won"}
    assert links.loc["R1", "base_hash"] == StateStore.hash_values({"name": "deal R1", "stage": "Won"})
    assert links.loc["R1", "run_id"] == "run-2"
    assert links.loc["R2", "run_id"] == "run-1"
    # C1 is free again, so another referral may take it
    store.upsert_links(CRM, _links(("R3", "C1")), "run-3")
    assert store.get_links(CRM, crm_ids=["C1"])["referral_id"].tolist() == ["R3"]


def test_link_uniqueness_conflict_names_both_ids_and_writes_nothing(store: StateStore):
    store.upsert_links(CRM, _links(("R1", "C1")), "run-1")
    with pytest.raises(ValueError, match=r"'C1'.*'R1'.*'R2'") as info:
        store.upsert_links(CRM, _links(("R9", "C9"), ("R2", "C1")), "run-2")
    assert isinstance(info.value, LinkConflictError)
    assert (info.value.crm_id, info.value.existing_referral_id, info.value.referral_id) == ("C1", "R1", "R2")
    assert store.get_links(CRM)["referral_id"].tolist() == ["R1"]  # R9 did not land either
    with pytest.raises(ValueError, match=r"'C5'.*'R5'.*'R6'"):
        store.upsert_links(CRM, _links(("R5", "C5"), ("R6", "C5")), "run-3")
    assert store.get_links(CRM)["referral_id"].tolist() == ["R1"]
    # the same CRM id under another CRM is not a conflict
    assert store.upsert_links("dynamics365", _links(("R2", "C1")), "run-4") == 1


def test_links_may_swap_crm_records_in_one_batch(store: StateStore):
    store.upsert_links(CRM, _links(("R1", "C1"), ("R2", "C2")), "run-1")
    store.upsert_links(CRM, _links(("R1", "C2"), ("R2", "C1")), "run-2")
    links = store.get_links(CRM)
    assert dict(zip(links["referral_id"], links["crm_id"], strict=True)) == {"R1": "C2", "R2": "C1"}


def test_links_input_is_validated(store: StateStore):
    with pytest.raises(ValueError, match="base"):
        store.upsert_links(CRM, pd.DataFrame([{"referral_id": "R1", "crm_id": "C1"}]), "run-1")
    with pytest.raises(ValueError, match="dict"):
        store.upsert_links(CRM, pd.DataFrame([{"referral_id": "R1", "crm_id": "C1", "base": "x"}]), "run-1")
    with pytest.raises(ValueError, match="crm"):
        store.upsert_links("hubspot", _links(("R1", "C1")), "run-1")
    assert store.get_links(CRM).empty


def test_links_filtering_with_2000_ids(store: StateStore):
    n = 2500
    store.upsert_links(CRM, _links(*[(f"R{i:05d}", f"C{i:05d}") for i in range(n)]), "run-1")
    wanted = [f"R{i:05d}" for i in range(n - 1, 499, -1)]  # 2,000 ids: four IN chunks
    assert len(wanted) == 2000
    by_ref = store.get_links(CRM, referral_ids=[*wanted, "R-unknown"])
    assert sorted(by_ref["referral_id"]) == sorted(wanted)
    by_crm = store.get_links(CRM, crm_ids=(w.replace("R", "C") for w in wanted))
    assert sorted(by_crm["referral_id"]) == sorted(wanted)
    either = store.get_links(CRM, referral_ids=["R00000"], crm_ids=["C00001"])
    assert either["referral_id"].tolist() == ["R00000", "R00001"]
    empty = store.get_links(CRM, referral_ids=[])
    assert empty.empty
    assert list(empty.columns) == ["referral_id", "crm_id", "base", "base_hash", "synced_at", "run_id"]
    assert len(store.get_links(CRM)) == n


def test_delete_links(store: StateStore):
    store.upsert_links(CRM, _links(*[(f"R{i}", f"C{i}") for i in range(1200)]), "run-1")
    assert store.delete_links(CRM, [f"R{i}" for i in range(1, 1200)] + ["R-unknown"]) == 1199
    assert store.get_links(CRM)["referral_id"].tolist() == ["R0"]
    assert store.delete_links(CRM, []) == 0


# --------------------------------------------------------------------------- watermarks


def test_watermarks_never_move_backwards(store: StateStore):
    assert store.get_watermark(DAG, "crm") is None
    assert store.set_watermark(DAG, "crm", T0, "run-1") == T0
    assert store.set_watermark(DAG, "crm", T0 - timedelta(hours=1), "run-2") == T0
    assert store.get_watermark(DAG, "crm") == T0
    later = T0 + timedelta(minutes=5, microseconds=123456)
    assert store.set_watermark(DAG, "crm", later, "run-3") == later
    stored = store.get_watermark(DAG, "crm")
    assert stored == later and stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert store.get_watermark(DAG, "partner_center") is None
    assert store.get_watermark("other_dag", "crm") is None


def test_watermark_allow_backwards(store: StateStore):
    store.set_watermark(DAG, "partner_center", T0, "run-1")
    earlier = T0 - timedelta(days=2)
    assert store.set_watermark(DAG, "partner_center", earlier, "run-2", allow_backwards=True) == earlier
    assert store.get_watermark(DAG, "partner_center") == earlier


def test_watermark_row_says_who_wrote_it_and_when(store: StateStore, monkeypatch: pytest.MonkeyPatch):
    assert store.get_watermark_row("cosell_referral_events", "inbox") is None
    monkeypatch.setattr(values_module, "now", lambda: T0 + timedelta(minutes=5))
    store.set_watermark("cosell_referral_events", "inbox", T0, "triggerer")
    assert store.get_watermark_row("cosell_referral_events", "inbox") == {
        "value": T0,
        "run_id": "triggerer",
        "updated_at": T0 + timedelta(minutes=5),
    }
    store.set_watermark("cosell_referral_events", "inbox", T0 - timedelta(seconds=1), "rearm", allow_backwards=True)
    row = store.get_watermark_row("cosell_referral_events", "inbox")
    assert (row["value"], row["run_id"]) == (T0 - timedelta(seconds=1), "rearm")
    assert row["updated_at"].tzinfo is not None
    with pytest.raises(ValueError, match="side"):
        store.get_watermark_row(DAG, "nowhere")


def test_watermark_rejects_naive_and_converts_to_utc(store: StateStore):
    with pytest.raises(ValueError, match="naive"):
        store.set_watermark(DAG, "crm", datetime(2025, 1, 1, 12, 0), "run-1")
    assert store.get_watermark(DAG, "crm") is None
    plus_two = datetime(2025, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    stored = store.set_watermark(DAG, "crm", plus_two, "run-1")
    assert stored == datetime(2025, 1, 1, 12, 0, tzinfo=UTC) and stored.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="side"):
        store.set_watermark(DAG, "dataverse", T0, "run-1")


# --------------------------------------------------------------------------- audit


def test_audit_append_is_one_bulk_insert(store: StateStore):
    inserts: list[tuple[str, bool]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):
        if "cosell_audit" in statement and statement.lstrip().upper().startswith("INSERT"):
            inserts.append((statement, executemany))

    entries = pd.DataFrame([_audit_entry(i, at=T0 + timedelta(seconds=i)) for i in range(10_000)])
    assert store.append_audit(entries) == 10_000
    # one executemany (SQLite), or SQLAlchemy's batches of 1,000 rows per multi-VALUES statement (PostgreSQL)
    assert inserts and all(many for _, many in inserts)
    assert len(inserts) == (1 if store.dialect == "sqlite" else 10)
    assert _count(store, schema_module.audit_t) == 10_000
    newest = store.audit(limit=3)
    assert newest["referral_id"].tolist() == ["R9999", "R9998", "R9997"]
    assert len(store.audit()) == 1000
    assert len(store.audit(limit=None)) == 10_000


def test_audit_query_newest_first_with_decoded_json(store: StateStore):
    store.append_audit(
        [
            _audit_entry(1, at=T0, action="create", field=None, old_value=None, new_value={"name": "A"}),
            _audit_entry(2, at=T0 + timedelta(hours=1), run_id="run-2", old_value="Active", new_value=["x", 1]),
            _audit_entry(1, at=T0 + timedelta(hours=2), action="conflict", detail="crm wins (authority)"),
        ]
    )
    store.append_audit([_audit_entry(3, crm="dynamics365", action="fail", detail={"code": 400})])  # at = now
    rows = store.audit()
    assert rows["referral_id"].tolist() == ["R3", "R1", "R2", "R1"]
    assert rows["at"].is_monotonic_decreasing
    assert rows["at"].iloc[1] == T0 + timedelta(hours=2)
    by_ref = store.audit(referral_id="R1")
    assert by_ref["action"].tolist() == ["conflict", "create"]
    created = by_ref.iloc[1]
    assert created["new_value"] == {"name": "A"}
    assert created["old_value"] is None and created["field"] is None
    assert by_ref.iloc[0]["detail"] == "crm wins (authority)"
    run2 = store.audit(run_id="run-2").iloc[0]
    assert (run2["old_value"], run2["new_value"]) == ("Active", ["x", 1])
    failed = store.audit(crm="dynamics365", action="fail")
    assert len(failed) == 1 and json.loads(failed.iloc[0]["detail"]) == {"code": 400}
    assert store.audit(crm=CRM, action="fail").empty


def test_audit_entries_are_validated(store: StateStore):
    with pytest.raises(ValueError, match="action"):
        store.append_audit([_audit_entry(1, action="delete")])
    with pytest.raises(ValueError, match="direction"):
        store.append_audit([_audit_entry(1, direction="both")])
    with pytest.raises(ValueError, match="naive"):
        store.append_audit([_audit_entry(1, at=datetime(2025, 1, 1))])
    with pytest.raises(ValueError, match="run_id"):
        store.append_audit([_audit_entry(1, run_id=None)])
    assert store.audit().empty


# --------------------------------------------------------------------------- dead letter


def _failure(key: str, error: str = "400 Bad Request: amount must be positive", **kw: object) -> dict:
    return {"record_key": key, "payload": {"id": key, "amount": -1}, "error": error, **kw}


def test_dead_letter_attempts_first_seen_and_exhaustion(store: StateStore):
    assert store.max_attempts == 3
    first = store.record_failures(CRM, "pc_to_crm", [_failure("R1"), _failure("R2")], "run-1")
    assert list(first.columns) == ["record_key", "attempts", "first_seen", "exhausted"]
    assert first["attempts"].tolist() == [1, 1] and not first["exhausted"].any()
    first_seen = first.set_index("record_key").loc["R1", "first_seen"]
    assert first_seen.tzinfo is not None

    second = store.record_failures(CRM, "pc_to_crm", [_failure("R1", "500 again", error_code="E500")], "run-2")
    assert second["attempts"].tolist() == [2]
    assert second["first_seen"].iloc[0] == first_seen

    retry = store.retryable_failures(CRM, "pc_to_crm").set_index("record_key")
    assert list(retry.reset_index().columns) == [
        "record_key",
        "payload",
        "attempts",
        "first_seen",
        "last_seen",
        "last_error",
        "error_code",
    ]
    assert retry.loc["R1", "payload"] == {"id": "R1", "amount": -1}
    assert retry.loc["R1", "last_error"] == "500 again" and retry.loc["R1", "error_code"] == "E500"
    assert retry.loc["R1", "last_seen"] >= retry.loc["R1", "first_seen"] == first_seen
    assert retry.loc["R2", "error_code"] is None

    third = store.record_failures(CRM, "pc_to_crm", [_failure("R1")], "run-3")
    assert third["attempts"].tolist() == [3] and third["exhausted"].tolist() == [True]
    assert store.retryable_failures(CRM, "pc_to_crm")["record_key"].tolist() == ["R2"]

    everything = store.dead_letter()
    assert set(everything["record_key"]) == {"R1", "R2"}  # the exhausted row stays visible
    row = everything.set_index("record_key").loc["R1"]
    assert row["attempts"] == 3 and row["exhausted"] and row["last_run_id"] == "run-3"
    assert store.dead_letter(include_retryable=False)["record_key"].tolist() == ["R1"]
    assert store.dead_letter("dynamics365").empty
    assert store.retryable_failures(CRM, "crm_to_pc").empty


def test_dead_letter_truncates_errors_and_clears_on_success(store: StateStore):
    store.record_failures(CRM, "crm_to_pc", [_failure("C1", "x" * 10_000), _failure("C2")], "run-1")
    assert len(store.dead_letter().set_index("record_key").loc["C1", "last_error"]) == 4000
    assert store.clear_failures(CRM, "crm_to_pc", ["C1", "C-unknown"]) == 1
    assert store.clear_failures(CRM, "pc_to_crm", ["C2"]) == 0  # other direction
    assert store.dead_letter()["record_key"].tolist() == ["C2"]
    again = store.record_failures(CRM, "crm_to_pc", [_failure("C1")], "run-2")
    assert again["attempts"].tolist() == [1]  # a new failure after a success starts over


def test_dead_letter_counts_a_key_once_per_call(store: StateStore):
    result = store.record_failures(CRM, "crm_to_pc", [_failure("C1", "first"), _failure("C1", "second")], "run-1")
    assert result["attempts"].tolist() == [1]
    assert store.dead_letter().iloc[0]["last_error"] == "second"


# --------------------------------------------------------------------------- commit_run and runs


def _seed(store: StateStore) -> None:
    store.upsert_links(CRM, _links(("R1", "C1")), "run-0")
    store.record_failures(CRM, "pc_to_crm", [_failure("R7")], "run-0")
    store.set_watermark(DAG, "crm", T0, "run-0")
    store.set_watermark(DAG, "partner_center", T0, "run-0")
    store.append_audit([_audit_entry(0, run_id="run-0")])


def _snapshot(store: StateStore) -> tuple:
    return (
        store.get_links(CRM)[["referral_id", "crm_id", "base_hash", "run_id"]].to_dict("records"),
        store.dead_letter()[["record_key", "attempts"]].to_dict("records"),
        store.get_watermark(DAG, "crm"),
        store.get_watermark(DAG, "partner_center"),
        store.audit()["id"].tolist(),
    )


def _commit(store: StateStore, *pairs: tuple[str, str], **kw) -> None:
    store.commit_run(
        dag_id=DAG,
        run_id="run-1",
        crm=CRM,
        links=_links(*pairs, stage="Active"),
        audit=[{"direction": "pc_to_crm", "referral_id": r, "crm_id": c, "action": "create"} for r, c in pairs],
        watermarks={"crm": T0 + timedelta(hours=1), "partner_center": T0 + timedelta(hours=2)},
        cleared_failures={"pc_to_crm": ["R7"]},
        **kw,
    )


def test_commit_run_lands_everything_in_one_go(store: StateStore):
    _seed(store)
    _commit(store, ("R2", "C2"), ("R3", "C3"))
    assert store.get_links(CRM)["referral_id"].tolist() == ["R1", "R2", "R3"]
    assert store.dead_letter().empty
    assert store.get_watermark(DAG, "crm") == T0 + timedelta(hours=1)
    assert store.get_watermark(DAG, "partner_center") == T0 + timedelta(hours=2)
    audit = store.audit(run_id="run-1")
    assert sorted(audit["referral_id"]) == ["R2", "R3"]
    assert set(audit["dag_id"]) == {DAG} and set(audit["crm"]) == {CRM}


def test_commit_run_with_a_link_conflict_lands_nothing(store: StateStore):
    _seed(store)
    before = _snapshot(store)
    with pytest.raises(ValueError, match=r"'C1'.*'R1'.*'R2'"):
        _commit(store, ("R3", "C3"), ("R2", "C1"))
    assert _snapshot(store) == before


def test_commit_run_rolls_back_when_its_last_step_fails(store: StateStore, monkeypatch: pytest.MonkeyPatch):
    _seed(store)
    before = _snapshot(store)

    def broken(*args, **kwargs):
        raise RuntimeError("watermark write failed")

    monkeypatch.setattr(watermarks_module, "write_watermark", broken)
    with pytest.raises(RuntimeError, match="watermark write failed"):
        _commit(store, ("R2", "C2"))
    assert _snapshot(store) == before


def test_commit_run_without_moving_watermarks(store: StateStore):
    _seed(store)
    _commit(store, ("R2", "C2"), move_watermarks=False)
    assert store.get_watermark(DAG, "crm") == T0
    assert store.get_watermark(DAG, "partner_center") == T0
    assert "R2" in store.get_links(CRM)["referral_id"].tolist()
    # and a commit never moves a watermark backwards
    store.commit_run(dag_id=DAG, run_id="run-2", crm=CRM, watermarks={"crm": T0 - timedelta(days=1)})
    assert store.get_watermark(DAG, "crm") == T0


def _record_step(store: StateStore) -> None:
    """A whole run's record step: links, audit, cleared and new failures, summary, watermarks."""
    _commit(
        store,
        ("R2", "C2"),
        failures={"pc_to_crm": [_failure("R8")], "crm_to_pc": [_failure("C9", "409 Conflict")]},
        summary={"pc_to_crm": {"created": 1, "failed": 1}, "crm_to_pc": {"failed": 1}},
    )


def _recorded(store: StateStore) -> tuple:
    return (*_snapshot(store), store.get_run(DAG, "run-1"))


def test_commit_run_records_failures_and_the_summary_in_the_same_go(store: StateStore):
    _seed(store)
    _record_step(store)
    dead = store.dead_letter()
    assert dead[["direction", "record_key", "attempts", "last_run_id"]].values.tolist() == [
        ["crm_to_pc", "C9", 1, "run-1"],
        ["pc_to_crm", "R8", 1, "run-1"],
    ]  # R7 cleared
    assert dead.set_index("record_key").loc["C9", "last_error"] == "409 Conflict"
    run = store.get_run(DAG, "run-1")
    assert run["summary"] == {"pc_to_crm": {"created": 1, "failed": 1}, "crm_to_pc": {"failed": 1}}
    assert run["crm"] == CRM
    assert store.get_watermark(DAG, "crm") == T0 + timedelta(hours=1)


def test_commit_run_clears_a_failure_before_recording_it_again(store: StateStore):
    _seed(store)
    store.record_failures(CRM, "pc_to_crm", [_failure("R7")], "run-0b")  # R7: 2 attempts
    _commit(store, ("R2", "C2"), failures={"pc_to_crm": [_failure("R7", "failed again")]})
    row = store.dead_letter().set_index("record_key").loc["R7"]
    assert (row["attempts"], row["last_error"]) == (1, "failed again")


@pytest.mark.parametrize(
    "broken",
    [
        ("dead_letter", "delete_failures"),
        ("dead_letter", "write_failures"),
        ("runs", "write_run"),
        ("watermarks", "write_watermark"),
    ],
)
def test_a_record_step_that_dies_part_way_records_nothing_and_its_retry_records_everything_once(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, broken: tuple[str, str]
):
    """Issue 17: the record step is ONE transaction. Were the dead letter or the run summary
    written after the links and watermarks, in their own transactions, a crash in between would
    move the watermarks past failures nobody recorded."""
    import importlib

    _seed(store)
    before = _recorded(store)
    assert before[-1] is None

    def crash(*args, **kwargs):
        raise RuntimeError("the worker died here")

    module = importlib.import_module(f"cosell_sync.state.{broken[0]}")
    with monkeypatch.context() as m:
        m.setattr(module, broken[1], crash)
        with pytest.raises(RuntimeError, match="died here"):
            _record_step(store)
    assert _recorded(store) == before  # no link, audit, failure, summary or watermark of run-1

    _record_step(store)  # the retry
    links, dead, crm_mark, pc_mark, audit_ids, run = _recorded(store)
    assert [link["referral_id"] for link in links] == ["R1", "R2"]
    assert {(r["record_key"], r["attempts"]) for r in dead} == {("R8", 1), ("C9", 1)}
    assert (crm_mark, pc_mark) == (T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    assert len(audit_ids) == len(before[4]) + 1
    assert run is not None and run["summary"]["pc_to_crm"]["failed"] == 1


def test_commit_run_checks_failures_before_it_writes_anything(store: StateStore):
    _seed(store)
    before = _recorded(store)
    with pytest.raises(ValueError, match="direction"):
        _commit(store, ("R2", "C2"), failures={"sideways": [_failure("R8")]})
    with pytest.raises(ValueError, match="record_key"):
        _commit(store, ("R2", "C2"), failures={"pc_to_crm": [_failure("")]})
    assert _recorded(store) == before


def test_record_run_and_last_run(store: StateStore):
    assert store.last_run(DAG) is None
    store.record_run(dag_id=DAG, run_id="run-1", crm=CRM, summary={"created": 1})
    store.record_run(dag_id=DAG, run_id="run-2", crm=CRM, summary={"created": 2, "failed": ["R1"]})
    store.record_run(dag_id="other", run_id="run-3", crm="dynamics365", summary={})
    last = store.last_run(DAG)
    assert last["run_id"] == "run-2" and last["summary"] == {"created": 2, "failed": ["R1"]}
    assert last["crm"] == CRM and last["finished_at"].utcoffset() == timedelta(0)
    store.record_run(dag_id=DAG, run_id="run-1", crm=CRM, summary={"created": 5})  # a retry of run-1
    assert store.last_run(DAG)["run_id"] == "run-1"
    assert store.last_run(DAG)["summary"] == {"created": 5}


# --------------------------------------------------------------------------- what PostgreSQL does otherwise

TRICKY_IDS = ["rb", "R_3", "R1", "Ra", "r0", "R-2"]  # an en-US collation orders these otherwise


@pytest.fixture
def en_us_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A state DB whose default collation is not by code point (PostgreSQL: ICU en-US), dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    name = services.unique_name("cosell_state_en_us")
    admin = sa.create_engine(services.pg_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        yield services.pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_text_is_ordered_by_code_point_whatever_the_database_collation(en_us_url: str, monkeypatch: pytest.MonkeyPatch):
    with StateStore(en_us_url) as st:
        st.migrate()
        if st.dialect == "postgresql":  # the database really orders otherwise
            with st.engine.connect() as conn:
                query = sa.text("SELECT v FROM unnest(CAST(:ids AS text[])) AS t(v) ORDER BY v")
                collated = conn.execute(query, {"ids": TRICKY_IDS}).scalars().all()
            assert collated != sorted(TRICKY_IDS)
        st.upsert_links(CRM, _links(*[(r, f"C{r}") for r in TRICKY_IDS]), "run-1")
        assert st.get_links(CRM)["referral_id"].tolist() == sorted(TRICKY_IDS)
        assert st.get_links(CRM, referral_ids=TRICKY_IDS)["referral_id"].tolist() == sorted(TRICKY_IDS)
        monkeypatch.setattr(values_module, "now", lambda: T0)  # one time for all: the text decides the order
        st.record_failures(CRM, "pc_to_crm", [_failure(r) for r in TRICKY_IDS], "run-1")
        assert st.retryable_failures(CRM, "pc_to_crm")["record_key"].tolist() == sorted(TRICKY_IDS)
        assert st.dead_letter()["record_key"].tolist() == sorted(TRICKY_IDS)
        for run_id in TRICKY_IDS:
            st.record_run(dag_id=DAG, run_id=run_id, crm=CRM, summary={})
        assert st.last_run(DAG)["run_id"] == max(TRICKY_IDS)


def test_free_text_from_elsewhere_is_stored_on_both_backends(store: StateStore):
    """NUL characters and over-long codes in error messages, audit details and webhook URIs: stored,
    not a failed commit (PostgreSQL text holds no NUL and enforces VARCHAR lengths; SQLite does neither)."""
    failure = _failure("R1", "HTTP 500: \x00\x00binary body", error_code="E" * 300)
    store.record_failures(CRM, "pc_to_crm", [failure], "run-1")
    store.commit_run(
        dag_id=DAG,
        run_id="run-1",
        crm=CRM,
        audit=[{"direction": "pc_to_crm", "action": "fail", "field": "f" * 300, "detail": "bad\x00byte"}],
    )
    assert store.inbox_add([{"dedup_key": "k", "event_name": "e", "referral_id": "R1", "resource_uri": "u\x00"}])
    row = store.dead_letter().iloc[0]
    entry = store.audit().iloc[0]
    uri = store.inbox_pending()[0]["resource_uri"]
    if store.dialect == "postgresql":
        assert row["last_error"] == "HTTP 500: \ufffd\ufffdbinary body"
        assert row["error_code"] == "E" * 255 and entry["field"] == "f" * 255
        assert entry["detail"] == "bad\ufffdbyte" and uri == "u\ufffd"
    else:  # as it was given
        assert row["last_error"] == failure["error"] and row["error_code"] == "E" * 300
        assert entry["field"] == "f" * 300 and entry["detail"] == "bad\x00byte" and uri == "u\x00"


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_sessions_run_in_utc_whatever_the_server_time_zone(db_url: str):
    """A server (here: the URL's session option) west of UTC would hand 0001-01-01 UTC back in year 0."""
    with StateStore(f"{db_url}?options=-c%20timezone%3DAmerica/New_York") as st:
        st.migrate()
        with st.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TIME ZONE").scalar_one() == "UTC"
        earliest = datetime(1, 1, 1, tzinfo=UTC)
        assert st.set_watermark(DAG, "crm", earliest, "run-1") == earliest
        assert st.get_watermark(DAG, "crm") == earliest
        st.set_watermark(DAG, "partner_center", T0, "run-1")
        assert st.get_watermark(DAG, "partner_center") == T0


# --------------------------------------------------------------------------- concurrency

PROCS, RUNS, SHARED = 4, 50, 3


def _concurrent_worker(url: str, proc: int, barrier, results) -> None:
    try:
        st = StateStore(url, max_attempts=1_000)
        barrier.wait(timeout=60)
        for i in range(RUNS):
            run_id = f"p{proc}-run{i}"
            pairs = [(f"p{proc}-R{i}-{k}", f"p{proc}-C{i}-{k}") for k in range(3)]
            failures = [_failure(f"shared-{j}") for j in range(SHARED)] + [_failure(f"p{proc}-F{i}")]
            st.record_failures(CRM, "crm_to_pc", failures, run_id)
            st.commit_run(
                dag_id=DAG,
                run_id=run_id,
                crm=CRM,
                links=_links(*pairs, run=i),
                audit=[{"direction": "crm_to_pc", "referral_id": r, "crm_id": c, "action": "create"} for r, c in pairs],
                watermarks={"crm": T0 + timedelta(minutes=proc * 1000 + i)},
                cleared_failures={"crm_to_pc": [f"p{proc}-F{i - 1}"]} if i else None,
            )
            st.record_run(dag_id=DAG, run_id=run_id, crm=CRM, summary={"links": len(pairs)})
            assert len(st.get_links(CRM, referral_ids=[r for r, _ in pairs])) == 3
        st.close()
        results.put((proc, None))
    except BaseException as exc:
        results.put((proc, repr(exc)))


def test_concurrent_runs_from_four_processes(db_url: str):
    with StateStore(db_url) as st:
        st.migrate()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(db_url, n, barrier, results)) for n in range(PROCS)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == dict.fromkeys(range(PROCS))  # no errors, "database is locked" included
    assert [p.exitcode for p in procs] == [0] * PROCS

    with StateStore(db_url, max_attempts=1_000) as st:
        links = st.get_links(CRM)
        assert len(links) == PROCS * RUNS * 3
        assert links["crm_id"].is_unique
        assert len(st.audit(limit=None)) == PROCS * RUNS * 3
        dead = st.dead_letter().set_index("record_key")["attempts"].to_dict()
        expected = {f"shared-{j}": PROCS * RUNS for j in range(SHARED)}
        expected.update({f"p{n}-F{RUNS - 1}": 1 for n in range(PROCS)})
        assert dead == expected
        assert st.get_watermark(DAG, "crm") == T0 + timedelta(minutes=(PROCS - 1) * 1000 + RUNS - 1)
        assert _count(st, schema_module.runs_t) == PROCS * RUNS


def _holding_commit_worker(url: str, holding, go_on, results) -> None:
    """Commit R1 -> C1, pausing inside the transaction (links written, not committed) until ``go_on``."""
    try:
        real = audit_module.write_audit

        def paused(conn, rows):
            holding.set()
            if not go_on.wait(timeout=60):
                raise TimeoutError("the test never let the commit go on")
            return real(conn, rows)

        audit_module.write_audit = paused
        with StateStore(url) as st:
            st.commit_run(dag_id=DAG, run_id="run-a", crm=CRM, links=_links(("R1", "C1")))
        results.put(("a", "committed"))
    except BaseException as exc:
        results.put(("a", repr(exc)))


def _second_writer_worker(url: str, results) -> None:
    """Link R2 to the CRM record C1 (the first writer's): a conflict, once it sees that commit."""
    try:
        with StateStore(url) as st:
            st.upsert_links(CRM, _links(("R2", "C1")), "run-b")
        results.put(("b", "written"))
    except LinkConflictError as exc:
        results.put(("b", f"conflict with {exc.existing_referral_id}"))
    except BaseException as exc:
        results.put(("b", repr(exc)))


def _waiting_advisory_locks(store: StateStore) -> int:
    query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = ("
    query += "SELECT oid FROM pg_database WHERE datname = current_database())"
    with store.engine.connect() as conn:
        return conn.exec_driver_sql(query).scalar_one()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_link_writers_of_one_crm_wait_for_each_other_on_the_advisory_lock(db_url: str, store: StateStore):
    """PostgreSQL's counterpart of SQLite's BEGIN IMMEDIATE: a second writer of the CRM's links
    blocks on the advisory lock until the first commits, then checks for conflicts against the
    committed links (without the lock it would check too early, then fail on the unique index)."""
    ctx = multiprocessing.get_context("spawn")
    holding, go_on, results = ctx.Event(), ctx.Event(), ctx.Queue()
    first = ctx.Process(target=_holding_commit_worker, args=(db_url, holding, go_on, results))
    first.start()
    second = None
    try:
        assert holding.wait(timeout=60), "the first writer never reached its commit"
        second = ctx.Process(target=_second_writer_worker, args=(db_url, results))
        second.start()
        deadline = time.monotonic() + 120  # spawning the writer (imports) can take over 30 s on a loaded machine
        while _waiting_advisory_locks(store) == 0:
            assert second.is_alive(), f"the second writer did not wait: {results.get(timeout=5)}"
            assert time.monotonic() < deadline, "the second writer never waited on the advisory lock"
            time.sleep(0.05)
        assert results.empty()  # both still in flight: the second one is blocked
        # another CRM's links have their own lock: not blocked by the first writer
        assert store.upsert_links("dynamics365", _links(("R2", "C1")), "run-c") == 1
        assert store.get_links(CRM).empty  # the first commit is not visible yet
        time.sleep(0.3)
        assert second.is_alive() and results.empty()  # still waiting
    finally:
        go_on.set()
    outcomes = dict(results.get(timeout=60) for _ in range(2))
    first.join(timeout=60)
    second.join(timeout=60)
    assert outcomes == {"a": "committed", "b": "conflict with R1"}
    assert (first.exitcode, second.exitcode) == (0, 0)
    assert store.get_links(CRM)[["referral_id", "crm_id"]].values.tolist() == [["R1", "C1"]]


class _PgError(Exception):
    def __init__(self, pgcode: str) -> None:
        super().__init__(f"pgcode {pgcode}")
        self.pgcode = pgcode


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_deadlocks_and_serialisation_failures_are_retried_as_a_whole(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
):
    real = audit_module.write_audit
    calls = []

    def flaky(conn, rows):
        real(conn, rows)  # written, then rolled back by the failure below
        calls.append(len(rows))
        if len(calls) <= 2:
            code = "40P01" if len(calls) == 1 else "40001"
            raise sa.exc.OperationalError("INSERT", {}, _PgError(code))
        return len(rows)

    monkeypatch.setattr(audit_module, "write_audit", flaky)
    assert store.append_audit([_audit_entry(1), _audit_entry(2)]) == 2
    assert calls == [2, 2, 2]
    assert len(store.audit()) == 2

    def unique_violation(conn, rows):
        calls.append(-1)
        raise sa.exc.IntegrityError("INSERT", {}, _PgError("23505"))

    calls.clear()
    monkeypatch.setattr(audit_module, "write_audit", unique_violation)
    with pytest.raises(sa.exc.IntegrityError):
        store.append_audit([_audit_entry(3)])
    assert calls == [-1]  # not retried
    assert len(store.audit()) == 2


# --------------------------------------------------------------------------- Airflow connection


class _Conn:
    def __init__(self, **fields: object) -> None:
        self.conn_id = "cosell_state"
        self.extra_dejson = fields.pop("extra", {})
        for name in ("conn_type", "host", "login", "password", "port", "schema"):
            setattr(self, name, fields.get(name))


def test_url_from_connection_fields():
    assert sqlalchemy_url_from_connection(_Conn(conn_type="generic", host="sqlite:////x/y.db")) == "sqlite:////x/y.db"
    assert (
        sqlalchemy_url_from_connection(_Conn(conn_type="generic", host="postgres://u:p@h/db"))
        == "postgresql://u:p@h/db"
    )
    pg = _Conn(
        conn_type="postgres",
        host="db",
        login="u",
        password="p@ss",
        port=5433,
        schema="st",
        extra={"sslmode": "require"},
    )
    assert sqlalchemy_url_from_connection(pg) == "postgresql://u:p%40ss@db:5433/st?sslmode=require"
    assert sqlalchemy_url_from_connection(_Conn(conn_type="sqlite", host="", schema="/x/y.db")) == "sqlite:////x/y.db"
    with pytest.raises(Exception, match="SQLAlchemy URL"):
        sqlalchemy_url_from_connection(_Conn(conn_type="generic", host="db.example.com"))


def test_from_airflow_with_a_json_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    db = tmp_path / "x.db"
    conn = {"conn_type": "generic", "host": f"sqlite:///{db}"}
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", json.dumps(conn))
    with StateStore.from_airflow() as st:
        assert st.url == f"sqlite:///{db}"
        assert st.migrate() == SCHEMA_VERSION
    assert db.exists()
    assert not (tmp_path / "airflow" / "cosell_state.db").exists()


def test_from_airflow_defaults_to_sqlite_under_airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_COSELL_STATE", raising=False)
    with StateStore.from_airflow() as st:
        assert st.url == f"sqlite:///{tmp_path.resolve() / 'cosell_state.db'}"
        st.migrate()
    assert (tmp_path / "cosell_state.db").exists()


def test_from_airflow_with_a_postgres_uri_masks_the_password(monkeypatch: pytest.MonkeyPatch):
    seen = []
    real_create_engine = sa.create_engine

    def fake_create_engine(url, **kwargs):  # no PostgreSQL driver needed: record the URL, use SQLite
        seen.append(url)
        return real_create_engine("sqlite://")

    monkeypatch.setattr(sa, "create_engine", fake_create_engine)
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", "postgresql://cosell:s3cr%40t-pw@db.internal:5433/cosell_state")
    st = StateStore.from_airflow()
    assert seen[0].drivername == "postgresql"
    assert seen[0].password == "s3cr@t-pw" and seen[0].host == "db.internal" and seen[0].port == 5433
    assert st.url == "postgresql://cosell:***@db.internal:5433/cosell_state"
    assert "s3cr" not in repr(st)


# -- columnar bases (issue 16) -------------------------------------------------------------------
def _plain(value: object) -> object:
    """A value as plan() and the commit see it: missing (None, NaN or pandas' NA) as None."""
    return None if value is None or value is pd.NA or (isinstance(value, float) and value != value) else value


def _columnar_bases(store: StateStore, bases: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame(
        [{"referral_id": f"R{i}", "crm_id": f"C{i}", "base": b} for i, b in enumerate(bases)],
        columns=["referral_id", "crm_id", "base"],
    )
    store.upsert_links(CRM, frame, "run-1")
    return store.get_links(CRM), store.get_links(CRM, columnar=True)


@pytest.mark.parametrize(
    "bases",
    [
        pytest.param(
            [
                {"name": 'Deal "one" \\ é 🚀', "amount": 1200.5, "count": 3, "open": True, "close": "2027-01-31"},
                {"name": "Deal two", "amount": 7, "count": 4, "open": False, "close": "2027-02-01", "notes": None},
                {"name": None, "amount": None, "open": None, "notes": "2026-11-30T10:00:00Z"},  # keys missing
            ],
            id="one_arrow_pass",
        ),
        pytest.param(
            [{"code": 858880000, "note": "x"}, {"code": "GeneralOrOther", "note": "y"}], id="a_field_of_two_types"
        ),
        pytest.param([{"team": [{"email": "a@b.c"}], "name": "n"}, {"team": None, "name": "m"}], id="nested_values"),
    ],
)
def test_columnar_links_hold_the_values_of_the_dict_form(store: StateStore, bases: list[dict]):
    as_dicts, columnar = _columnar_bases(store, bases)
    assert "base" not in columnar.columns
    assert list(columnar["referral_id"]) == list(as_dicts["referral_id"])
    names = {k for b in bases for k in b}
    assert {c for c in columnar.columns if c.startswith("base.")} == {f"base.{k}" for k in names}
    for i, base in enumerate(as_dicts["base"]):
        for name in names:
            got, want = _plain(columnar[f"base.{name}"].iloc[i]), base.get(name)
            assert got == want and type(got) in (type(want), float if type(want) is int else type(want)), (
                i,
                name,
                got,
                want,
            )
    # Dates and times stay the text they were stored as (never parsed into timestamps).
    if "close" in names:
        assert columnar["base.close"].iloc[0] == "2027-01-31"
        assert all(columnar[f"base.{k}"].dtype != object for k in names)  # decoded by Arrow, not row by row


def test_columnar_links_plan_what_dict_links_plan(store: StateStore):
    from benchmarks.synthetic import make_case
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.engine.plan import plan, with_base_dicts

    mapping = load_mapping(CRM)
    pc, crm, links = make_case(400, mapping, seed=5, columnar=False, shuffled=True)
    store.upsert_links(CRM, links, "run-1")
    by_dict = plan(pc, crm, store.get_links(CRM), mapping)
    by_column = plan(pc, crm, store.get_links(CRM, columnar=True), mapping)
    key = ["referral_id", "crm_id", "target", "field"]
    assert len(by_dict.changes) and by_dict.changes.sort_values(key).astype(str).reset_index(drop=True).equals(
        by_column.changes.sort_values(key).astype(str).reset_index(drop=True)
    )
    moved_dict = {r: b for r, b in zip(by_dict.new_base["referral_id"], by_dict.new_base["base"], strict=True)}
    moved_column = with_base_dicts(by_column.new_base)
    assert set(moved_dict) == set(moved_column["referral_id"])
    for referral_id, base in zip(moved_column["referral_id"], moved_column["base"], strict=True):
        assert {k: _plain(v) for k, v in base.items()} == {k: _plain(v) for k, v in moved_dict[referral_id].items()}
