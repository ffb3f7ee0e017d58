"""Writes each cosell run's report into its DAG run note, so the grid view shows it.

Tasks run through the Task SDK and cannot write a note; the scheduler's listener can. It
must never endanger the scheduler, so the hook does almost nothing where it is called:

* it reads the run's primary key from the ORM object's identity (no attribute load, no
  query, nothing touched in the scheduler's session) and hands it to a background thread;
* the thread opens a session of its own on Airflow's engine (not the thread-scoped
  ``settings.Session`` the scheduler uses), waits until the run's final state is committed,
  reads what the run's tasks reported (the XComs :data:`~cosell_sync.notes.NOTE_KEY` and
  :data:`~cosell_sync.notes.ERROR_KEY`) and its failed tasks, and writes the note;
* it never reads the cosell state DB, and every error is logged and swallowed.

A note a person wrote is kept. :func:`wait_for_notes` lets a process that ran a DAG
in-process (``dag.test()``) wait for its notes before reading them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from airflow.listeners import hookimpl

from cosell_sync.notes import ERROR_KEY, NOTE_KEY, compose, is_cosell_dag, ours

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 60.0  # seconds to wait for the run's final state to be committed
ATTEMPTS = 5

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pending: set[Future] = set()


def _executor() -> ThreadPoolExecutor:
    """One worker thread per process (made again after a fork: threads do not survive one)."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosell-run-notes")
            _pool_pid = os.getpid()
            _pending.clear()
        return _pool


def wait_for_notes(timeout: float = 60.0) -> bool:
    """Wait until every note asked for in this process is written (or given up on)."""
    with _lock:
        pending = set(_pending)
    _done, not_done = wait_futures(pending, timeout=timeout)
    return not not_done


def _schedule(dag_run: Any, failed: bool) -> None:
    try:
        from sqlalchemy import inspect

        state = inspect(dag_run)
        dag_id = state.dict.get("dag_id")  # the loaded value; never a lazy load or refresh
        if dag_id is not None and not is_cosell_dag(dag_id):
            return
        identity = state.identity
        if not identity:
            return
        future = _executor().submit(write_note, identity[0], failed)
        with _lock:
            _pending.add(future)
        future.add_done_callback(_forget)
    except Exception:
        log.exception("could not queue the run note")


def _forget(future: Future) -> None:
    with _lock:
        _pending.discard(future)


def write_note(dag_run_pk: int, failed: bool, *, settle_timeout: float = SETTLE_TIMEOUT) -> str | None:
    """Compose and store the note of the finished run ``dag_run_pk``; returns what was written."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _write_note(dag_run_pk, failed, settle_timeout)
        except Exception:
            if attempt == ATTEMPTS:
                log.exception("could not write the note of DAG run %s", dag_run_pk)
                return None
            time.sleep(0.5 * attempt)
    return None


def _write_note(dag_run_pk: int, failed: bool, settle_timeout: float) -> str | None:
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    final = DagRunState.FAILED if failed else DagRunState.SUCCESS
    with Session(bind=settings.engine, expire_on_commit=False) as session:  # ours, never the scheduler's
        deadline = time.monotonic() + settle_timeout
        while True:
            run = session.get(DagRun, dag_run_pk)
            if run is None or not is_cosell_dag(run.dag_id):
                return None
            if run.state == final or time.monotonic() >= deadline:
                break
            session.rollback()  # end the read; the next one sees what has been committed since
            session.expire_all()
            time.sleep(0.2)
        rows = session.execute(
            select(XComModel.task_id, XComModel.key, XComModel.value)
            .where(XComModel.dag_run_id == dag_run_pk, XComModel.key.in_([NOTE_KEY, ERROR_KEY]))
            .order_by(XComModel.timestamp)
        ).all()
        values = [(row.task_id, row.key, XComModel.deserialize_value(row)) for row in rows]
        notes = [str(value) for _, key, value in values if key == NOTE_KEY and value]
        causes = {task_id: str(value) for task_id, key, value in values if key == ERROR_KEY and value}
        failed_tasks: dict[str, str | None] = {}
        if failed:
            failed_ids = session.scalars(
                select(TaskInstance.task_id).where(
                    TaskInstance.dag_id == run.dag_id,
                    TaskInstance.run_id == run.run_id,
                    TaskInstance.state == TaskInstanceState.FAILED,
                )
            ).all()
            failed_tasks = {task_id: causes.get(task_id) for task_id in failed_ids}
        text = compose(run.dag_id, notes, failed_tasks, failed=failed, run_id=run.run_id, base=_base_path())
        if not text or not ours(run.note, run.dag_id) or run.note == text:
            return None
        run.note = text
        session.commit()
        return text


def _base_path() -> str:
    """The API server's path prefix (``[api] base_url``), so a note's link to the Co-sell page works behind one."""
    try:
        from urllib.parse import urlsplit

        from airflow.configuration import conf

        return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    except Exception:
        return ""


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _schedule(dag_run, failed=False)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _schedule(dag_run, failed=True)
