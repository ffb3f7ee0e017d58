"""Lineage: the sync DAGs, parsed from the dags folder as the DAG processor parses them,
declare what they read (inlets) and write (outlets), and Airflow's serialization keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))  # examples are off (tests/conftest.py)
    assert not bag.import_errors, bag.import_errors
    return bag


def _uris(assets) -> set[str]:
    return {a.uri for a in assets}


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_sync_dags_declare_referrals_and_opportunities(dagbag, crm):
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.dags.get(f"cosell_sync_{crm}")
    assert dag is not None
    referrals, opportunities = "cosell://partner-center/referrals", f"cosell://{crm}/opportunities"
    tasks = dag.task_dict
    assert _uris(tasks["extract_partner_center"].inlets) == {referrals}
    assert _uris(tasks["extract_crm"].inlets) == {opportunities}
    assert _uris(tasks["load_crm"].outlets) == {opportunities}
    assert _uris(tasks["load_partner_center"].outlets) == {referrals}
    reads = set().union(*(_uris(t.inlets) for t in dag.tasks))
    writes = set().union(*(_uris(t.outlets) for t in dag.tasks))
    assert reads == writes == {referrals, opportunities}
    other = "dynamics365" if crm == "salesforce" else "salesforce"
    assert f"cosell://{other}/opportunities" not in reads | writes
    # what the DAG processor stores (and the asset graph is drawn from) keeps it
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert _uris(serialized.task_dict["load_crm"].outlets) == {opportunities}
    assert _uris(serialized.task_dict["extract_partner_center"].inlets) == {referrals}
