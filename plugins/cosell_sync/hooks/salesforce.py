"""Salesforce, on top of the Airflow Salesforce provider's ``SalesforceHook``.

The provider builds the simple-salesforce client; this hook extends it:

* **Connection.** A ``salesforce`` connection with the extras ``instance_url`` and
  ``access_token`` works (direct session); the provider's own fields (username,
  password, security token, consumer key/secret, private key, domain) keep working.
  ``ca_bundle`` (or ``REQUESTS_CA_BUNDLE``) is trusted.
* **Retries.** simple-salesforce has none. Every call goes through one
  ``requests.Session``, so retries live there: ``REQUEST_LIMIT_EXCEEDED``, 429, 5xx and
  connection errors back off (see :class:`cosell_sync.hooks.http.Retrier`).
* **Limits.** ``Sforce-Limit-Info`` is read on every response, logged as usage climbs,
  and calls are slowed down as the org nears its daily limit.
* **Queries.** SOQL is built with :mod:`cosell_sync.hooks.soql` (every value escaped);
  pages follow ``nextRecordsUrl``; the incremental read goes by ``SystemModstamp``.
* **Writes.** sObject Collections (200 records a call, one result per record, the
  per-item error key being ``statusCode``), and Bulk API 2.0 above a size threshold.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import requests
from airflow.providers.salesforce.hooks.salesforce import SalesforceHook
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError

from cosell_sync.errors import ApiError, ConfigurationError, ThrottledError, error_class_for
from cosell_sync.hooks.http import Retrier, RetryPolicy, TrustedSession, default_transient
from cosell_sync.hooks.pool import widen_pool
from cosell_sync.hooks.soql import Condition, select
from cosell_sync.masking import mask

SYSTEM = "Salesforce"
log = logging.getLogger(__name__)
COLLECTION_LIMIT = 200
# Seconds between closing a Bulk API 2.0 job and the first look at its state: simple-salesforce
# waits its ``wait`` (5 s by default) first, then polls ever less often (up to every ~3.5 s here).
BULK_POLL = 0.5
_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")


def _request_limit(response: requests.Response) -> bool:
    return response.status_code == 403 and b"REQUEST_LIMIT_EXCEEDED" in (response.content or b"")


def _transient(response: requests.Response) -> bool:
    return default_transient(response) or _request_limit(response)


def _not_processed(response: requests.Response) -> bool:
    return response.status_code == 429 or _request_limit(response)


@dataclass
class ApiUsage:
    """The org's API usage as reported by ``Sforce-Limit-Info``, and how much to slow down."""

    slow_down_at: float = 0.8  # fraction of the daily limit from which calls are spaced out
    max_delay: float = 2.0  # seconds between calls at 100%
    used: int | None = None
    limit: int | None = None
    _logged_step: int = -1

    @property
    def ratio(self) -> float | None:
        return self.used / self.limit if self.used is not None and self.limit else None

    def observe(self, header: str | None) -> None:
        match = _USAGE.search(header or "")
        if not match:
            return
        self.used, self.limit = int(match.group(1)), int(match.group(2))
        step = int((self.ratio or 0) * 10)  # log once per 10% of the daily limit
        if step != self._logged_step:
            self._logged_step = step
            level = log.warning if (self.ratio or 0) >= self.slow_down_at else log.info
            level(
                "Salesforce API usage %d/%d (%.0f%% of the org's daily limit)",
                self.used,
                self.limit,
                100 * (self.ratio or 0),
            )

    def delay(self) -> float:
        ratio = self.ratio
        if ratio is None or ratio < self.slow_down_at:
            return 0.0
        return min(self.max_delay, self.max_delay * (ratio - self.slow_down_at) / (1 - self.slow_down_at))


