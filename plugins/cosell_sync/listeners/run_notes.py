"""Writes each sync run's report into the DAG run's note, so the grid view shows it.

Tasks run through the Task SDK and cannot write a DAG run's note; the scheduler can. This
listener runs where the DAG run's state is decided (the scheduler, or ``dag.test()``),
reads the summary that ``commit_state`` recorded in the state DB for that run, and sets
the note. A failed run gets a note naming the failed tasks. Errors here are logged and
never affect the run.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl
from sqlalchemy.orm import object_session

from cosell_sync.triggers.inbox import SIGNAL_DAG as EVENTS_DAG

log = logging.getLogger(__name__)

NOTE_LIMIT = 1000  # dag_run_note.content is String(1000)


def _summaries(dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The committed reports of a run, by the name they were recorded under: the DAG's own
    id, or for the event-driven DAG one per CRM (``cosell_referral_events.<crm>``)."""
    from cosell_sync.state import StateStore  # imported here: every process loads plugins, few write notes
    from cosell_sync.state.store import CRMS

    names = [f"{dag_id}.{crm}" for crm in sorted(CRMS)] if dag_id == EVENTS_DAG else [dag_id]
    store = StateStore.from_airflow()
    try:
        store.migrate()
        rows = {name: store.get_run(name, run_id) for name in names}
    finally:
        store.close()
    return {name: row["summary"] for name, row in rows.items() if row is not None}


def note_for(dag_id: str, run_id: str, failed_tasks: list[str]) -> str | None:
    """The note for a finished sync run: its report(s), and the failed tasks if any."""
    from cosell_sync.sync.runner import format_report

    summaries = _summaries(dag_id, run_id)
    parts = []
    if failed_tasks:
        parts.append("run failed in: " + ", ".join(sorted(failed_tasks)))
    parts.extend(format_report(name, summary) for name, summary in summaries.items())
    if not summaries and failed_tasks:
        parts.append("nothing was committed; the next run retries")
    text = "\n".join(parts)
    return text[: NOTE_LIMIT - 1] + "…" if len(text) > NOTE_LIMIT else text or None


def _ours(note: str | None, dag_id: str) -> bool:
    """Is the current note empty or one this listener wrote (a failed try's, before a rerun)?"""
    return note is None or note.startswith(("run failed in:", dag_id))


def _write(dag_run: Any, text: str) -> None:
    """Set the note in the session that holds the run (the scheduler's, committed with the
    run's new state), or in a session of our own when the run is detached (``dag.test()``).
    A note a person wrote is never overwritten."""
    session = object_session(dag_run)
    if session is not None:
        if _ours(dag_run.note, dag_run.dag_id):
            dag_run.note = text
        return
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as own:
        row = own.get(DagRun, dag_run.id)
        if row is not None and _ours(row.note, row.dag_id):
            row.note = text


def _set_note(dag_run: Any, failed: bool) -> None:
    dag_id, run_id = dag_run.dag_id, dag_run.run_id
    if not dag_id.startswith(("cosell_sync_", EVENTS_DAG)):
        return
    try:
        failed_tasks = []
        if failed:
            session = object_session(dag_run)
            tis = dag_run.get_task_instances(session=session) if session else dag_run.get_task_instances()
            failed_tasks = [ti.task_id for ti in tis if str(ti.state) in ("failed", "upstream_failed")]
        text = note_for(dag_id, run_id, failed_tasks)
        if text:
            _write(dag_run, text)
    except Exception:
        log.exception("could not write the note of %s %s", dag_id, run_id)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _set_note(dag_run, failed=False)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _set_note(dag_run, failed=True)
