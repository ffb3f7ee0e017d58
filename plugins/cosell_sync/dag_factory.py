"""Builds the sync DAGs (``cosell_sync_dynamics365``, ``cosell_sync_salesforce``).

The DAG files in ``dags/`` are one line each; everything here is wiring: each task
rebuilds its :class:`~cosell_sync.sync.runner.SyncJob` from a small spec (passed by XCom)
and runs one step. Frames travel as Parquet in the staging area, never through XCom.

* Schedule: every 15 minutes with real data intervals (``CronDataIntervalTimetable``),
  ``max_active_runs=1``. Scheduled and manual runs read each side since its committed
  watermark (minus an overlap); backfill runs read exactly their data interval and never
  move the live watermark.
* Params (a form in the UI): ``dry_run``, ``referral_ids``, ``full_resync``, ``directions``.
* The mapping is loaded (and validated) when the DAG file is parsed: a broken mapping is
  an import error naming the key, never a failed run.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, ObjectStoragePath, Param, get_current_context, task

from cosell_sync.engine.mapping import load_mapping

SCHEDULE = "*/15 * * * *"
log = logging.getLogger(__name__)
DIRECTION_CHOICES = {"both": ("pc_to_crm", "crm_to_pc"), "pc_to_crm": ("pc_to_crm",), "crm_to_pc": ("crm_to_pc",)}


def staging_root() -> ObjectStoragePath:
    """``$COSELL_STAGING_URL`` (e.g. ``s3://bucket/cosell``) or a folder under ``$AIRFLOW_HOME``."""
    url = os.environ.get("COSELL_STAGING_URL")
    if not url:
        home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
        url = f"file://{home / 'cosell' / 'staging'}"
    return ObjectStoragePath(url)


def sync_sides(crm: str, mapping: Any) -> tuple[Any, Any]:
    """(Partner Center side, CRM side) on the default connections."""
    from cosell_sync.hooks.partner_center import PartnerCenterHook
    from cosell_sync.sync.partner_center import PartnerCenterSide

    if crm == "salesforce":
        from cosell_sync.hooks.salesforce import SalesforceSyncHook
        from cosell_sync.sync.salesforce import SalesforceSide

        crm_side: Any = SalesforceSide(SalesforceSyncHook(), mapping)
    else:
        from cosell_sync.hooks.dynamics import DynamicsHook
        from cosell_sync.sync.dynamics365 import DynamicsSide

        crm_side = DynamicsSide(DynamicsHook(), mapping)
    return PartnerCenterSide(PartnerCenterHook(), mapping), crm_side


def _job(spec: dict[str, Any]) -> Any:
    from cosell_sync.sync.runner import SyncJob

    def when(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    return SyncJob(
        crm=spec["crm"],
        dag_id=spec["dag_id"],
        run_id=spec["run_id"],
        mapping=load_mapping(spec["crm"], spec.get("mapping_path")),
        staging=ObjectStoragePath(spec["staging"]),
        since_pc=when(spec["since_pc"]),
        since_crm=when(spec["since_crm"]),
        until=when(spec["until"]),
        referral_ids=spec["referral_ids"],
        directions=tuple(spec["directions"]),
        dry_run=spec["dry_run"],
        backfill=spec["backfill"],
    )


def state_store() -> Any:
    """The state DB of the ``cosell_state`` connection, migrated."""
    from cosell_sync.state import StateStore

    store = StateStore.from_airflow()
    store.migrate()
    return store


def build_sync_dag(crm: str, *, mapping_path: str | None = None, schedule: str = SCHEDULE) -> DAG:
    mapping = load_mapping(crm, mapping_path)  # fails at parse time, naming the key
    dag_id = f"cosell_sync_{crm}"
    label = {"dynamics365": "Dynamics 365", "salesforce": "Salesforce"}[crm]

    with DAG(
        dag_id=dag_id,
        description=f"Partner Center referrals <-> {label} opportunities, both ways",
        schedule=CronDataIntervalTimetable(schedule, timezone="UTC"),
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        tags=["cosell", crm],
        doc_md=__doc__,
        params={
            "dry_run": Param(False, type="boolean", description="Plan and report; write nothing."),
            "referral_ids": Param(
                [],
                type="array",
                items={"type": "string"},
                description="Sync just these referrals (and their opportunities).",
            ),
            "full_resync": Param(False, type="boolean", description="Ignore the watermarks: read everything."),
            "directions": Param(
                "both", type="string", enum=list(DIRECTION_CHOICES), description="Both directions, or only one."
            ),
        },
    ) as dag:

        @task
        def prepare() -> dict[str, Any]:
            """The run's window and options: small, so it can travel by XCom."""
            from cosell_sync.sync.runner import window

            context = get_current_context()
            params = context["params"]
            dag_run = context["dag_run"]
            run_type = getattr(dag_run, "run_type", None)
            backfill = getattr(run_type, "value", run_type) == "backfill"
            if backfill:
                since_pc = since_crm = context["data_interval_start"]
                until = context["data_interval_end"]
            else:
                since_pc, since_crm = window(state_store(), dag_id, full_resync=bool(params["full_resync"]))
                until = None
            ids = [str(i) for i in params.get("referral_ids") or []]
            return {
                "crm": crm,
                "dag_id": dag_id,
                "run_id": context["run_id"],
                "mapping_path": mapping_path,
                "staging": str(staging_root()),
                "since_pc": since_pc.isoformat() if since_pc else None,
                "since_crm": since_crm.isoformat() if since_crm else None,
                "until": until.isoformat() if until else None,
                "referral_ids": ids or None,
                "directions": list(DIRECTION_CHOICES[params["directions"]]),
                "dry_run": bool(params["dry_run"]),
                "backfill": backfill,
            }

        @task
        def extract_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            pc_side, _ = sync_sides(crm, job.mapping)
            return runner.extract_partner_center(job, pc_side, state_store())

        @task
        def extract_crm(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            _, crm_side = sync_sides(crm, job.mapping)
            return runner.extract_crm(job, crm_side, state_store())

        @task
        def plan(spec: dict[str, Any]) -> dict[str, Any]:
            from cosell_sync.sync import runner

            return runner.plan_run(_job(spec), state_store())

        @task
        def load_crm(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            _, crm_side = sync_sides(crm, job.mapping)
            return runner.load_crm(job, crm_side)

        @task
        def load_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            pc_side, crm_side = sync_sides(crm, job.mapping)
            return runner.load_partner_center(job, pc_side, crm_side)

        @task
        def commit_state(spec: dict[str, Any]) -> dict[str, Any]:
            from cosell_sync.sync import runner

            return runner.commit(_job(spec), state_store())

        @task
        def report(spec: dict[str, Any], summary: dict[str, Any]) -> str:
            from cosell_sync.sync.runner import format_report

            text = format_report(spec["dag_id"], summary)
            log.info("sync report:\n%s", text)
            return text

        spec = prepare()
        planned = plan(spec)
        [extract_partner_center(spec), extract_crm(spec)] >> planned
        to_crm = load_crm(spec)
        to_pc = load_partner_center(spec)
        committed = commit_state(spec)
        planned >> to_crm >> to_pc >> committed
        report(spec, committed)

    dag.doc_md = f"**{dag_id}**: mapping `{mapping.source}`.\n\n" + (__doc__ or "")
    return dag
