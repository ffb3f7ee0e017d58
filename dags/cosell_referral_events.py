"""Airflow DAG ``cosell_referral_events``: syncs the referrals named by Partner Center webhook
events (stored by the receiver in the inbox), in both directions, for every configured CRM.
Built by :func:`cosell_sync.event_dag.build_events_dag`."""

from cosell_sync.event_dag import build_events_dag

dag = build_events_dag()
