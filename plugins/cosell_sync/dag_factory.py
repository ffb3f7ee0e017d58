"""Builds the sync DAGs (``cosell_sync_dynamics365``, ``cosell_sync_salesforce``).

The DAG files in ``dags/`` are one line each; everything here is wiring: each task
rebuilds its :class:`~cosell_sync.pipeline.SyncJob` from a small spec (passed by XCom)
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
* Isolated runs: ``prepare`` takes the CRM's lease in the state DB (not for a dry run), every
  later task renews it, ``commit_state`` checks it in the commit's transaction and releases
  it; a task that fails for good releases it too. While another run (of this DAG, a backfill
  or ``cosell_referral_events``) holds it, ``prepare`` is rescheduled every ``[cosell]
  lease_poll_interval`` seconds (no worker slot held), up to ``[cosell] lease_max_wait``
  (:mod:`cosell_sync.pipeline.lease`).
* Task retries: every task is retried ``[cosell] task_retries`` times (default 3) with
  exponential backoff (the delay doubles from ``[cosell] task_retry_delay``, 30 s, up to
  ``[cosell] task_max_retry_delay``, 600 s): a transient fault that outlasted the hooks' own
  retries costs a try, not the run. The steps are idempotent, so a retry redoes a step safely;
  a task that will be retried keeps its run's lease, and its last failed try releases it.
* Notes: the ``report`` task hands the run's report to the plugin's listener, which writes
  it into the DAG run note; a failing task hands over its cause
  (:mod:`cosell_sync.notes`).
* The mapping is loaded (and validated) when the DAG file is parsed: a broken mapping is
  an import error naming the key, never a failed run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from airflow.sdk import (
    DAG,
    Asset,
    CronDataIntervalTimetable,
    ExceptionRetryPolicy,
    ObjectStoragePath,
    Param,
    RetryAction,
    RetryRule,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from cosell_sync import crms
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.notes import push_note, records_failure

SCHEDULE = "*/15 * * * *"
MAPPING_VARIABLE = "cosell_mapping_{crm}"  # the Airflow Variable naming a CRM's mapping file
log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_MAX_WAIT = timedelta(hours=3)
LEASE_POLL_INTERVAL = timedelta(seconds=15)
TASK_RETRIES = 3
TASK_RETRY_DELAY = timedelta(seconds=30)
TASK_MAX_RETRY_DELAY = timedelta(minutes=10)
# Failures another try cannot mend: a wrong secret or refresh token, a bad connection or setting.
NO_RETRY: tuple[type[BaseException], ...] = (AuthenticationError, ConfigurationError)
RETRY_BACKOFF = 2.0  # Airflow 3's retry_exponential_backoff is the multiplier (True would mean 1: constant)
DIRECTION_CHOICES = {"both": ("pc_to_crm", "crm_to_pc"), "pc_to_crm": ("pc_to_crm",), "crm_to_pc": ("crm_to_pc",)}


# Lineage: what the sync DAGs read and write, so Airflow's asset graph shows it. The extract
# tasks declare what they read (inlets), the load tasks what they write (outlets).
REFERRALS_ASSET = Asset(name="partner_center_referrals", uri="cosell://partner-center/referrals", group="cosell")


def opportunities_asset(crm: str) -> Asset:
    """The CRM's opportunities, as an Asset (``cosell://<crm>/opportunities``)."""
    return Asset(name=f"{crm}_opportunities", uri=f"cosell://{crm}/opportunities", group="cosell")


def staging_root() -> ObjectStoragePath:
    """``$COSELL_STAGING_URL`` (e.g. ``s3://bucket/cosell``) or a folder under ``$AIRFLOW_HOME``."""
    url = os.environ.get("COSELL_STAGING_URL")
    if not url:
        home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
        url = f"file://{home / 'cosell' / 'staging'}"
    return ObjectStoragePath(url)


