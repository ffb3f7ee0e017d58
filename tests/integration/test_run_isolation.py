"""Isolated runs (issue 11, case 2): two runs on the same CRM never interleave between reading
the base and committing it, through the runner's steps, the event task and a DAG run,
against the sandbox. Every test runs with the state DB on SQLite and on PostgreSQL (a fresh
database per test), the DAG run included (issue 14)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cosell_sync import pipeline as runner
from cosell_sync.dag_factory import sync_sides
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.pipeline import SyncJob, lease
from cosell_sync.state import LeaseHeldError, LeaseLostError, StateStore
from tests.integration.sync_jobs import EVENTS, base_of, crm_amount, event_job, scheduled_job, seed
from tests.integration.test_sync_runner import run_sync

ROOT = Path(__file__).resolve().parents[2]
CRMS = ["salesforce", "dynamics365"]
BACKENDS = ["sqlite", "postgresql"]
both_databases = pytest.mark.parametrize("state_backend", BACKENDS)
_runs = itertools.count(1)


def _incoming_link(pc, store: StateStore, crm: str):
    for row in store.get_links(crm).itertuples():
        ref = pc.partner_center.referrals[row.referral_id]
        if ref["direction"] == "Incoming" and ref["status"] in ("New", "Active"):
            return row, ref
    raise AssertionError("no open incoming referral was linked")


def _step(job: SyncJob, store: StateStore, *names: str) -> object:
    """Some of the DAG's steps for ``job`` (its lease already taken), each under the lease like its task."""
    pc_side, crm_side = sync_sides(job.crm, job.mapping)
    steps = {
        "extract": lambda: (
            runner.extract_partner_center(job, pc_side, store),
            runner.extract_crm(job, crm_side, store),
        ),
        "plan": lambda: runner.plan_run(job, store, pc_side, crm_side),
        "load": lambda: (runner.load_crm(job, crm_side), runner.load_partner_center(job, pc_side, crm_side)),
        "commit": lambda: runner.commit(job, store),
    }
    result = None
    for name in names:
        with lease.kept(job, store):
            result = steps[name]()
    return result


@both_databases
@pytest.mark.parametrize("crm", CRMS)
def test_a_second_run_waits_for_the_first_commit_and_then_plans_on_its_base(pc, conns, store, tmp_path, crm):
    seed(pc, crm, referrals=16, opportunities=6, accounts=3, flagged=2, seed=41)
    staging = tmp_path / "staging"
    first = run_sync(crm, store, staging)
    assert first["pc_to_crm"]["failed"] == 0, first
    row, ref = _incoming_link(pc, store, crm)
    assert store.get_lease(crm).released_at is not None  # the commit released it

    # A Microsoft seller changes the deal value: the webhook's run starts on that referral.
    pc.partner_center._commit_update(ref, {**ref, "details": {**ref["details"], "dealValue": 4242.0}}, "Microsoft")
    event = event_job(crm, staging, [row.referral_id])
    lease.acquire(event, store)
    _step(event, store, "extract")

    # The scheduled run starts now: it may neither extract nor plan; it waits (the DAG reschedules it).
    scheduled = scheduled_job(crm, store, staging)
    with pytest.raises(LeaseHeldError, match=rf"held by {EVENTS}.{crm} run {event.run_id}"):
        lease.acquire(scheduled, store)
    with pytest.raises(LeaseHeldError):  # the all-in-one path refuses it too
        runner.sync(scheduled, *sync_sides(crm, scheduled.mapping), store)
    assert scheduled.lease_epoch is None

    for name in ("plan", "load"):  # the event run goes on; the scheduled one still waits
        _step(event, store, name)
        with pytest.raises(LeaseHeldError):
            lease.acquire(scheduled, store)
    report = _step(event, store, "commit")
    assert report["pc_to_crm"]["updated"] == 1, report
    assert base_of(store, crm, row.referral_id)["deal_value"] == 4242.0
    assert crm_amount(pc, crm, row.crm_id) == 4242.0

    # The event run committed and released: the scheduled run takes the lease and plans on the new base.
    assert lease.acquire(scheduled, store) == store.get_lease(crm).epoch
    _step(scheduled, store, "extract", "plan")
    changes = runner.load_plan(scheduled).changes
    assert row.referral_id not in set(changes["referral_id"]), changes  # nothing to write back: no revert
    final = _step(scheduled, store, "load", "commit")
    assert final["pc_to_crm"]["conflicts"] == final["crm_to_pc"]["conflicts"] == 0, final
    assert base_of(store, crm, row.referral_id)["deal_value"] == 4242.0  # the base never moved back
    assert crm_amount(pc, crm, row.crm_id) == 4242.0
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 4242.0
    assert not store.get_lease(crm).live()


