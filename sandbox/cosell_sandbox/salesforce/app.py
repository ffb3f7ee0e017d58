"""Salesforce emulator: the REST API at ``/services/data/vNN.N/`` as simple-salesforce 1.12.x and
the Airflow Salesforce provider use it, plus Bulk API 2.0 ingest and a control plane.

What it serves (paths relative to ``/services/data/vNN.N/``, versions 52.0-62.0, trailing slash
optional as on the real service):

* ``sobjects`` (describeGlobal), ``sobjects/<Object>`` (basic info, create),
  ``sobjects/<Object>/describe``, ``sobjects/<Object>/<id>`` (get with ``?fields=``, update,
  delete), ``sobjects/<Object>/<ExtIdField>/<value>`` (get, upsert: 201/200/300),
  ``sobjects/<Object>/updated`` and ``deleted`` (replication windows);
* ``query`` / ``queryAll`` with the SOQL subset of :mod:`.soql`, snapshot query locators
  (``nextRecordsUrl`` is a path), ``Sforce-Query-Options: batchSize=N``;
* ``composite/sobjects`` (create, update, upsert, delete, retrieve; at most 200 records;
  ``allOrNone``);
* ``jobs/ingest`` (Bulk API 2.0, see :mod:`.bulk`);
* ``limits``, with ``Sforce-Limit-Info: api-usage=<used>/<limit>`` on every API response and
  403 ``REQUEST_LIMIT_EXCEEDED`` once the daily allowance is used up.

Every API call needs ``Authorization: Bearer <token>`` with a token this emulator issued
(:meth:`SalesforceEmulator.issue_token`); otherwise 401 ``INVALID_SESSION_ID``. Errors are JSON
arrays ``[{"message", "errorCode", "fields"}]``; per-record results of collections use
``statusCode`` instead of ``errorCode``, as the real API does.

The control plane lives under ``/_sandbox/`` (no token, no faults): the shared endpoints of
:class:`~cosell_sandbox.server.EmulatorApp` (reset, seed, state, config, limits, age, faults,
requests), and raw records, CRM-user edits and deletes, token issue/revoke and schema tweaks.

This module wires the routes; the work is done by one module per concern: :mod:`.schema`,
:mod:`.records` (errors, ids, the store), :mod:`.validation`, :mod:`.describe`, :mod:`.query`,
:mod:`.writes`, :mod:`.bulk`, :mod:`.seed` and :mod:`.control`."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..server import EmulatorApp, HTTPError, Request, Response, Router
from .bulk import BulkIngest
from .control import ControlMixin
from .describe import DescribeMixin
from .query import QueryMixin
from .records import StoreMixin, _bad, _base62, _Cursor, _not_found
from .schema import API_VERSIONS, DEFAULT_DAILY_LIMIT, ID_OFFSET, ORG_ID, V, build_schema
from .seed import SeedMixin
from .soql import normalize_id, sf_datetime
from .validation import ValidationMixin
from .writes import WritesMixin


class SalesforceEmulator(
    ControlMixin, SeedMixin, WritesMixin, QueryMixin, DescribeMixin, ValidationMixin, StoreMixin, EmulatorApp
):
    name = "salesforce"
    control_error_code = "INVALID_REQUEST"

    def __init__(self, access_token: str | None = None) -> None:
        self.schema = build_schema()
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.tokens: set[str] = set()
        self.daily_limit = DEFAULT_DAILY_LIMIT
        self.api_used = 0
        self.query_locator_ttl = 15 * 60.0  # seconds of inactivity before a locator expires
        self.max_open_cursors = 10  # per user, as on the real service (oldest are released)
        self.bulk_delay = 0.05  # seconds a closed Bulk API 2.0 job waits before and while processing
        self.clock: Callable[[], float] = time.time
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._ext_index: dict[tuple[str, str], dict[str, set[str]]] = {}
        self._counters: dict[str, int] = {}
        self._last_ms = 0
        self._undo: list[tuple[str, str, dict[str, Any] | None]] | None = None
        self._tls = threading.local()
        self._routes_seen: list[tuple[str, re.Pattern[str]]] = []
        self.bulk = BulkIngest(self)
        super().__init__()
        # A given token (the sandbox reuses one across restarts, so printed connections stay valid).
        self.access_token = access_token or self.issue_token()
        self.tokens.add(self.access_token)
        self._reset_store()

    # -- tokens, limits, time -------------------------------------------------------
    def issue_token(self) -> str:
        """A new session token (``<org id>!<opaque>``) that the API accepts until revoked."""
        token = f"{ORG_ID[:15]}!AQ0AQ" + secrets.token_urlsafe(72).replace("-", ".")
        with self.lock:
            self.tokens.add(token)
        return token

    def revoke_tokens(self, token: str | None = None) -> int:
        """Revoke one token, or every token when ``token`` is None; returns how many were revoked."""
        with self.lock:
            if token is None:
                count = len(self.tokens)
                self.tokens.clear()
                return count
            if token in self.tokens:
                self.tokens.discard(token)
                return 1
            return 0

    def set_limits(self, daily_api_requests: int | None = None, used: int | None = None) -> None:
        with self.lock:
            if daily_api_requests is not None:
                self.daily_limit = int(daily_api_requests)
            if used is not None:
                self.api_used = int(used)

    def configure_limits(self, **changes: Any) -> dict[str, Any]:
        """``daily_api_requests`` (the allowance) and ``used`` (the calls counted so far today)."""
        self.set_limits(**changes)
        return self.limits_state()

    def limits_state(self) -> dict[str, Any]:
        return {"used": self.api_used, "limit": self.daily_limit}

    @property
    def api_usage(self) -> tuple[int, int]:
        return self.api_used, self.daily_limit

    def configure(
        self,
        *,
        query_locator_ttl: float | None = None,
        max_open_cursors: int | None = None,
        bulk_delay: float | None = None,
    ) -> dict[str, Any]:
        """Query locator lifetime (seconds idle), open cursors per user, the Bulk API's delay; returns the state."""
        with self.lock:
            if query_locator_ttl is not None:
                self.query_locator_ttl = float(query_locator_ttl)
            if max_open_cursors is not None:
                self.max_open_cursors = int(max_open_cursors)
            if bulk_delay is not None:
                self.bulk_delay = float(bulk_delay)
        return self.state()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _stamp(self) -> str:
        """A SystemModstamp: millisecond precision, strictly increasing across writes."""
        now_ms = int(self.clock() * 1000)
        self._last_ms = max(now_ms, self._last_ms + 1)
        return sf_datetime(datetime.fromtimestamp(self._last_ms / 1000, UTC))

    def _new_id(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        id15 = f"{prefix}5g0{_base62(n + ID_OFFSET, 9)}"
        normalized = normalize_id(id15)
        assert normalized is not None
        return normalized

    # -- routing ------------------------------------------------------------------
    def routes(self, router: Router) -> None:
        s = r"/?"
        obj = r"/sobjects/(?P<obj>[^/]+)"
        api = self._api
        router.add("GET", r"/services/data/?", self._versions)
        api(router, "GET", V + s, self._directory)
        api(router, "GET", V + r"/limits" + s, self._limits)
        api(router, "GET", V + r"/sobjects" + s, self._describe_global)
        api(router, "GET", V + obj + s, self._sobject_info)
        api(router, "POST", V + obj + s, self._create)
        api(router, "GET", V + obj + r"/describe" + s, self._describe)
        api(router, "GET", V + obj + r"/updated" + s, self._updated)
        api(router, "GET", V + obj + r"/deleted" + s, self._deleted)
        api(router, "GET", V + obj + r"/(?P<id>[^/]+)" + s, self._get)
        api(router, "PATCH", V + obj + r"/(?P<id>[^/]+)" + s, self._update)
        api(router, "DELETE", V + obj + r"/(?P<id>[^/]+)" + s, self._delete)
        api(router, "GET", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._get_by_ext)
        api(router, "PATCH", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._upsert)
        api(router, "DELETE", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._delete_by_ext)
        for endpoint in ("query", "queryAll"):
            api(router, "GET", V + rf"/(?P<endpoint>{endpoint})" + s, self._query)
            api(router, "GET", V + rf"/(?P<endpoint>{endpoint})/(?P<locator>[^/]+)" + s, self._query_more)
        coll = V + r"/composite/sobjects"
        api(router, "POST", coll + s, self._collection_create)
        api(router, "PATCH", coll + s, self._collection_update)
        api(router, "DELETE", coll + s, self._collection_delete)
        api(router, "GET", coll + r"/(?P<obj>[^/]+)" + s, self._collection_retrieve)
        api(router, "POST", coll + r"/(?P<obj>[^/]+)" + s, self._collection_retrieve)
        api(router, "PATCH", coll + r"/(?P<obj>[^/]+)/(?P<field>[^/]+)" + s, self._collection_upsert)
        jobs = V + r"/jobs/ingest"
        job = jobs + r"/(?P<job>[^/]+)"
        api(router, "POST", jobs + s, self.bulk.create_job)
        api(router, "GET", jobs + s, self.bulk.list_jobs)
        api(router, "GET", job + s, self.bulk.get_job)
        api(router, "PATCH", job + s, self.bulk.patch_job)
        api(router, "DELETE", job + s, self.bulk.delete_job)
        api(router, "PUT", job + r"/batches" + s, self.bulk.upload)
        api(
            router, "GET", job + r"/(?P<kind>successfulResults|failedResults|unprocessedrecords)" + s, self.bulk.results
        )
        api(router, "GET", job + r"/(?P<kind>(?i:unprocessedrecords))" + s, self.bulk.results)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
            router.add(method, r"/services/.*", self._unknown)
        # control plane (reset, seed, state, config, limits, faults and requests: EmulatorApp's)
        router.add("POST", r"/_sandbox/tokens", self._cp_issue)
        router.add("POST", r"/_sandbox/tokens/revoke", self._cp_revoke)
        router.add("POST", r"/_sandbox/schema/external-id", self._cp_external_id)
        router.add("DELETE", r"/_sandbox/schema/fields/(?P<obj>[^/]+)/(?P<field>[^/]+)", self._cp_remove_field)
        router.add("GET", r"/_sandbox/records/(?P<obj>[^/]+)", self._cp_records)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)", self._cp_create)
        router.add("GET", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)", self._cp_record)
        router.add("DELETE", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)", self._cp_delete)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)/edit", self._cp_edit)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)/touch", self._cp_touch)
        router.add("GET", r"/_sandbox/bulk/jobs", self._cp_jobs)

    def _api(self, router: Router, method: str, pattern: str, handler: Callable[[Request], Response]) -> None:
        """Register an API route behind the session check, the version check and the request limit."""
        self._routes_seen.append((method, re.compile(pattern + r"\Z")))

        def guarded(request: Request) -> Response:
            self._authorize(request)
            if request.params.get("version") not in API_VERSIONS:
                raise _not_found()
            return handler(request)

        router.add(method, pattern, guarded)

    def _authorize(self, request: Request) -> None:
        """401 without a valid session; 403 once the daily allowance is spent; otherwise count the call."""
        header = request.headers.get("Authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        with self.lock:
            if scheme.lower() not in ("bearer", "oauth") or token.strip() not in self.tokens:
                raise HTTPError(401, "INVALID_SESSION_ID", "Session expired or invalid", {"WWW-Authenticate": "Token"})
            self._tls.counted = True
            if self.api_used >= self.daily_limit:
                raise _bad("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.", 403)
            self.api_used += 1

    def _unknown(self, request: Request) -> Response:
        self._authorize(request)
        allowed = sorted({m for m, regex in self._routes_seen if regex.match(request.path) and m != request.method})
        if allowed:
            raise HTTPError(
                405,
                "METHOD_NOT_ALLOWED",
                f"HTTP Method '{request.method}' not allowed. Allowed are {','.join(allowed)}",
            )
        raise _not_found()

    def dispatch(self, request: Request) -> tuple[Response | None, str | None]:
        self._tls.counted = False  # set by _authorize once the request passed the session check
        return super().dispatch(request)

    def decorate(self, request: Request, response: Response) -> None:
        counted = getattr(self._tls, "counted", False)
        self._tls.counted = False
        if counted and response.status != 401:
            with self.lock:
                response.headers.set("Sforce-Limit-Info", f"api-usage={self.api_used}/{self.daily_limit}")

    def error_response(self, err: HTTPError, request: Request) -> Response:
        code, message = err.code, err.message
        if code == "methodNotAllowed":
            code = "METHOD_NOT_ALLOWED"
            message = f"HTTP Method '{request.method}' not allowed. Allowed are {err.headers.get('Allow', '')}"
        elif code == "itemNotFound":
            code, message = "NOT_FOUND", "The requested resource does not exist"
        elif code == "generalException":
            code = "UNKNOWN_EXCEPTION"
            error_id = f"{secrets.randbelow(10**9)}-{secrets.randbelow(10**5)} (-{secrets.randbelow(10**9)})"
            message = f"An unexpected error occurred. Please include this ErrorId if you contact support: {error_id}"
        body: dict[str, Any] = {"message": message, "errorCode": code}
        if "fields" in err.extra:
            body["fields"] = list(err.extra["fields"])
        return Response.json([body], err.status, err.headers)

    def throttle_response(self, request: Request, retry_after: float) -> Response:
        seconds = int(retry_after) if retry_after == int(retry_after) else int(retry_after) + 1
        return Response.json(
            [{"message": "Too many requests. Try again later.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            429,
            {"Retry-After": str(seconds)},
        )

    def unavailable_response(self, request: Request, status: int) -> Response:
        headers = {"Retry-After": "1"} if status == 503 else {}
        code = "SERVER_UNAVAILABLE" if status == 503 else "UNKNOWN_EXCEPTION"
        return Response.json(
            [
                {
                    "message": "The server is temporarily unable to service your request. Please try again later.",
                    "errorCode": code,
                }
            ],
            status,
            headers,
        )