def sync_sides(crm: str, mapping: Any, choices: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(Partner Center side, CRM side) on the default connections; ``choices``: the Dataverse
    options ``prepare`` read (:func:`check_mapping`), else the side reads them."""
    from cosell_sync.hooks.partner_center import PartnerCenterHook
    from cosell_sync.sides.partner_center import PartnerCenterSide

    entry = crms.get(crm)
    hook, side = entry.hook_class()(), entry.side_class()
    # Dataverse options read by ``prepare`` travel with the run; Salesforce reads no options.
    crm_side = side(hook, mapping, choices) if crm == crms.DYNAMICS365 else side(hook, mapping)
    return PartnerCenterSide(PartnerCenterHook(), mapping), crm_side


def check_mapping(crm: str, mapping: Any) -> dict[str, dict[str, int]]:
    """At the start of a run, the mapping's choice values against the CRM org's metadata (Dataverse
    option sets, Salesforce picklists): a value the org lacks fails the run here, naming the file,
    the field and the value. Returns the Dataverse options read, which travel in the run's spec so
    that no later task reads the metadata again."""
    entry = crms.get(crm)
    if crm == crms.DYNAMICS365:
        from cosell_sync.sides.dynamics365 import check_choices

        return check_choices(entry.hook_class()(), mapping)
    return entry.side_class()(entry.hook_class()(), mapping).check_mapping()


def _job(spec: dict[str, Any]) -> Any:
    from cosell_sync.pipeline import SyncJob

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
        lease_epoch=spec.get("lease_epoch"),
        lease_ttl=timedelta(seconds=float(spec.get("lease_ttl") or lease_ttl().total_seconds())),
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


def _seconds(key: str, default: timedelta) -> timedelta:
    raw = _setting(key, str(default.total_seconds()))
    try:
        value = float(raw)
    except ValueError:
        raise AirflowFailException(f"[cosell] {key} must be a positive number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise AirflowFailException(f"[cosell] {key} must be a positive number of seconds, got {value:g}")
    return timedelta(seconds=value)


def lease_ttl() -> timedelta:
    """``[cosell] lease_ttl`` (seconds): how long a run's CRM lease outlives its last renewal."""
    from cosell_sync.pipeline.lease import LEASE_TTL

    return _seconds("lease_ttl", LEASE_TTL)


def task_default_args() -> dict[str, Any]:
    """The default arguments of every task of the sync and event DAGs (read when the DAG file
    is parsed; a bad value is an import error naming the setting):

    * retries, from ``[cosell] task_retries``, ``task_retry_delay`` and ``task_max_retry_delay``;
    * the Celery queue, from ``[cosell] queue`` when set (SPEC §8: a worker dedicated to the
      sync, ``airflow celery worker --queues <queue>``); Airflow's ``[operators] default_queue``
      otherwise."""
    raw = _setting("task_retries", str(TASK_RETRIES)).strip()
    try:
        retries = int(raw)
    except ValueError:
        retries = -1
    if retries < 0:
        raise ValueError(f"[cosell] task_retries must be a whole number >= 0, got {raw!r}")
    delay = _seconds("task_retry_delay", TASK_RETRY_DELAY)
    max_delay = _seconds("task_max_retry_delay", TASK_MAX_RETRY_DELAY)
    args: dict[str, Any] = {
        "retries": retries,
        "retry_delay": delay,
        "retry_exponential_backoff": RETRY_BACKOFF,
        "max_retry_delay": max(max_delay, delay),
        "retry_policy": ExceptionRetryPolicy(
            rules=[RetryRule(exception=list(NO_RETRY), action=RetryAction.FAIL, reason="not mended by another try")]
        ),
    }
    queue = _setting("queue", "").strip()
    if queue:
        args["queue"] = queue
    return args


def wait_for_lease(busy: Exception, context: Any) -> NoReturn:
    """Another run holds the lease: reschedule this task (its worker slot is freed; a
    reschedule is not a try, so retries stay untouched), or fail naming the holder once the
    task has waited ``[cosell] lease_max_wait`` since its first reschedule."""
    from airflow.sdk.exceptions import AirflowRescheduleException

    now = datetime.now(UTC)
    first = None
    try:
        first = context["ti"].get_first_reschedule_date(context)
    except Exception:  # no reschedule history to ask for (e.g. outside a task process)
        log.debug("no first reschedule date", exc_info=True)
    waited = now - (first or now)
    max_wait = _seconds("lease_max_wait", LEASE_MAX_WAIT)
    if waited >= max_wait:
        raise AirflowFailException(
            f"gave up after waiting {waited} for the lease ([cosell] lease_max_wait is {max_wait}): {busy}"
        )
    poll = _seconds("lease_poll_interval", LEASE_POLL_INTERVAL)
    log.info("Waiting for another run to commit: %s. Waited %s; trying again in %s.", busy, waited, poll)
    raise AirflowRescheduleException(now + poll)


def _failed_for_good(exc: BaseException) -> bool:
    """Will Airflow give up on this task after ``exc`` (no retry left, or a no-retry failure)?"""
    if isinstance(exc, (AirflowFailException, *NO_RETRY)):  # NO_RETRY: the tasks' retry_policy fails them
        return True
    try:
        ti = get_current_context()["ti"]
        return int(ti.try_number) > int(ti.max_tries)
    except Exception:  # unknown: keep the lease (its expiry frees it)
        return False


def _later_try() -> bool:
    """Is this a retried or cleared task (try 2 or later)?"""
    try:
        return int(get_current_context()["ti"].try_number) > 1
    except Exception:  # outside a task: behave like a retry
        return True


def side_step(name: str) -> Callable[[Any, Any, Any, Any], Any]:
    """The pipeline call of the sync DAG's task ``name``, as ``(job, store, partner_center_side,
    crm_side)``: one table for the DAG's tasks and the throughput benchmark."""
    from cosell_sync import pipeline

    steps: dict[str, Callable[[Any, Any, Any, Any], Any]] = {
        "extract_partner_center": lambda job, store, pc, _crm: pipeline.extract_partner_center(job, pc, store),
        "extract_crm": lambda job, store, _pc, crm_side: pipeline.extract_crm(job, crm_side, store),
        "plan": pipeline.plan_run,
        "load_crm": lambda job, _store, _pc, crm_side: pipeline.load_crm(job, crm_side),
        "load_partner_center": lambda job, _store, pc, crm_side: pipeline.load_partner_center(job, pc, crm_side),
    }
    return steps[name]


def run_side_step(spec: dict[str, Any], name: str) -> Any:
    """:func:`run_step` for the task ``name``, whose step works through the run's sides (:func:`side_step`)."""
    call = side_step(name)

    def step(job: Any, store: Any) -> Any:
        pc_side, crm_side = sync_sides(spec["crm"], job.mapping, spec.get("choices"))
        return call(job, store, pc_side, crm_side)

    return run_step(spec, step)


def run_step(spec: dict[str, Any], step: Callable[[Any, Any], T]) -> T:
    """One step of the run under its CRM lease: renewed before and during the step (a first
    try never takes back a lease its run released after another task failed for good: the
    parallel extract must not block other runs); lost to another run, the task fails without
    retrying (its plan may be stale); failed for good, the lease is released so that other
    runs need not wait for it to expire."""
    from cosell_sync.pipeline import lease
    from cosell_sync.state import LeaseLostError

    job, store = _job(spec), state_store()
    try:
        with lease.kept(job, store, revive=_later_try()):
            return step(job, store)
    except LeaseLostError as exc:
        raise AirflowFailException(str(exc)) from exc
    except (AirflowSkipException, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if job.lease_epoch is not None and _failed_for_good(exc):
            try:
                if lease.release(job, store):
                    log.info("the run failed: its %s lease is released", job.crm)
            except Exception:  # the expiry frees it
                log.warning("could not release the %s lease", job.crm, exc_info=True)
        raise


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


def mapping_override(crm: str) -> str | None:
    """The mapping file chosen for ``crm`` by the ``cosell_mapping_<crm>`` Airflow Variable (a
    path), or None when it is unset or blank (then ``$COSELL_MAPPING_<CRM>``, else the shipped
    default: :func:`~cosell_sync.engine.mapping.load_mapping`).

    Read when a DAG file is parsed, so a broken copy fails the parse naming its key, and the
    run's tasks (which parse the file again) use the same file. One lookup through Airflow's
    secrets backends, the environment (``AIRFLOW_VAR_COSELL_MAPPING_<CRM>``) first."""
    from airflow.sdk import Variable

    value = Variable.get(MAPPING_VARIABLE.format(crm=crm), default=None)
    text = "" if value is None else str(value).strip()
    return text or None


def build_sync_dag(crm: str, *, mapping_path: str | None = None, schedule: str | None = None) -> DAG:
    mapping_path = mapping_path or mapping_override(crm)
    mapping = load_mapping(crm, mapping_path)  # fails at parse time, naming the key
    schedule = schedule or _setting("sync_schedule", SCHEDULE)
    # "none": no schedule, runs only when triggered (by hand, the API or the webhook's events).
    timetable = None if schedule.strip().lower() == "none" else CronDataIntervalTimetable(schedule, timezone="UTC")
    dag_id = f"cosell_sync_{crm}"
    label = crms.get(crm).label
    opportunities = opportunities_asset(crm)

    with DAG(
        dag_id=dag_id,
        description=f"Partner Center referrals <-> {label} opportunities, both ways",
        schedule=timetable,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        tags=["cosell", crm],
        doc_md=__doc__,
        default_args=task_default_args(),
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
        # multiple_outputs=False on every task: TaskFlow infers True from a ``dict`` return
        # annotation, and would then push each key as an XCom of its own besides the whole value
        # (16 execution-API calls and metadata rows for ``prepare``'s spec): nothing reads them.
        @task(multiple_outputs=False)
        @records_failure
        def prepare() -> dict[str, Any]:
            """The run's window and options: small, so it can travel by XCom."""
            from cosell_sync.pipeline import initial_load_done, window

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
            choices = check_mapping(crm, load_mapping(crm, mapping_path))
            spec = {
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
                "lease_ttl": lease_ttl().total_seconds(),
                "choices": choices,
            }
            if not spec["dry_run"]:  # a dry run commits nothing: it needs no lease and blocks no run
                from cosell_sync.state import LeaseHeldError

                try:
                    taken = state_store().acquire_lease(crm, dag_id, context["run_id"], lease_ttl())
                except LeaseHeldError as busy:
                    wait_for_lease(busy, context)
                spec["lease_epoch"] = taken.epoch
            return spec

        @task(multiple_outputs=False, inlets=[REFERRALS_ASSET])
        @records_failure
        def extract_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            return run_side_step(spec, "extract_partner_center")

        @task(multiple_outputs=False, inlets=[opportunities])
        @records_failure
        def extract_crm(spec: dict[str, Any]) -> dict[str, int]:
            return run_side_step(spec, "extract_crm")

        @task(multiple_outputs=False)
        @records_failure
        def plan(spec: dict[str, Any]) -> dict[str, Any]:
            return run_side_step(spec, "plan")

        @task(multiple_outputs=False, inlets=[REFERRALS_ASSET], outlets=[opportunities])
        @records_failure
        def load_crm(spec: dict[str, Any]) -> dict[str, int]:
            return run_side_step(spec, "load_crm")

        @task(multiple_outputs=False, inlets=[opportunities], outlets=[REFERRALS_ASSET])
        @records_failure
        def load_partner_center(spec: dict[str, Any]) -> dict[str, int]:
            return run_side_step(spec, "load_partner_center")

        @task(multiple_outputs=False)
        @records_failure
        def commit_state(spec: dict[str, Any]) -> dict[str, Any]:
            from cosell_sync import pipeline

            return run_step(spec, pipeline.commit)

        @task(multiple_outputs=False)
        @records_failure
        def report(spec: dict[str, Any], summary: dict[str, Any]) -> str:
            from cosell_sync.pipeline import format_report

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
