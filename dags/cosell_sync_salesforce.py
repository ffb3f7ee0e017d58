"""Airflow DAG: Partner Center <-> Salesforce, both ways. All the logic is in the cosell_sync provider."""

from cosell_sync.dag_factory import build_sync_dag

dag = build_sync_dag("salesforce")