@both_databases
def test_a_run_whose_lease_passed_to_another_run_cannot_commit_its_stale_plan(pc, conns, store, tmp_path):
    crm = "salesforce"
    seed(pc, crm, referrals=16, opportunities=6, accounts=3, flagged=2, seed=41)
    staging = tmp_path / "staging"
    run_sync(crm, store, staging)
    row, ref = _incoming_link(pc, store, crm)
    before = base_of(store, crm, row.referral_id)

    # A scheduled run reads and plans, then stalls past its lease's expiry (say, its worker died).
    scheduled = scheduled_job(crm, store, staging)
    scheduled.lease_ttl = timedelta(seconds=1)
    lease.acquire(scheduled, store)
    _step(scheduled, store, "extract", "plan")
    expires = store.get_lease(crm).expires_at
    with store.engine.begin() as conn:  # fast-forward: the lease expired
        from cosell_sync.state.schema import leases_t

        conn.execute(leases_t.update().values(expires_at=expires - timedelta(hours=1)))

    # An event run takes the expired lease over and syncs a Microsoft edit.
    pc.partner_center._commit_update(ref, {**ref, "details": {**ref["details"], "dealValue": 777.0}}, "Microsoft")
    event = event_job(crm, staging, [row.referral_id])
    assert lease.acquire(event, store) == scheduled.lease_epoch + 1
    runner.sync(event, *sync_sides(crm, event.mapping), store)
    assert base_of(store, crm, row.referral_id)["deal_value"] == 777.0 != before["deal_value"]

    # The stale run's next task finds its lease gone, and its commit is refused in the transaction.
    with pytest.raises(LeaseLostError, match=rf"passed to {EVENTS}.{crm} run {event.run_id}"):
        _step(scheduled, store, "load")
    with pytest.raises(LeaseLostError):
        runner.commit(scheduled, store)
    assert base_of(store, crm, row.referral_id)["deal_value"] == 777.0  # not moved back


@both_databases
def test_a_dry_run_takes_no_lease_and_is_not_blocked(pc, conns, store, tmp_path):
    crm = "salesforce"
    seed(pc, crm, referrals=16, opportunities=6, accounts=3, flagged=2, seed=41)
    staging = tmp_path / "staging"
    run_sync(crm, store, staging)
    holder = store.acquire_lease(crm, f"{EVENTS}.{crm}", "asset_triggered__busy", timedelta(minutes=5))
    report = run_sync(crm, store, staging, dry_run=True)
    assert report["dry_run"]
    assert store.get_lease(crm) == holder  # untouched


# --------------------------------------------------------------------------- through Airflow


