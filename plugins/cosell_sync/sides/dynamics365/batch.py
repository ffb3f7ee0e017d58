"""Dataverse ``$batch`` writes, chunk by chunk and concurrently, each record with its own outcome,
and reads of opportunities in ``$filter`` chunks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cosell_sync.errors import ApiError, ThrottledError, TransportError
from cosell_sync.hooks.batch import BatchRequest, BatchResponse
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.odata import with_query
from cosell_sync.sides.base import (
    WriteResult,
    fails_the_task,
)
from cosell_sync.sides.crm import Pending
from cosell_sync.sides.dynamics365.values import (
    chunks,
)

log = logging.getLogger(__name__)


PRECONDITION_FAILED = 412
DUPLICATE_RECORD = "0x80040237"  # also a 412, but about alternate keys, not versions


def response_error(resp: BatchResponse) -> tuple[str, str | None]:
    message = resp.error_message or (resp.body if isinstance(resp.body, str) and resp.body else None)
    return str(message or f"HTTP {resp.status}"), resp.error_code


def etag_or_failure(outcomes: Any) -> Callable[[Pending, BatchResponse], None]:
    """The batch callback of a PATCH: keep the new ETag, or record the part's error."""

    def answered(row: Pending, resp: BatchResponse) -> None:
        if resp.ok:
            row.etag = resp.body.get("@odata.etag") if isinstance(resp.body, dict) else None
        else:
            outcomes.fail(row, *response_error(resp))

    return answered


def version_conflict(resp: BatchResponse) -> bool:
    """A 412 that means "the row changed since its ETag was read" (not DuplicateRecord)."""
    return resp.status == PRECONDITION_FAILED and resp.error_code != DUPLICATE_RECORD


def exception_error(exc: BaseException) -> tuple[str, str | None]:
    code = getattr(exc, "code", None)
    return str(exc) or type(exc).__name__, str(code) if code else None


