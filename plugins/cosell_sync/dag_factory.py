"""Builds the sync DAGs (``cosell_sync_dynamics365``, ``cosell_sync_salesforce``).

The DAG files in ``dags/`` are one line each; everything here is wiring: each task
rebuilds its :class:`~cosell_sync.sync.runner.SyncJob` from a small spec (passed by XCom)
and runs one step. Frames travel as Parquet in the staging area, never through XCom.

* Schedule: every 15 minutes (``[cosell] sync_schedule``, a cron expression) with real data
  intervals (``CronDataIntervalTimetable``), ``max_active_runs=1``. Scheduled and manual
  runs read each side since its committed watermark (minus an overlap); backfill runs read
  exactly their data interval and never move the live watermark.
* The schedule waits for the initial load: until a manual run (``dry_run`` off) has
  committed once, scheduled runs skip and say so in their note. So a newcomer who
  unpauses the DAG to preview a dry run gets no sync they did not ask for. Set
  ``[cosell] scheduled_initial_load = True`` to let the schedule do the initial load.
* Params (a form in the UI): ``dry_run``, ``referral_ids``, ``full_resync``, ``directions``.
  Any other key in a run's conf fails the run at ``prepare``, naming the allowed keys.
* Notes: the ``report`` task hands the run's report to the plugin's listener, which writes
  it into the DAG run note; a failing task hands over its cause
  (:mod:`cosell_sync.notes`).
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
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from cosell_sync.engine.mapping import load_mapping
from cosell_sync.notes import push_note, records_failure

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


def _setting(key: str, default: str) -> str:
    from airflow.sdk import conf

    return str(conf.get("cosell", key, fallback=default))


def check_conf(conf: dict[str, Any] | None, allowed: list[str]) -> None:
    """A run's conf may only hold the DAG's params: a misspelt key must not widen a run."""
    unknown = sorted(set(conf or {}) - set(allowed))
    if unknown:
        raise AirflowFailException(
            f"unknown key(s) in the run's conf: {', '.join(unknown)}. Allowed keys: {', '.join(allowed)}."
        )


def waiting_note(dag_id: str) -> str:
    return (
        f"**{dag_id}** · waiting for the initial load\n\n"
        "Scheduled runs start syncing once a first real run has loaded both sides. "
        "Trigger this DAG with `dry_run` on to preview what it would write, then with `dry_run` off "
        "to do the initial load. (`[cosell] scheduled_initial_load = True` lets the schedule do it.)"
    )


def build_sync_dag(crm: str, *, mapping_path: str | None = None, schedule: str | None = None) -> DAG:
    mapping = load_mapping(crm, mapping_path)  # fails at parse time, naming the key
    schedule = schedule or _setting("sync_schedule", SCHEDULE)
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
        @records_failure
        def prepare() -> dict[str, Any]:
            """The run's window and options: small, so it can travel by XCom."""
            from cosell_sync.sync.runner import initial_load_done, window

            context = get_current_context()
            params = context["params"]
            dag_run = context["dag_run"]
            check_conf(getattr(dag_run, "conf", None), list(dag.params))
            run_type = getattr(dag_run, "run_type", None)
            run_type = getattr(run_type, "value", run_type)
            backfill = run_type == "backfill"
            if (
                run_type == "scheduled"
                and _setting("scheduled_initial_load", "False").lower() not in ("true", "1", "yes")
                and not initial_load_done(state_store(), dag_id)
            ):
                push_note(waiting_note(dag_id))
                raise AirflowSkipException("waiting for the initial load: a first manual run (dry_run off)")
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
        @records_failure
        def extract_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            pc_side, _ = sync_sides(crm, job.mapping)
            return runner.extract_partner_center(job, pc_side, state_store())

        @task
        @records_failure
        def extract_crm(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            _, crm_side = sync_sides(crm, job.mapping)
            return runner.extract_crm(job, crm_side, state_store())

        @task
        @records_failure
        def plan(spec: dict[str, Any]) -> dict[str, Any]:
            from cosell_sync.sync import runner

            return runner.plan_run(_job(spec), state_store())

        @task
        @records_failure
        def load_crm(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            _, crm_side = sync_sides(crm, job.mapping)
            return runner.load_crm(job, crm_side)

        @task
        @records_failure
        def load_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            from cosell_sync.sync import runner

            job = _job(spec)
            pc_side, crm_side = sync_sides(crm, job.mapping)
            return runner.load_partner_center(job, pc_side, crm_side)

        @task
        @records_failure
        def commit_state(spec: dict[str, Any]) -> dict[str, Any]:
            from cosell_sync.sync import runner

            return runner.commit(_job(spec), state_store())

        @task
        @records_failure
        def report(spec: dict[str, Any], summary: dict[str, Any]) -> str:
            from cosell_sync.sync.runner import format_report

            text = format_report(spec["dag_id"], summary, spec["crm"])
            log.info("sync report:\n%s", text)
            push_note(text)  # the run's note (the plugin's listener writes it)
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
