"""Task retries of the sync and event DAGs: exponential backoff, ``[cosell]`` settings, and the
run's lease across retries (kept while a retry will follow, released by the last failed try)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from cosell_sync import dag_factory
from cosell_sync.errors import AuthenticationError, ConfigurationError, ServerError, ThrottledError, TransportError

ROOT = Path(__file__).resolve().parents[2]
RETRIED_DAGS = ("cosell_sync_dynamics365", "cosell_sync_salesforce", "cosell_referral_events")


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def _retry_settings(dagbag, dag_id: str) -> set[tuple]:
    dag = dagbag.dags[dag_id]
    assert dag.tasks
    return {(t.retries, t.retry_exponential_backoff, t.retry_delay, t.max_retry_delay) for t in dag.tasks}


def test_every_task_retries_three_times_with_exponential_backoff_by_default(monkeypatch):
    monkeypatch.delenv("AIRFLOW__COSELL__TASK_RETRY_DELAY", raising=False)  # the suite shortens it
    dagbag = _dagbag()
    assert dagbag.import_errors == {}
    for dag_id in RETRIED_DAGS:
        assert _retry_settings(dagbag, dag_id) == {(3, 2.0, timedelta(seconds=30), timedelta(minutes=10))}, dag_id
    sync = dagbag.dags["cosell_sync_salesforce"]
    assert len(sync.tasks) == 8


def test_a_refused_credential_fails_at_once_transient_faults_are_retried():
    from airflow.sdk import RetryAction
    from airflow.serialization.serialized_objects import DagSerialization

    dagbag = _dagbag()
    for dag_id in RETRIED_DAGS:
        dag = dagbag.dags[dag_id]
        for t in dag.tasks:
            decide = t.retry_policy.evaluate
            refused = AuthenticationError("Entra ID", "AADSTS7000215: Invalid client secret", code="invalid_client")
            assert decide(refused, 1, 3).action == RetryAction.FAIL
            assert decide(ConfigurationError("no tenant_id"), 1, 3).action == RetryAction.FAIL
            for transient in (
                ServerError("Entra ID", "unavailable", status=503),
                ThrottledError("Dataverse", "busy", status=429),
                TransportError("Salesforce", "connection failed"),
                RuntimeError("anything else"),
            ):
                assert decide(transient, 1, 3).action == RetryAction.DEFAULT, (dag_id, t.task_id, transient)
        serialized = DagSerialization.to_dict(dag)  # what the DAG processor stores
        assert json.dumps(serialized).count('"has_retry_policy": true') >= len(dag.tasks)  # and default_args


def test_retries_and_delays_come_from_the_cosell_settings(monkeypatch):
    monkeypatch.setenv("AIRFLOW__COSELL__TASK_RETRIES", "5")
    monkeypatch.setenv("AIRFLOW__COSELL__TASK_RETRY_DELAY", "7")
    monkeypatch.setenv("AIRFLOW__COSELL__TASK_MAX_RETRY_DELAY", "120")
    dagbag = _dagbag()
    assert dagbag.import_errors == {}
    for dag_id in RETRIED_DAGS:
        assert _retry_settings(dagbag, dag_id) == {(5, 2.0, timedelta(seconds=7), timedelta(seconds=120))}, dag_id

    monkeypatch.setenv("AIRFLOW__COSELL__TASK_RETRIES", "0")  # retries off
    assert dag_factory.task_default_args()["retries"] == 0


def test_the_tasks_go_to_the_cosell_queue_when_one_is_set(monkeypatch):
    from airflow.configuration import conf

    default_queue = conf.get("operators", "default_queue")
    monkeypatch.delenv("AIRFLOW__COSELL__QUEUE", raising=False)
    for dag_id in RETRIED_DAGS:
        assert {t.queue for t in _dagbag().dags[dag_id].tasks} == {default_queue}, dag_id
    monkeypatch.setenv("AIRFLOW__COSELL__QUEUE", "cosell")
    dagbag = _dagbag()
    for dag_id in RETRIED_DAGS:
        assert {t.queue for t in dagbag.dags[dag_id].tasks} == {"cosell"}, dag_id


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("TASK_RETRIES", "three", "task_retries must be a whole number"),
        ("TASK_RETRIES", "-1", "task_retries must be a whole number"),
        ("TASK_RETRY_DELAY", "soon", "task_retry_delay must be a positive number of seconds"),
        ("TASK_MAX_RETRY_DELAY", "0", "task_max_retry_delay must be a positive number of seconds"),
    ],
)
def test_a_bad_setting_is_an_error_naming_it(monkeypatch, key, value, message):
    monkeypatch.setenv(f"AIRFLOW__COSELL__{key}", value)
    with pytest.raises((ValueError, AirflowFailException), match=message):
        dag_factory.task_default_args()


class TestLeaseAcrossRetries:
    """``run_step`` with the task instance Airflow would give each try (retries=3: max_tries 3)."""

    crm, dag_id, run_id = "salesforce", "cosell_sync_salesforce", "manual__retries"

    @pytest.fixture
    def spec(self, store, tmp_path, monkeypatch):
        monkeypatch.setattr(dag_factory, "state_store", lambda: store)
        lease = store.acquire_lease(self.crm, self.dag_id, self.run_id, timedelta(minutes=30))
        return {
            "crm": self.crm,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "mapping_path": None,
            "staging": f"file://{tmp_path / 'staging'}",
            "since_pc": None,
            "since_crm": None,
            "until": None,
            "referral_ids": None,
            "directions": ["pc_to_crm", "crm_to_pc"],
            "dry_run": False,
            "backfill": False,
            "lease_epoch": lease.epoch,
            "lease_ttl": 1800,
        }

    def _try(self, monkeypatch, spec, try_number: int, max_tries: int = 3, exc: BaseException | None = None):
        ti = SimpleNamespace(try_number=try_number, max_tries=max_tries)
        monkeypatch.setattr(dag_factory, "get_current_context", lambda: {"ti": ti})

        def step(job, store):
            if exc is not None:
                raise exc
            return "done"

        return dag_factory.run_step(spec, step)

    def _live(self, store) -> bool:
        lease = store.get_lease(self.crm)
        return lease is not None and lease.run_id == self.run_id and lease.live()

    def test_kept_while_a_retry_follows_released_by_the_last_try(self, store, spec, monkeypatch):
        for try_number in (1, 2, 3):  # tries 1-3 of 4 will be retried: the run keeps its lease
            with pytest.raises(RuntimeError):
                self._try(monkeypatch, spec, try_number, exc=RuntimeError("HTTP 503"))
            assert self._live(store), try_number
        with pytest.raises(RuntimeError):  # try 4 of 4: failed for good
            self._try(monkeypatch, spec, 4, exc=RuntimeError("HTTP 503"))
        assert not self._live(store)
        # A cleared task (a later try, Airflow raised max_tries) takes the lease back: no other run took it.
        assert self._try(monkeypatch, spec, 5, max_tries=8) == "done"
        assert self._live(store)

    def test_a_refused_credential_releases_the_lease_on_the_first_try(self, store, spec, monkeypatch):
        with pytest.raises(AuthenticationError):  # the retry policy fails the task: no try follows
            self._try(monkeypatch, spec, 1, exc=AuthenticationError("Entra ID", "AADSTS7000215", code="invalid_client"))
        assert not self._live(store)
        with pytest.raises(ServerError):  # a transient fault on a later try of a cleared task: kept
            self._try(monkeypatch, spec, 2, exc=ServerError("Entra ID", "unavailable", status=503))
        assert self._live(store)

    def test_a_retried_task_gets_its_lease_back_a_fail_exception_releases_at_once(self, store, spec, monkeypatch):
        with pytest.raises(AirflowFailException):  # no retry for this one, even on try 1
            self._try(monkeypatch, spec, 1, exc=AirflowFailException("bad conf"))
        assert not self._live(store)
        assert self._try(monkeypatch, spec, 1) == "done"  # a first try (a parallel task) does not revive it
        assert not self._live(store)
        assert self._try(monkeypatch, spec, 2) == "done"  # a retry does
        assert self._live(store)