def _unencodable_body(request: BatchRequest) -> str | None:
    """Why a request's body cannot be sent as standard JSON (naming its fields), or None."""
    if request.body is None:
        return None
    try:
        json.dumps(request.body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fields = []
        for key, value in request.body.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                fields.append(str(key))
        return f"{type(exc).__name__}: {exc} (fields: {', '.join(fields)})"
    return None


def _may_split_batch(exc: BaseException, *, creates: bool) -> bool:
    """Whether a ``$batch`` call that failed as a whole is retried in halves: on a 4xx for the
    call (nothing was written); without creates (PATCH is idempotent) also on a 500. Never on
    throttling, an unavailable service (502, 503, 504) or a lost connection."""
    if isinstance(exc, ThrottledError):
        return False
    status = getattr(exc, "status", None)
    if isinstance(exc, ApiError) and status is not None and 400 <= status < 500:
        return status not in (401, 403)  # a refused token or privilege: halves would be refused too
    if creates:
        return False  # the answer may have been lost after Dataverse created the rows
    if isinstance(exc, TransportError):
        return False  # the hook retried it already: a failing network, not a record
    return isinstance(exc, ApiError) and status is not None and status >= 500 and status not in (502, 503, 504)


class Outcomes:
    """Failures go onto the rows themselves; the first failure of a row sticks."""

    def fail(self, row: Pending, message: str, code: str | None = None) -> None:
        row.fail(message, code)

    def failed(self, row: Pending) -> bool:
        return not row.ok

    def finish(self, rows: Iterable[Pending]) -> list[WriteResult]:
        return [row.result() for row in rows]


OUTCOMES = Outcomes()


class DataverseBatches:
    """``$batch`` calls split on a failed call, chunked reads, the conditional PATCH."""

    def _run_batch(
        self,
        items: Sequence[tuple[Pending, BatchRequest]],
        on_response: Callable[[Pending, BatchResponse], None],
        on_error: Callable[[Pending, str, str | None], None],
    ) -> None:
        """``$batch`` calls of at most ``batch_size`` requests with continue-on-error.

        A request whose body cannot be sent as standard JSON (``Infinity``) fails its record
        before any call. A call that fails as a whole is retried in halves until the requests
        that fail it are isolated (each record then fails with the call's error); the others
        are written. Creates (POST) are split only when the error proves nothing was written
        (a 4xx for the call): after a lost answer they may have been. Throttling and an
        unavailable service are not about the records: not split. At most about 2·n calls.

        The chunks go out concurrently (the hook's :meth:`~DynamicsHook.map_concurrently`: as many
        at once as the org's ``x-ms-dop-hint`` says, at most 52), each split on its own; the
        callbacks are called afterwards, on this thread, in the requests' order. An error that
        fails the task is raised once every chunk has ended and the others' outcomes are told."""
        sendable: list[tuple[Pending, BatchRequest]] = []
        for row, request in items:
            problem = _unencodable_body(request)
            if problem is None:
                sendable.append((row, request))
            else:
                on_error(row, problem, "JSON_SERIALIZATION")

        def send(
            chunk: Sequence[tuple[Pending, BatchRequest]],
        ) -> tuple[list[Callable[[], None]], list[int], Exception | None]:
            told: list[Callable[[], None]] = []  # the chunk's outcomes, told on the caller's thread
            counted = [0, 0]
            try:
                self._batch_split(
                    chunk,
                    lambda row, response: told.append(lambda: on_response(row, response)),
                    lambda row, message, code: told.append(lambda: on_error(row, message, code)),
                    counted,
                )
            except Exception as exc:  # fails the task (see _batch_split): raised after the others
                return told, counted, exc
            return told, counted, None

        calls = [0, 0]  # calls made, calls that failed as a whole
        failure: Exception | None = None
        for told, counted, exc in self.hook.map_concurrently(send, list(chunks(sendable, self.batch_size))):
            for tell in told:
                tell()
            calls = [calls[0] + counted[0], calls[1] + counted[1]]
            failure = failure or exc
        if failure is not None:
            raise failure
        if calls[1]:
            log.warning(
                "dynamics365: %d $batch call(s) failed as a whole; split retries: %d call(s) in all for %d request(s)",
                calls[1], calls[0], len(sendable),
            )  # fmt: skip

    def _batch_split(
        self,
        chunk: Sequence[tuple[Pending, BatchRequest]],
        on_response: Callable[[Pending, BatchResponse], None],
        on_error: Callable[[Pending, str, str | None], None],
        calls: list[int],
    ) -> None:
        """One ``$batch`` call for ``chunk``, halved while it fails as a whole (see :meth:`_run_batch`)."""
        calls[0] += 1
        try:
            responses = self.hook.batch([request for _, request in chunk], continue_on_error=True)
        except Exception as exc:  # the whole call failed
            if fails_the_task(exc):
                raise  # not about these records (a refused token, a setting, a bug)
            calls[1] += 1
            creates = any(request.method.upper() == "POST" for _, request in chunk)
            if len(chunk) > 1 and _may_split_batch(exc, creates=creates):
                log.warning("dynamics365: a $batch of %d requests failed (%s); retrying in halves", len(chunk), exc)
                half = len(chunk) // 2
                self._batch_split(chunk[:half], on_response, on_error, calls)
                self._batch_split(chunk[half:], on_response, on_error, calls)
                return
            log.warning("dynamics365: a $batch of %d requests failed: %s", len(chunk), exc)
            message, code = exception_error(exc)
            for row, _ in chunk:
                on_error(row, message, code)
            return
        for n, (row, _) in enumerate(chunk):
            if n < len(responses):
                on_response(row, responses[n])
            else:
                on_error(row, "Dataverse returned no response for this request in the $batch", None)

    def _read_chunked(
        self,
        rows: Sequence[Pending],
        value: Callable[[Pending], str],
        clause: Callable[[str], str],
        select: Sequence[str],
        on_error: Callable[[Pending, str, str | None], None],
    ) -> list[dict[str, Any]]:
        """Opportunities matching ``clause(value(row))`` for the rows, in chunks read concurrently;
        a chunk whose read fails fails its records."""
        found: list[dict[str, Any]] = []
        by_value: dict[str, list[Pending]] = {}
        for row in rows:
            by_value.setdefault(value(row), []).append(row)
        groups = list(chunks(list(by_value), self.id_chunk))
        filters = [" or ".join(clause(v) for v in chunk) for chunk in groups]
        answers = self.hook.query_each(self.opportunity_set, filters, select=select)
        for chunk, answer in zip(groups, answers, strict=True):
            if not isinstance(answer, Exception):
                found += answer
                continue
            if fails_the_task(answer):
                raise answer
            message, code = exception_error(answer)
            for v in chunk:
                for row in by_value[v]:
                    on_error(row, message, code)
        return found

    def _patch(self, row: Pending, body: dict[str, Any], etag: str | None = None) -> BatchRequest:
        """An update-only PATCH answering the new ETag: ``If-Match`` is the row's ETag as read
        (412 when it changed since), or ``*`` without one (404 rather than a new row)."""
        url = with_query(DynamicsHook.row(self.opportunity_set, str(row.crm_id)), {"$select": self.opportunity_pk})
        return BatchRequest("PATCH", url, body, headers={"If-Match": etag or "*", "Prefer": "return=representation"})
