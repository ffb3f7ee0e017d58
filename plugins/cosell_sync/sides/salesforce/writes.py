"""Salesforce writes: sObject Collections (200 records a call) or Bulk API 2.0, one outcome per record.

A call that fails as a whole is retried in halves until the records that fail it are
isolated (a create only when nothing can have been written), so the good records of the
batch are written. Authentication and configuration errors are not about records: they
raise, so the task fails and retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from cosell_sync.errors import (
    ApiError,
    AuthenticationError,
    ConfigurationError,
    CosellError,
    ThrottledError,
    TransportError,
)
from cosell_sync.hooks.salesforce import COLLECTION_LIMIT, RecordResult

log = logging.getLogger(__name__)


ERROR_CHARS = 2000  # Salesforce quotes the rejected value in some messages (a 1 MB description ...)


@dataclass
class _Outcome:
    """One record's outcome of a write call."""

    ok: bool
    id: str | None = None
    created: bool | None = None
    error: str | None = None
    code: str | None = None


def clip(text: str, limit: int = ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_of(exc: Exception) -> tuple[str, str]:
    """(message, code) of an exception that failed a call; never a credential (our errors
    carry the service's message and a URL path only)."""
    if isinstance(exc, ApiError):
        return clip(str(exc)), exc.code or type(exc).__name__
    if isinstance(exc, CosellError):
        return clip(str(exc)), type(exc).__name__
    return clip(f"{type(exc).__name__}: {exc}"), type(exc).__name__


def _first_code(result: RecordResult) -> str | None:
    for err in result.errors:
        code = err.get("statusCode") or err.get("errorCode")
        if code:
            return str(code)
    return None


def _unencodable(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` cannot be sent as standard JSON (naming its fields), or None."""
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fields = []
        for key, value in record.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                fields.append(str(key))
        return clip(f"{type(exc).__name__}: {exc} (fields: {', '.join(fields)})")
    return None


def _may_split(exc: Exception, op: str) -> bool:
    """Whether a call that failed as a whole is retried in halves: always when the request
    was never sent (it could not be encoded); on a 4xx for the whole call (nothing written);
    for updates and upserts (idempotent) also on a 500. Never on throttling, an unavailable
    service (502, 503, 504) or a lost connection (the hook retried it already): those are not
    about the records, and halves would only multiply the calls to a failing network."""
    if isinstance(exc, ThrottledError):
        return False
    if isinstance(exc, requests.exceptions.InvalidJSONError) and not isinstance(exc, requests.JSONDecodeError):
        return True  # raised while building the request: nothing was sent
    decoding = (json.JSONDecodeError, requests.JSONDecodeError)  # an answer that could not be read: it was sent
    if isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, decoding):
        return True  # the record could not be encoded, or the hook refused it before sending
    if isinstance(exc, ApiError) and exc.status is not None and 400 <= exc.status < 500:
        return exc.status not in (401, 403)  # a refused session or permission: halves would be refused too
    if op == "create":
        return False  # the answer may have been lost after Salesforce created the records
    if isinstance(exc, TransportError):
        return False
    status = exc.status if isinstance(exc, ApiError) else None
    return status is not None and status >= 500 and status not in _UNAVAILABLE


_UNAVAILABLE = frozenset({502, 503, 504})  # the service (not a record) is down: halves would fail too


class SalesforceWrites:
    """The side's writes (``self.hook``: a :class:`SalesforceSyncHook`)."""

    def _write(
        self, op: str, sobject: str, records: Sequence[Mapping[str, Any]], *, external_id: str | None = None
    ) -> list[_Outcome]:
        """One outcome per record, in order: collections calls of 200 records, or one bulk job
        above the hook's ``bulk_threshold``.

        A record whose values cannot be sent as JSON (``Infinity``) fails alone, before any call.
        A call that fails as a whole is retried in halves until the records that fail it are
        isolated (each then fails with the call's error); the others are written. A create is
        split only when the error proves nothing was written (a 4xx for the call, a request that
        could not be built): after a lost answer it may have been, and re-sending could
        duplicate. Throttling is not about the records: not split. Splitting costs at most
        about 2·n calls for n records."""
        if not records:
            return []
        outcomes: list[_Outcome | None] = [None] * len(records)
        sendable: list[int] = []
        for i, record in enumerate(records):
            problem = _unencodable(record)
            if problem is None:
                sendable.append(i)
            else:
                outcomes[i] = _Outcome(False, error=problem, code="JSON_SERIALIZATION")
        calls = [0, 0]  # calls made, calls that failed as a whole
        written = self._write_split(op, sobject, [records[i] for i in sendable], external_id, calls)
        for i, outcome in zip(sendable, written, strict=True):
            outcomes[i] = outcome
        if calls[1]:
            log.warning(
                "Salesforce %s of %d %s record(s): %d call(s) failed as a whole; split retries took %d call(s) "
                "in all, %d record(s) failed",
                op, len(records), sobject, calls[1], calls[0], sum(1 for o in outcomes if o and not o.ok),
            )  # fmt: skip
        return [o if o is not None else _Outcome(False, error="not written", code="UNPROCESSED") for o in outcomes]

    def _write_split(
        self, op: str, sobject: str, records: Sequence[Mapping[str, Any]], external_id: str | None, calls: list[int]
    ) -> list[_Outcome]:
        """:meth:`_write`'s calls for ``records`` (sent as the hook's calls allow), halving a
        call that fails as a whole."""
        if not records:
            return []
        bulk = op != "create" and len(records) > self.hook.bulk_threshold
        size = len(records) if bulk else COLLECTION_LIMIT
        outcomes: list[_Outcome] = []
        for start in range(0, len(records), size):
            chunk = list(records[start : start + size])
            calls[0] += 1
            try:
                if op == "create":
                    results = self.hook.create_records(sobject, chunk)
                elif op == "update":
                    results = self.hook.update_records(sobject, chunk)
                else:
                    assert external_id is not None
                    results = self.hook.upsert_records(sobject, external_id, chunk)
            except (AuthenticationError, ConfigurationError):
                raise  # not about these records: the task fails and is retried
            except Exception as exc:
                calls[1] += 1
                message, code = error_of(exc)
                if len(chunk) > 1 and _may_split(exc, op):
                    log.warning(
                        "Salesforce %s of %d %s record(s) failed as a whole (%s); retrying in halves",
                        op, len(chunk), sobject, message,
                    )  # fmt: skip
                    half = len(chunk) // 2
                    outcomes += self._write_split(op, sobject, chunk[:half], external_id, calls)
                    outcomes += self._write_split(op, sobject, chunk[half:], external_id, calls)
                    continue
                log.warning("Salesforce %s of %d %s record(s) failed: %s", op, len(chunk), sobject, message)
                outcomes.extend(_Outcome(False, error=message, code=code) for _ in chunk)
                continue
            for result in results:
                if result.success:
                    outcomes.append(_Outcome(True, result.id, result.created))
                else:
                    outcomes.append(_Outcome(False, result.id, None, clip(result.error_message), _first_code(result)))
        return outcomes
