"""``airflow backfill create`` through a real scheduler: a backfill re-syncs exactly its range
and leaves the live watermark where it was.

The story: a referral Microsoft changed two days ago reached Partner Center's API late
(its ``updatedDateTime`` is in the past), after the live incremental sync had moved its
watermark beyond it, so no scheduled run will ever read it. A backfill over that past
range picks it up.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from cosell_sandbox.airflow_cluster import AirflowCluster
from cosell_sandbox.seed import iso
from cosell_sync.state import StateStore
from tests.integration.test_sync_runner import run_sync

# Real Airflow components: `make test` runs the tests of one lane ("airflow-cluster-a") one after another on
# one xdist worker, so at most two clusters (one per lane) run at once, beside the rest of the suite.
pytestmark = pytest.mark.xdist_group("airflow-cluster-a")
DAG_ID = "cosell_sync_salesforce"


@pytest.fixture
def cluster_env(pc, pc_conn, sf_conn, tmp_path):
    """The sandbox connections (and a state DB and staging area) for the Airflow processes."""
    import os

    env = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW_CONN_COSELL_STATE"] = json.dumps({"conn_type": "generic", "host": f"sqlite:///{tmp_path}/state.db"})
    env["COSELL_STAGING_URL"] = f"file://{tmp_path / 'staging'}"
    return env


def watermarks(store: StateStore) -> dict[str, tuple]:
    """side -> (value, run_id that set it), as the state DB holds them."""
    import sqlalchemy as sa

    query = sa.text("select side, value, run_id from cosell_watermarks where dag_id = :dag_id")
    with store.engine.connect() as conn:
        return {side: (value, run_id) for side, value, run_id in conn.execute(query, {"dag_id": DAG_ID})}


@pytest.mark.timeout(900)
def test_backfill_resyncs_its_range_and_leaves_the_live_watermark(pc, cluster_env, tmp_path, monkeypatch):
    pc.partner_center.seed(30, seed=41)
    pc.salesforce.seed(opportunities=10, accounts=4, flagged=3, seed=41)
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", cluster_env["AIRFLOW_CONN_COSELL_STATE"])
    store = StateStore.from_airflow()
    store.migrate()
    live = run_sync("salesforce", store, tmp_path / "live-staging")  # the live incremental sync, done
    assert live["pc_to_crm"]["failed"] == 0

    # A referral that reached the API late, stamped two days ago: behind the live watermark.
    hour = (datetime.now(UTC) - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    late = pc.partner_center.seed(1, seed=99)[0]
    doc = pc.partner_center.referrals[late]
    doc.update(status="New", substatus="Pending", direction="Incoming")
    doc["createdDateTime"] = doc["updatedDateTime"] = iso(hour + timedelta(minutes=5))
    assert run_sync("salesforce", store, tmp_path / "live-staging")["pc_to_crm"]["created"] == 0  # never seen live
    marks = watermarks(store)
    assert all(v for v, _ in marks.values())

    with AirflowCluster(tmp_path / "airflow", cluster_env, ("api-server", "scheduler", "dag-processor")) as af:
        af.wait_for(lambda: af.dag_serialized(DAG_ID), 180, f"{DAG_ID} to be parsed")
        start, end = hour, hour + timedelta(minutes=15)
        # Created while the DAG is paused, then unpaused (the scheduler starts no run of a paused DAG,
        # backfills included). Not the other way round: on SQLite, `backfill create` commits each run
        # as it creates it (pysqlite commits a released outermost SAVEPOINT), and when a later run
        # meets "database is locked" (a busy scheduler) it deletes the runs it made and exits, and
        # `af.cli` tries again. Had the scheduler already started one of those runs, its next UPDATE
        # of it matched no row: StaleDataError, and the scheduler died. Paused, it never touched them.
        # The lock is SQLite's "busy snapshot": the command read in its savepoint, a component committed,
        # and the write is refused at once (no busy timeout); on a loaded machine, several times running
        # (a run here failed all three tries), so it may try more often: each failed try cleaned up.
        done = af.cli(
            "backfill",
            "create",
            "--dag-id",
            DAG_ID,
            "--from-date",
            start.isoformat(),
            "--to-date",
            end.isoformat(),
            attempts=8,
        )
        assert "error" not in done.stdout.lower(), done.stdout
        af.unpause(DAG_ID)

        def finished():  # every run, the scheduled one too: none may hold the lease when Airflow stops
            runs = af.dag_runs(DAG_ID)
            backfills = [r for r in runs if r["run_type"] == "backfill"]
            return backfills if backfills and all(r["state"] in ("success", "failed") for r in runs) else None

        runs = af.wait_for(finished, 420, "the backfill runs (and the scheduled run) to finish", interval=2)
    assert {r["state"] for r in runs} == {"success"}, runs
    for other in (r for r in af.dag_runs(DAG_ID) if r["run_type"] != "backfill"):  # the live schedule's runs
        recorded = store.get_run(DAG_ID, other["run_id"])
        assert recorded is None or recorded["summary"]["pc_to_crm"]["created"] == 0, recorded
    # Each run read exactly its data interval; the one holding the late referral created it.
    summaries = [store.get_run(DAG_ID, r["run_id"])["summary"] for r in runs]
    assert sum(s["pc_to_crm"]["created"] for s in summaries) == 1, summaries
    opps = Counter(o.get("PC_Referral_Id__c") for o in pc.salesforce.list_records("Opportunity"))
    assert opps[late] == 1
    # No backfill run moved the live watermark (a scheduled run may have, with what it read).
    backfills = {r["run_id"] for r in runs}
    for side, (value, run_id) in watermarks(store).items():
        assert run_id not in backfills
        assert (value, run_id) == marks[side] or run_id.startswith("scheduled__"), (side, value, run_id)
    # The next live run neither re-reads history nor duplicates.
    after = run_sync("salesforce", store, tmp_path / "live-staging")
    assert after["pc_to_crm"]["created"] == 0 and after["crm_to_pc"]["created"] == 0, after
    assert Counter(o.get("PC_Referral_Id__c") for o in pc.salesforce.list_records("Opportunity"))[late] == 1
