"""What a DAG run's note says: the run's report, or which task failed and why, in Markdown.

The tasks know what happened, so they say it: the last task of a run pushes its report as
the XCom :data:`NOTE_KEY`, and a task that fails pushes its cause, cleaned of anything
secret, as :data:`ERROR_KEY` (:func:`records_failure`). The plugin's listener
(:mod:`cosell_sync.listeners.run_notes`) reads those XComs once the run has finished and
writes the note. The composing here is pure and tested without Airflow.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

NOTE_KEY = "cosell_note"
ERROR_KEY = "cosell_error"
NOTE_LIMIT = 1000  # Airflow's dag_run_note.content is String(1000)
ERROR_LIMIT = 300
COSELL_DAG_PREFIXES = ("cosell_sync_", "cosell_referral_events")

F = TypeVar("F", bound=Callable[..., Any])

_SECRETS = (
    # key=value and "key": "value" pairs that carry credentials (form bodies, query strings, JSON)
    re.compile(
        r"(?i)(\b(?:client_secret|user_password|password|refresh_token|access_token|id_token|assertion|"
        r"code|security_token|sig|signature)\b[\"']?\s*[=:]\s*[\"']?)([^\"'&\s,}]+)"
    ),
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"),  # Authorization header values
    re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"),  # JWTs
)


def is_cosell_dag(dag_id: str) -> bool:
    return dag_id.startswith(COSELL_DAG_PREFIXES)


def scrub(text: str) -> str:
    """``text`` with credentials removed: values Airflow's secrets masker knows in this
    process (connection passwords and extras it has read) and anything shaped like one."""
    # The patterns first: the masker replaces known secrets even inside words (a password
    # "secret" turns "client_secret=..." into "client_***=..."), which would hide the key they read.
    text = _SECRETS[0].sub(lambda m: m.group(1) + "***", text)
    text = _SECRETS[1].sub(lambda m: m.group(1) + " ***", text)
    text = _SECRETS[2].sub("***", text)
    try:
        from airflow.sdk.log import redact  # the masker the task logs go through

        return str(redact(text))
    except Exception:  # outside a task process, or a masker that cannot run: the patterns still applied
        log.debug("secrets masker unavailable", exc_info=True)
        return text


def error_text(exc: BaseException) -> str:
    """A failed task's cause for its run's note: the exception's type and message on one line,
    without secrets, at most :data:`ERROR_LIMIT` characters."""
    message = " ".join(str(exc).split()) or "(no message)"
    text = scrub(f"{type(exc).__name__}: {message}")
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def push_note(text: str) -> None:
    """From inside a task: this is what the run's note should say."""
    from airflow.sdk import get_current_context

    get_current_context()["ti"].xcom_push(key=NOTE_KEY, value=text)


def records_failure(fn: F) -> F:
    """Wrap a task's callable: if it raises, its cause (see :func:`error_text`) is pushed as
    :data:`ERROR_KEY` for the run's note, then the exception goes on as before. A skip is
    not a failure, nor is a reschedule (a task waiting for its CRM's lease)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from airflow.sdk.exceptions import AirflowRescheduleException, AirflowSkipException

        try:
            return fn(*args, **kwargs)
        except (AirflowSkipException, AirflowRescheduleException):
            raise
        except Exception as exc:
            try:
                from airflow.sdk import get_current_context

                get_current_context()["ti"].xcom_push(key=ERROR_KEY, value=error_text(exc))
            except Exception:  # the note loses its cause; the task's own failure must stand
                log.warning("could not record the failure's cause for the run's note", exc_info=True)
            raise

    return wrapper  # type: ignore[return-value]


COSELL_PAGE = "/cosell/ui/"  # the Co-sell page (cosell_sync.ui), where a note too long for Airflow is read in full


def page_link(dag_id: str, run_id: str | None = None, base: str = "") -> str:
    """Where the whole report of a run is shown: the Co-sell page's run report, or the page."""
    from urllib.parse import quote

    root = base.rstrip("/") + COSELL_PAGE.rstrip("/")
    if run_id:
        return f"{root}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"
    return root + "/"


def compose(
    dag_id: str,
    notes: Sequence[str],
    failed_tasks: Mapping[str, str | None],
    *,
    failed: bool,
    run_id: str | None = None,
    base: str = "",
) -> str | None:
    """The note of a finished run. ``notes``: what its tasks reported (in order);
    ``failed_tasks``: task id -> recorded cause (None when the task could not record one,
    e.g. it was killed). Upstream-failed tasks are not causes, so they are not listed."""
    parts: list[str] = []
    if failed:
        where = f" in {', '.join(sorted(failed_tasks))}" if failed_tasks else ""
        lines = [f"**{dag_id}** · run failed{where}", ""]  # the first line is what the run's header shows
        for task_id, cause in sorted(failed_tasks.items()):
            reason = _inline(cause) if cause else "no cause recorded (the task was stopped?); see its log"
            lines.append(f"- `{task_id}`: {reason}")
        if not failed_tasks:
            lines.append("- no task failed by itself (the run was marked failed, or timed out)")
        if not notes:
            lines += ["", "Nothing was committed by this run: the next run does the work again."]
        parts.append("\n".join(lines))
    parts.extend(notes)
    if not parts:
        return None
    return truncate("\n\n".join(parts), link=page_link(dag_id, run_id, base))


def _inline(text: str) -> str:
    """A cause as Markdown-safe inline text."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def truncate(text: str, limit: int = NOTE_LIMIT, link: str | None = None) -> str:
    """At most ``limit`` characters, cut at a line break so a table is never half a row; with
    ``link``, the cut note ends with a Markdown link to where the whole text is shown."""
    if len(text) <= limit:
        return text
    tail = f"\n\n… [The whole report is on the Co-sell page]({link})" if link else "\n…"
    if len(tail) > limit // 2:  # a link this long cannot be kept
        tail = "\n…"
    cut = text[: limit - len(tail)]
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return cut.rstrip() + tail


def ours(note: str | None, dag_id: str) -> bool:
    """Is the current note empty, or one that cosell-sync wrote (which a rerun may replace)?
    A note a person wrote is never overwritten."""
    if not note:
        return True
    return note.startswith((f"**{dag_id}", "**cosell", "run failed in:", dag_id))