@pytest.fixture
def airflow_env(pc_conn, sf_conn, state_url, monkeypatch, tmp_path) -> Iterator[StateStore]:
    """The sandbox connections and the state DB as Airflow's ``cosell_state`` connection (its URL in
    the host: a SQLite file or a PostgreSQL database, see ``state_backend``), migrated."""
    monkeypatch.setenv("COSELL_STAGING_URL", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv("AIRFLOW__COSELL__EVENT_CRMS", "salesforce")
    monkeypatch.setenv("AIRFLOW__COSELL__LEASE_POLL_INTERVAL", "1")
    s = StateStore.from_airflow()
    assert s.dialect == state_url.split(":")[0].split("+")[0]
    s.migrate()
    yield s
    s.close()


class _TI:
    def __init__(self, first_reschedule=None) -> None:
        self.first = first_reschedule

    def get_first_reschedule_date(self, context):
        return self.first


@both_databases
def test_the_event_task_hands_its_events_back_and_is_rescheduled_while_a_crm_is_leased(pc, airflow_env, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

    from cosell_sync import event_dag

    store = airflow_env
    seed(pc, "salesforce", referrals=16, opportunities=6, accounts=3, flagged=2, seed=41)
    rid = next(iter(pc.partner_center.referrals))
    store.inbox_add([{"dedup_key": "k1", "event_name": "referral-updated", "referral_id": rid, "resource_uri": "x"}])
    holder = store.acquire_lease("salesforce", "cosell_sync_salesforce", "scheduled__busy", timedelta(minutes=5))
    context = {"ti": _TI()}
    monkeypatch.setattr(event_dag, "get_current_context", lambda: context)
    with pytest.raises(AirflowRescheduleException):
        event_dag.sync_events("asset_triggered__1")
    assert store.inbox_counts() == {"pending": 1, "claimed": 0, "done": 0}  # handed back while waiting
    assert store.get_lease("salesforce") == holder

    # Waited longer than [cosell] lease_max_wait: it fails, naming the holder, and keeps no event.
    context["ti"] = _TI(datetime.now(UTC) - timedelta(hours=4))
    with pytest.raises(AirflowFailException, match="held by cosell_sync_salesforce run scheduled__busy"):
        event_dag.sync_events("asset_triggered__1")
    assert store.inbox_counts()["pending"] == 1

    store.release_lease("salesforce", "cosell_sync_salesforce", "scheduled__busy")
    context["ti"] = _TI()
    result = event_dag.sync_events("asset_triggered__1")
    assert result["events"] == 1 and "salesforce" in result["reports"]
    assert store.inbox_counts() == {"pending": 0, "claimed": 0, "done": 1}
    after = store.get_lease("salesforce")
    assert after.run_id == "asset_triggered__1" and not after.live()  # released by the commit


@both_databases
def test_a_dag_run_waiting_for_the_lease_is_rescheduled_not_failed(pc, airflow_env, airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    store = airflow_env
    monkeypatch.setenv("AIRFLOW__COSELL__LEASE_MAX_WAIT", "120")  # never hang: fail instead
    seed(pc, "salesforce", referrals=16, opportunities=6, accounts=3, flagged=2, seed=41)
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cosell_sync_salesforce"]
    holder = (f"{EVENTS}.salesforce", "asset_triggered__busy")
    store.acquire_lease("salesforce", *holder, timedelta(minutes=5))
    started = datetime.now(UTC)
    stop = threading.Event()

    def release_once_prepare_was_rescheduled() -> None:
        """The holder commits only after the waiting task was rescheduled (at most 60 s)."""
        query = (
            select(func.count())
            .select_from(TaskReschedule)
            .join(TaskInstance, TaskInstance.id == TaskReschedule.ti_id)
            .where(TaskInstance.dag_id == dag.dag_id, TaskInstance.task_id == "prepare")
            .where(TaskReschedule.start_date >= started)
        )
        deadline = time.monotonic() + 60
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    with create_session() as session:
                        if session.scalar(query):
                            break
                except Exception as exc:  # Airflow's SQLite DB busy with dag.test(): look again
                    logging.getLogger(__name__).debug("reschedule not seen yet: %s", exc)
                stop.wait(0.2)
        finally:
            store.release_lease("salesforce", *holder)

    releaser = threading.Thread(target=release_once_prepare_was_rescheduled, daemon=True)
    releaser.start()
    try:
        params = {"dry_run": False, "referral_ids": [], "full_resync": False, "directions": "both"}
        dag_run = dag.test(run_conf=params)
    finally:
        stop.set()
        releaser.join(timeout=30)
    assert str(dag_run.state) == "success"
    with create_session() as session:
        prepare = session.scalar(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag.dag_id,
                TaskInstance.run_id == dag_run.run_id,
                TaskInstance.task_id == "prepare",
            )
        )
        reschedules = session.scalars(select(TaskReschedule).where(TaskReschedule.ti_id == prepare.id)).all()
    assert str(prepare.state) == "success" and prepare.try_number == 1  # waited without using a try
    assert len(reschedules) >= 1
    recorded = store.get_run(dag.dag_id, dag_run.run_id)
    assert recorded and recorded["summary"]["pc_to_crm"]["created"] >= 1
    done = store.get_lease("salesforce")
    assert done.run_id == dag_run.run_id and not done.live()  # taken after the holder let go, released at commit


@both_databases
def test_a_lease_released_after_a_failure_is_not_taken_back_by_a_parallel_first_try(store, tmp_path):
    job = SyncJob(
        crm="salesforce",
        dag_id="cosell_sync_salesforce",
        run_id="manual__failed",
        mapping=load_mapping("salesforce"),
        staging=tmp_path,
    )
    lease.acquire(job, store)
    assert lease.release(job, store)  # extract_crm failed for good
    with lease.kept(job, store, revive=False):  # extract_partner_center's first try renews after that
        assert not store.get_lease("salesforce").live()
    assert not store.get_lease("salesforce").live()  # the failed run blocks nobody
    with lease.kept(job, store):  # a cleared task of the run (a later try) takes it back: nobody took it
        assert store.get_lease("salesforce").live() and store.get_lease("salesforce").epoch == job.lease_epoch
    lease.release(job, store)
    other = store.acquire_lease("salesforce", "cosell_sync_salesforce", "manual__next", timedelta(minutes=5))
    assert other.epoch == job.lease_epoch + 1
    with pytest.raises(LeaseLostError), lease.kept(job, store):  # now another run holds it
        pass
