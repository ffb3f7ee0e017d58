"""The DAG files import cleanly through Airflow, with the documented shape."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))  # examples are off (AIRFLOW__CORE__LOAD_EXAMPLES)


def test_dagbag_imports_with_zero_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {
        "cosell_sync_dynamics365",
        "cosell_sync_salesforce",
        "cosell_referral_events",
        "partner_center_webhook_registration",
    }


def test_events_dag_is_scheduled_by_the_inbox_watcher(dagbag):
    dag = dagbag.dags["cosell_referral_events"]
    assert dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    (asset,) = dag.timetable.asset_condition.objects
    (watcher,) = asset.watchers
    assert type(watcher.trigger).__name__ == "InboxTrigger"
    assert [t.task_id for t in dag.tasks] == ["sync_events"]


@pytest.mark.parametrize("dag_id", ["cosell_sync_dynamics365", "cosell_sync_salesforce", "cosell_referral_events"])
def test_each_task_pushes_one_xcom_not_one_per_key(dagbag, dag_id):
    """A TaskFlow task annotated ``-> dict`` would push every key as an XCom of its own too."""
    tasks = dagbag.dags[dag_id].tasks
    assert tasks and all(t.multiple_outputs is False for t in tasks), {t.task_id: t.multiple_outputs for t in tasks}


@pytest.mark.parametrize("dag_id", ["cosell_sync_dynamics365", "cosell_sync_salesforce"])
def test_sync_dag_shape(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert set(dag.params.keys()) == {"dry_run", "referral_ids", "full_resync", "directions"}
    assert dag.params.get_param("directions").value == "both"
    tasks = {t.task_id: t for t in dag.tasks}
    assert set(tasks) == {
        "prepare",
        "extract_partner_center",
        "extract_crm",
        "plan",
        "load_crm",
        "load_partner_center",
        "commit_state",
        "report",
    }
    assert tasks["plan"].upstream_task_ids == {"prepare", "extract_partner_center", "extract_crm"}
    assert tasks["commit_state"].upstream_task_ids == {"prepare", "load_partner_center"}


def test_a_broken_mapping_fails_at_parse_time_naming_the_key(tmp_path, monkeypatch):
    from cosell_sync.engine.mapping import DEFAULTS, MappingError

    broken = tmp_path / "salesforce.yaml"
    text = (DEFAULTS / "salesforce.yaml").read_text()
    broken.write_text(text.replace("    direction: both", "    direction: sideways", 1))
    monkeypatch.setenv("COSELL_MAPPING_SALESFORCE", str(broken))
    from cosell_sync.dag_factory import build_sync_dag

    with pytest.raises(MappingError, match=r"fields\.name\.direction: 'sideways'"):
        build_sync_dag("salesforce")


def test_salesforce_sync_dag_runs_through_airflow(pc, pc_conn, sf_conn, airflow_db, monkeypatch, tmp_path):
    """dag.test(): the first run creates both ways, a second run writes nothing."""
    monkeypatch.setenv("COSELL_STAGING_URL", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_COSELL_STATE", f'{{"conn_type": "generic", "host": "sqlite:///{tmp_path}/state.db"}}'
    )
    pc.partner_center.seed(30, seed=5)
    pc.salesforce.seed(opportunities=15, accounts=6, flagged=6, seed=5)
    open_referrals = sum(1 for d in pc.partner_center.referrals.values() if d["status"] in ("New", "Active"))
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["cosell_sync_salesforce"]  # parsed after the DB exists
    first = dag.test()
    assert str(first.state) == "success"
    from cosell_sync.state import StateStore

    store = StateStore.from_airflow()
    summary = store.last_run("cosell_sync_salesforce")["summary"]
    assert summary["pc_to_crm"]["created"] > 0 and summary["crm_to_pc"]["created"] > 0
    assert summary["pc_to_crm"]["failed"] == 0 and summary["crm_to_pc"]["failed"] == 0
    assert len(store.get_links("salesforce")) == summary["pc_to_crm"]["created"] + summary["crm_to_pc"]["created"]
    assert summary["pc_to_crm"]["created"] == open_referrals  # every open referral got its opportunity

    second = dag.test()
    assert str(second.state) == "success"
    again = store.last_run("cosell_sync_salesforce")["summary"]
    writes = sum(again[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))
    assert writes == 0, again


def test_unknown_conf_keys_fail_the_run_naming_the_allowed_ones(dagbag):
    from airflow.sdk.exceptions import AirflowFailException

    from cosell_sync.dag_factory import check_conf

    allowed = list(dagbag.dags["cosell_sync_salesforce"].params)
    with pytest.raises(AirflowFailException, match=r"conf: referal_ids\. Allowed keys: dry_run, referral_ids, full"):
        check_conf({"referal_ids": ["r1"], "dry_run": True}, allowed)
    check_conf({"dry_run": True, "referral_ids": ["r1"]}, allowed)
    check_conf(None, allowed)


def test_the_mapping_variable_points_the_dag_at_a_copy(tmp_path, monkeypatch):
    """The header of the shipped mappings: point the ``cosell_mapping_<crm>`` Airflow Variable at
    a copy. The Variable is read at parse time (a broken copy fails the parse, naming the key),
    and wins over ``$COSELL_MAPPING_<CRM>``."""
    from cosell_sync.dag_factory import build_sync_dag, mapping_override
    from cosell_sync.engine.mapping import DEFAULTS, MappingError

    text = (DEFAULTS / "salesforce.yaml").read_text()
    copy = tmp_path / "mine.yaml"
    copy.write_text(text.replace("    direction: both", "    direction: sideways", 1))
    fine = tmp_path / "fine.yaml"
    fine.write_text(text)
    monkeypatch.setenv("COSELL_MAPPING_SALESFORCE", str(fine))
    monkeypatch.setenv("AIRFLOW_VAR_COSELL_MAPPING_SALESFORCE", str(copy))
    assert mapping_override("salesforce") == str(copy)
    with pytest.raises(MappingError, match=r"mine\.yaml: fields\.name\.direction: 'sideways'"):
        build_sync_dag("salesforce")
    monkeypatch.setenv("AIRFLOW_VAR_COSELL_MAPPING_SALESFORCE", "  ")  # blank: as if unset
    assert mapping_override("salesforce") is None
    assert build_sync_dag("salesforce").dag_id == "cosell_sync_salesforce"  # $COSELL_MAPPING_SALESFORCE


@pytest.mark.parametrize(
    ("setting", "timetable"), [("none", "NullTimetable"), ("*/5 * * * *", "CronDataIntervalTimetable")]
)
def test_sync_schedule_none_makes_a_dag_that_runs_only_when_triggered(monkeypatch, setting, timetable):
    from cosell_sync.dag_factory import build_sync_dag

    monkeypatch.setenv("AIRFLOW__COSELL__SYNC_SCHEDULE", setting)
    dag = build_sync_dag("salesforce")
    assert type(dag.timetable).__name__ == timetable
