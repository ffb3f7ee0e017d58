"""Salesforce reads: ``query``/``queryAll`` with snapshot query locators, and the ``updated``
and ``deleted`` replication windows."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from ..server import Request, Response
from .records import _bad, _Cursor, _Source, _trunc_minute
from .schema import DEFAULT_BATCH_SIZE, DELETED_WINDOW_DAYS, MIN_BATCH_SIZE, UPDATED_WINDOW_DAYS
from .soql import QueryError, execute, parse_datetime, sf_datetime


class QueryMixin:
    """The query and replication handlers of :class:`SalesforceEmulator`."""

    # -- query ----------------------------------------------------------------------------
    def _batch_size(self, request: Request, default: int = DEFAULT_BATCH_SIZE) -> int:
        options = request.headers.get("Sforce-Query-Options") or ""
        match = re.search(r"batchSize\s*=\s*(\d+)", options, re.IGNORECASE)
        if not match:
            return default
        return max(MIN_BATCH_SIZE, min(DEFAULT_BATCH_SIZE, int(match.group(1))))

    def run_query(self, soql: str, *, include_deleted: bool = False, version: str = "59.0") -> list[dict[str, Any]]:
        """Run SOQL in-process (all rows, no paging); raises :class:`soql.QueryError`."""
        with self.lock:
            return execute(
                soql,
                self.schema,
                _Source(self.records),
                include_deleted=include_deleted,
                now=self._now(),
                url_prefix=f"/services/data/v{version}",
            ).records

    def _query(self, request: Request) -> Response:
        soql = request.arg("q")
        if soql is None:
            raise _bad("MALFORMED_QUERY", "A query string has to be specified")
        version = request.params["version"]
        endpoint = request.params["endpoint"]
        with self.lock:
            try:
                result = execute(
                    soql,
                    self.schema,
                    _Source(self.records),
                    include_deleted=endpoint == "queryAll",
                    now=self._now(),
                    url_prefix=f"/services/data/v{version}",
                )
            except QueryError as err:
                raise _bad(err.code, err.message) from None
            batch = self._batch_size(request)
            if len(result.records) <= batch:
                return Response.json({"totalSize": result.total_size, "done": True, "records": result.records})
            cursor = _Cursor(self._new_id("01g"), result.records, endpoint, version, batch, self.clock())
            self._cursors[cursor.id] = cursor
            while len(self._cursors) > self.max_open_cursors:
                self._cursors.popitem(last=False)
            return Response.json(self._page(cursor, 0, batch, result.total_size))

    def _page(self, cursor: _Cursor, offset: int, batch: int, total: int) -> dict[str, Any]:
        chunk = cursor.records[offset : offset + batch]
        end = offset + len(chunk)
        body: dict[str, Any] = {"totalSize": total, "done": end >= len(cursor.records)}
        if not body["done"]:
            body["nextRecordsUrl"] = f"/services/data/v{cursor.version}/{cursor.endpoint}/{cursor.id}-{end}"
        body["records"] = chunk
        return body

    def _query_more(self, request: Request) -> Response:
        match = re.fullmatch(r"(01g[A-Za-z0-9]{15})-(\d+)", request.params["locator"])
        with self.lock:
            now = self.clock()
            for cid in [c.id for c in self._cursors.values() if now - c.touched > self.query_locator_ttl]:
                del self._cursors[cid]
            cursor = self._cursors.get(match.group(1)) if match else None
            if cursor is None or match is None or int(match.group(2)) > len(cursor.records):
                raise _bad("INVALID_QUERY_LOCATOR", "invalid query locator")
            cursor.touched = now
            self._cursors.move_to_end(cursor.id)
            batch = self._batch_size(request, cursor.batch)
            return Response.json(self._page(cursor, int(match.group(2)), batch, len(cursor.records)))

    # -- updated / deleted ------------------------------------------------------------------
    def _window(self, request: Request, days: int) -> tuple[datetime, datetime]:
        raw_start, raw_end = request.arg("start"), request.arg("end")
        if not raw_start or not raw_end:
            raise _bad("MISSING_ARGUMENT", "Both start and end must be specified")
        bounds = []
        for name, raw in (("start", raw_start), ("end", raw_end)):
            try:
                bounds.append(_trunc_minute(parse_datetime(raw)))
            except ValueError:
                raise _bad("INVALID_REPLICATION_DATE", f"Invalid {name} date: {raw}") from None
        start, end = bounds
        if end <= start:
            raise _bad(
                "INVALID_REPLICATION_DATE", "startDate must chronologically precede endDate by more than one minute"
            )
        now = self._now()
        if start < _trunc_minute(now - timedelta(days=days)):
            raise _bad("INVALID_REPLICATION_DATE", f"startDate cannot be more than {days} days ago")
        return start, min(end, _trunc_minute(now))

    def _updated(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        start, latest = self._window(request, UPDATED_WINDOW_DAYS)
        lo, hi = sf_datetime(start), sf_datetime(latest)
        with self.lock:
            ids = [
                r["Id"]
                for r in self.records[odef.name].values()
                if not r["IsDeleted"] and lo <= r["SystemModstamp"] < hi
            ]
        return Response.json({"ids": ids, "latestDateCovered": hi})

    def _deleted(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        start, latest = self._window(request, DELETED_WINDOW_DAYS)
        lo, hi = sf_datetime(start), sf_datetime(latest)
        earliest = sf_datetime(_trunc_minute(self._now() - timedelta(days=DELETED_WINDOW_DAYS)))
        with self.lock:
            rows = [
                {"id": r["Id"], "deletedDate": r["_deleted"]}
                for r in self.records[odef.name].values()
                if r["IsDeleted"] and lo <= r["_deleted"] < hi
            ]
        rows.sort(key=lambda d: d["deletedDate"])
        return Response.json({"deletedRecords": rows, "earliestDateAvailable": earliest, "latestDateCovered": hi})
