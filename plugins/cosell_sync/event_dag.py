"""Builds ``cosell_referral_events``: the webhook-driven sync of just the referrals named by
pending inbox events, in both directions, for every configured CRM.

* **Trigger.** Event-driven scheduling: the DAG is scheduled on an Asset whose
  :class:`~airflow.sdk.AssetWatcher` runs :class:`~cosell_sync.triggers.inbox.InboxTrigger`
  in the triggerer. The trigger fires when events arrive that no run was told about yet,
  after a burst settles; asset events queued while a run is active become one next run
  (``max_active_runs=1``), so a burst coalesces into few runs.
* **One task.** ``sync_events`` claims every pending event (atomically, so two runs never
  share one), runs the same engine as the scheduled DAGs (:func:`cosell_sync.pipeline.sync`,
  with ``referral_ids``: no watermark moves) for each configured CRM, and marks the events
  done only after every CRM's sync committed. If anything fails, the claim is released and
  the task's retry (or the next event's run) takes the events again. One task rather than
  seven keeps the latency of a webhook to a few seconds.
* **Isolated runs.** Before syncing, the task takes the lease of every configured CRM at
  once (all or none, in the state DB; the same leases the scheduled DAGs take), and each
  CRM's commit releases its own. While another run holds one, the task hands its claimed
  events back to the inbox and is rescheduled (no worker slot held) until it can take them
  all, up to ``[cosell] lease_max_wait`` (:func:`cosell_sync.dag_factory.wait_for_lease`).
* **Configured CRMs:** ``[cosell] event_crms`` (``AIRFLOW__COSELL__EVENT_CRMS``), default
  ``dynamics365,salesforce``; a CRM whose connection does not exist is skipped.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, AssetWatcher, get_current_context, task

from cosell_sync.notes import push_note, records_failure, truncate
from cosell_sync.triggers.inbox import SIGNAL_DAG, SIGNAL_SIDE, InboxTrigger

DAG_ID = SIGNAL_DAG
log = logging.getLogger(__name__)

INBOX_ASSET = Asset(
    name="cosell_referral_inbox",
    uri="cosell://state/referral-inbox",
    watchers=[AssetWatcher(name="cosell_referral_inbox_watcher", trigger=InboxTrigger())],
)


def configured_crms() -> list[str]:
    """The CRMs to sync events to: ``[cosell] event_crms`` whose connection exists."""
    from airflow.configuration import conf
    from airflow.sdk.exceptions import AirflowNotFoundException

    from cosell_sync.crms import CRMS, NAMES

    wanted = conf.get("cosell", "event_crms", fallback=",".join(NAMES))
    configured = []
    for name in (c.strip() for c in wanted.split(",") if c.strip()):
        if name not in CRMS:
            raise ValueError(f"[cosell] event_crms: unknown CRM {name!r} (known: {', '.join(NAMES)})")
        try:
            CRMS[name].connection()  # or a deprecated id, with a warning
        except AirflowNotFoundException:
            log.info("%s: no connection %s; not syncing events to it", name, CRMS[name].conn_id)
            continue
        configured.append(name)
    return configured


def sync_events(run_id: str) -> dict[str, Any]:
    """Claim the pending events, sync their referrals to every configured CRM, mark them done.

    While another run holds a CRM's lease, the events go back to the inbox and the task is
    rescheduled (:func:`~cosell_sync.dag_factory.wait_for_lease`)."""
    from cosell_sync import pipeline
    from cosell_sync.dag_factory import (
        lease_ttl,
        mapping_override,
        staging_root,
        state_store,
        sync_sides,
        wait_for_lease,
    )
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.state import LeaseHeldError

    store = state_store()
    claimed = store.inbox_claim(run_id)
    if not claimed:
        log.info("no pending webhook events (another run took them)")
        return {"events": 0, "referrals": 0, "reports": {}}
    referral_ids = sorted({str(r["referral_id"]) for r in claimed})
    log.info("%d webhook event(s) for %d referral(s)", len(claimed), len(referral_ids))
    reports: dict[str, Any] = {}
    crms: list[str] = []
    busy: LeaseHeldError | None = None
    try:
        crms = configured_crms()
        ttl = lease_ttl()
        try:
            leases = store.acquire_leases({crm: f"{DAG_ID}.{crm}" for crm in crms}, run_id, ttl)
        except LeaseHeldError as held:
            busy = held
        for crm in crms if busy is None else []:
            mapping = load_mapping(crm, mapping_override(crm))
            job = pipeline.SyncJob(
                crm=crm,
                dag_id=f"{DAG_ID}.{crm}",
                run_id=run_id,
                mapping=mapping,
                staging=staging_root(),
                referral_ids=referral_ids,
                lease_epoch=leases[crm].epoch,
                lease_ttl=ttl,
            )
            pc_side, crm_side = sync_sides(crm, mapping)
            reports[crm] = pipeline.sync(job, pc_side, crm_side, store)  # releases the CRM's lease once committed
            log.info("sync report:\n%s", pipeline.format_report(job.dag_id, reports[crm]))
    except BaseException:
        released = store.inbox_release(run_id)
        for crm in crms:  # a new try reads everything again: nothing to keep them for
            store.release_lease(crm, f"{DAG_ID}.{crm}", run_id)
        log.warning("the sync failed: %d event(s) handed back to the inbox", released)
        raise
    if busy is not None:
        released = store.inbox_release(run_id)
        log.info("%d event(s) handed back to the inbox while this run waits", released)
        wait_for_lease(busy, get_current_context())
    store.inbox_done(run_id, [r["id"] for r in claimed])
    _rearm(store, claimed_at=min(r["claimed_at"] for r in claimed))
    return {"events": len(claimed), "referrals": len(referral_ids), "reports": reports}


def events_note(result: dict[str, Any]) -> str:
    """The run's note: how many events for how many referrals, then each CRM's report."""
    from cosell_sync.pipeline import format_report

    if not result["events"]:
        return f"**{DAG_ID}** · no pending webhook events (an earlier run took them)"
    head = f"**{DAG_ID}** · {result['events']} webhook event(s) for {result['referrals']} referral(s)"
    reports = [format_report(f"{DAG_ID}.{crm}", report, crm) for crm, report in result["reports"].items()]
    return truncate("\n\n".join([head, *reports]))


def _rearm(store: Any, claimed_at: datetime | None = None) -> None:
    """Events that arrived during this run but were stamped before the trigger's last signal
    (two receivers racing) would otherwise wait for the next event: move the signal back.

    Not when the trigger signalled after this run claimed its events (``claimed_at``): that
    signal queued a next run, which claims every event pending when it starts, these too.
    Moving the signal back then only made the trigger fire again for events it had already
    signalled: one more, empty, run that a new event's run queued behind (seconds of latency)."""
    pending, newest = store.inbox_newest_pending()
    signal = _signal_row(store)
    if not pending or newest is None or signal is None or newest > signal["value"]:
        return
    if claimed_at is not None and signal["run_id"] == "triggerer" and signal["updated_at"] > claimed_at:
        return
    store.set_watermark(
        SIGNAL_DAG, SIGNAL_SIDE, newest - timedelta(microseconds=1), run_id="rearm", allow_backwards=True
    )


def _signal_row(store: Any) -> dict[str, Any] | None:
    """The trigger's signal: the newest arrival signalled (``value``), who wrote it
    (``run_id``: ``triggerer`` or ``rearm``) and when (``updated_at``), all UTC."""
    return store.get_watermark_row(SIGNAL_DAG, SIGNAL_SIDE)


def build_events_dag() -> DAG:
    from cosell_sync.dag_factory import task_default_args

    with DAG(
        dag_id=DAG_ID,
        description="Webhook-driven sync of the referrals named by Partner Center events",
        schedule=[INBOX_ASSET],
        max_active_runs=1,
        catchup=False,
        tags=["cosell", "webhooks"],
        doc_md=__doc__,
        default_args=task_default_args(),
    ) as dag:

        @task(task_id="sync_events", multiple_outputs=False)
        @records_failure
        def run() -> dict[str, Any]:
            result = sync_events(get_current_context()["run_id"])
            push_note(events_note(result))  # the run's note (the plugin's listener writes it)
            return result

        run()
    return dag
