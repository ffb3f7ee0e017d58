"""Airflow DAG: Partner Center <-> Dynamics 365, both ways. All the logic is in the cosell_sync provider."""

from cosell_sync.dag_factory import build_sync_dag

dag = build_sync_dag("dynamics365")