class SalesforceSession(TrustedSession):
    """The session simple-salesforce sends everything through: retries, usage, pacing."""

    def __init__(
        self, ca_bundle: str | None, retrier: Retrier, usage: ApiUsage, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        super().__init__(ca_bundle)
        self.retrier = retrier
        self.usage = usage
        self._sleep = sleep
        self.paced = 0.0

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        verb = method.decode() if isinstance(method, bytes) else method
        target = url.decode() if isinstance(url, bytes) else url
        pause = self.usage.delay()
        if pause:
            self.paced += pause
            self._sleep(pause)

        def send() -> requests.Response:
            return TrustedSession.request(self, verb, target, *args, **kwargs)

        response = self.retrier.run(
            verb,
            target,
            send,
            idempotent=verb.upper() in ("GET", "HEAD", "PATCH", "PUT", "DELETE"),
            transient=_transient,
            not_processed=_not_processed,
        )
        self.usage.observe(response.headers.get("Sforce-Limit-Info"))
        return response


@dataclass
class RecordResult:
    """The outcome of one record of a collection or bulk call (``index`` into the input)."""

    index: int
    success: bool
    id: str | None = None
    created: bool | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_message(self) -> str:
        return "; ".join(
            f"{e.get('statusCode') or e.get('errorCode')}: {e.get('message')}"
            + (f" (fields: {', '.join(e['fields'])})" if e.get("fields") else "")
            for e in self.errors
        )


@contextlib.contextmanager
def salesforce_errors(action: str) -> Iterator[None]:
    """simple-salesforce exceptions as cosell-sync's typed errors (code, message, status)."""
    try:
        yield
    except SalesforceError as exc:
        content = exc.content
        first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
        code = first.get("errorCode") or first.get("statusCode")
        message = str(first.get("message") or (content if isinstance(content, str) else "") or type(exc).__name__)
        cls = ThrottledError if code == "REQUEST_LIMIT_EXCEEDED" else error_class_for(exc.status)
        raise cls(SYSTEM, f"{action}: {message}"[:2000], status=exc.status, code=code, url=exc.url) from None


class SalesforceSyncHook(SalesforceHook):
    """The provider's SalesforceHook, with direct-token connections, retries, limits,
    escaped SOQL, and batched writes."""

    hook_name = "Salesforce (cosell-sync)"

    def __init__(
        self,
        salesforce_conn_id: str = "salesforce_default",
        *,
        retry_policy: RetryPolicy | None = None,
        bulk_threshold: int = 2000,
        bulk_poll: float = BULK_POLL,
        slow_down_at: float = 0.8,
        sleep: Callable[[float], None] = time.sleep,
        session_id: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(salesforce_conn_id=salesforce_conn_id, session_id=session_id, session=session)
        self.retrier = Retrier(SYSTEM, retry_policy, sleep=sleep)
        self.usage = ApiUsage(slow_down_at=slow_down_at)
        self.bulk_threshold = bulk_threshold
        self.bulk_poll = bulk_poll
        self._sleep = sleep
        self._lock = threading.Lock()

    @cached_property
    def conn(self) -> Salesforce:
        extras = self.get_connection(self.conn_id).extra_dejson
        token = self._get_field(extras, "access_token")
        if token and not self.session_id:
            mask(token)
            self.session_id = token
            if not (self._get_field(extras, "instance_url") or self._get_field(extras, "instance")):
                raise ConfigurationError(
                    f"Connection '{self.conn_id}' (salesforce): an access_token needs 'instance_url' in the extras."
                )
        ca_bundle = self._get_field(extras, "ca_bundle") or None
        if ca_bundle and not Path(ca_bundle).is_file():
            raise ConfigurationError(f"Connection '{self.conn_id}' (salesforce): ca_bundle '{ca_bundle}' not found.")
        if self.session is None:
            self.session = widen_pool(SalesforceSession(ca_bundle, self.retrier, self.usage, self._sleep))
        with salesforce_errors("login"):
            return super().conn

    def describe(self, sobject: str) -> dict[str, Any]:
        """The object's ``describe()`` (fields, picklist values ...)."""
        with salesforce_errors(f"describe {sobject}"):
            return dict(getattr(self.conn, sobject).describe())

    # -- queries ----------------------------------------------------------------------------
    def query_records(
        self, soql: str, *, batch_size: int | None = None, include_deleted: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every record of a query, following ``nextRecordsUrl``; ``attributes`` removed.
        ``batch_size`` (200-2000) is sent as ``Sforce-Query-Options`` on every page."""
        headers = {"Sforce-Query-Options": f"batchSize={batch_size}"} if batch_size else {}
        sf = self.conn
        with salesforce_errors("query"):
            page = sf.query(soql, include_deleted=include_deleted, headers=headers)
        while True:
            for record in page.get("records", []):
                yield {k: v for k, v in record.items() if k != "attributes"}
            if page.get("done", True) or not page.get("nextRecordsUrl"):
                return
            with salesforce_errors("query"):
                page = sf.query_more(page["nextRecordsUrl"], identifier_is_url=True, headers=headers)

    def query_modified_since(
        self,
        sobject: str,
        fields: Sequence[str],
        since: datetime | None,
        *,
        until: datetime | None = None,
        where: Sequence[Condition | str] = (),
        batch_size: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Records whose ``SystemModstamp`` is after ``since`` (and at most ``until``), ordered by
        ``SystemModstamp, Id`` so a watermark can resume exactly."""
        conditions: list[Condition | str] = list(where)
        if since is not None:
            conditions.append(Condition("SystemModstamp", ">", since))
        if until is not None:
            conditions.append(Condition("SystemModstamp", "<=", until))
        wanted = list(dict.fromkeys([*fields, "Id", "SystemModstamp"]))
        soql = select(sobject, wanted, conditions, order_by=["SystemModstamp", "Id"])
        yield from self.query_records(soql, batch_size=batch_size)

    # -- writes ---------------------------------------------------------------------------------
    def _collections(
        self, method: str, path: str, sobject: str, records: Sequence[Mapping[str, Any]], all_or_none: bool
    ) -> list[RecordResult]:
        results: list[RecordResult] = []
        for start in range(0, len(records), COLLECTION_LIMIT):
            chunk = [{"attributes": {"type": sobject}, **r} for r in records[start : start + COLLECTION_LIMIT]]
            with salesforce_errors(f"{method} {path}"):
                answer = self.conn.restful(path, method=method, json={"allOrNone": all_or_none, "records": chunk})
            if not isinstance(answer, list) or len(answer) != len(chunk):
                raise ApiError(SYSTEM, f"{path}: expected {len(chunk)} results, got {answer!r:.200}")
            for offset, item in enumerate(answer):
                results.append(
                    RecordResult(
                        index=start + offset,
                        success=bool(item.get("success")),
                        id=item.get("id"),
                        created=item.get("created"),
                        errors=list(item.get("errors") or []),
                    )
                )
        return results

    def create_records(
        self, sobject: str, records: Sequence[Mapping[str, Any]], *, all_or_none: bool = False
    ) -> list[RecordResult]:
        """Create through sObject Collections, 200 per call. Not retried after an ambiguous
        failure (a create is not idempotent): use :meth:`upsert_records` where an external id exists."""
        return self._collections("POST", "composite/sobjects", sobject, records, all_or_none)

    def update_records(
        self, sobject: str, records: Sequence[Mapping[str, Any]], *, all_or_none: bool = False
    ) -> list[RecordResult]:
        """Update by ``Id`` (collections, or Bulk API 2.0 above ``bulk_threshold``)."""
        if any(not r.get("Id") for r in records):
            raise ValueError("update_records needs an Id on every record")
        if len(records) > self.bulk_threshold and not all_or_none:
            return self._bulk("update", sobject, records, key="Id")
        return self._collections("PATCH", "composite/sobjects", sobject, records, all_or_none)

    def upsert_records(
        self,
        sobject: str,
        external_id_field: str,
        records: Sequence[Mapping[str, Any]],
        *,
        all_or_none: bool = False,
    ) -> list[RecordResult]:
        """Upsert by an External ID field (collections, or Bulk API 2.0 above ``bulk_threshold``);
        each result says whether the record was created."""
        if any(not r.get(external_id_field) for r in records):
            raise ValueError(f"upsert_records needs {external_id_field} on every record")
        if len(records) > self.bulk_threshold and not all_or_none:
            return self._bulk("upsert", sobject, records, key=external_id_field)
        path = f"composite/sobjects/{sobject}/{external_id_field}"
        return self._collections("PATCH", path, sobject, records, all_or_none)

    def _bulk(self, operation: str, sobject: str, records: Sequence[Mapping[str, Any]], key: str) -> list[RecordResult]:
        """Bulk API 2.0 ingest; results are matched back to the input by ``key``."""
        columns = list(dict.fromkeys(k for r in records for k in r))
        rows = [{c: "" if r.get(c) is None else str(r.get(c)) for c in columns} for r in records]
        handler = getattr(self.conn.bulk2, sobject)
        with salesforce_errors(f"bulk {operation} {sobject}"):
            if operation == "upsert":
                jobs = handler.upsert(records=rows, external_id_field=key, wait=self.bulk_poll)
            else:
                jobs = handler.update(records=rows, wait=self.bulk_poll)
        position = {str(r[key]): i for i, r in enumerate(records)}
        results: dict[int, RecordResult] = {}
        for job in jobs:
            job_id = job["job_id"]
            with salesforce_errors(f"bulk results {job_id}"):
                ok = handler.get_successful_records(job_id)
                failed = handler.get_failed_records(job_id)
            for row in csv.DictReader(io.StringIO(ok)):
                index = position[row[key]]
                created = row.get("sf__Created", "").lower() == "true" if "sf__Created" in row else None
                results[index] = RecordResult(index, True, row.get("sf__Id") or None, created)
            for row in csv.DictReader(io.StringIO(failed)):
                index = position[row[key]]
                code, _, message = (row.get("sf__Error") or "").partition(":")
                results[index] = RecordResult(
                    index,
                    False,
                    row.get("sf__Id") or None,
                    None,
                    [{"statusCode": code.strip(), "message": message.strip()}],
                )
        missing = [i for i in range(len(records)) if i not in results]
        for index in missing:
            results[index] = RecordResult(
                index, False, errors=[{"statusCode": "UNPROCESSED", "message": "not processed"}]
            )
        return [results[i] for i in range(len(records))]

    # -- Airflow UI -----------------------------------------------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        try:
            with salesforce_errors("limits"):
                limits = self.conn.limits()
        except Exception as exc:
            return False, str(exc)
        daily = limits.get("DailyApiRequests", {})
        remaining = f"{daily.get('Remaining')}/{daily.get('Max')}"
        return True, f"Connected: access token accepted; limits read (daily API requests remaining: {remaining})."
