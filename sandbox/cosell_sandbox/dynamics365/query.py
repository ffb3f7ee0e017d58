"""Dataverse reads: query options (``$select``/``$filter``/``$orderby``/``$top``/``$count``), paging
and delta tokens, and the read handlers (collections, change tracking, single rows, metadata)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from ..server import HTTPError, Request, Response
from . import clock
from .odata import FilterOptions, ODataError, compile_filter, parse_orderby, sort_records
from .records import (
    _b64,
    _condition,
    _err,
    _etag,
    _etag_matches,
    _json,
    _parse_key,
    _preferences,
    _query_error,
    _segment_not_found,
    _unb64,
    _unknown_property,
)
from .schema import _IDENTIFIER, _STRING_LITERAL, API, JSON_TYPE, MAX_COUNT, MAX_PAGE_SIZE, NAMESPACE, TABLES, Table


@dataclass
class _Query:
    select: list[str] | None = None
    filter: str | None = None
    orderby: str | None = None
    top: int | None = None
    count: bool = False
    expand: str | None = None
    skiptoken: str | None = None
    deltatoken: str | None = None
    raw: dict[str, str] = field(default_factory=dict)


_QUERY_OPTIONS = ("$select", "$filter", "$orderby", "$top", "$count", "$expand", "$skiptoken", "$deltatoken")
_UNSUPPORTED_OPTIONS = ("$skip", "$search", "$format")


class QueryMixin:
    """The read handlers of :class:`Dynamics365Emulator`."""

    # -- reads: query options --------------------------------------------------------------------
    def _check_names(self, table: Table, expr: str) -> None:
        """Property names are case-sensitive: ``Name`` is not ``name``."""
        known = {name.lower(): name for name in self._names(table)}
        for word in _IDENTIFIER.findall(_STRING_LITERAL.sub("''", expr)):
            exact = known.get(word.lower())
            if exact is not None and exact != word:
                raise _unknown_property(table, word)

    def _query(self, request: Request, table: Table) -> _Query:
        q = _Query()
        for name, values in request.query.items():
            if not name.startswith("$"):
                continue
            if name in _UNSUPPORTED_OPTIONS:
                raise _query_error(f"The query parameter {name} is not supported")
            if name not in _QUERY_OPTIONS:
                raise _query_error(f"The query parameter '{name}' is not supported.")
            if len(values) > 1:
                raise _query_error(
                    f"Query option '{name}' was specified more than once, but it must be specified at most once."
                )
            q.raw[name] = values[0]
        raw = q.raw
        if "$select" in raw:
            names = [s.strip() for s in raw["$select"].split(",") if s.strip()]
            for name in names:
                if table.column(name) is None or name not in self._names(table):
                    raise _unknown_property(table, name)
            q.select = names or None
        q.filter = raw.get("$filter") or None
        q.orderby = raw.get("$orderby") or None
        q.expand = raw.get("$expand") or None
        q.skiptoken = raw.get("$skiptoken") or None
        q.deltatoken = raw.get("$deltatoken") or None
        if "$top" in raw:
            text = raw["$top"].strip()
            if not text.isdigit():
                raise _query_error(
                    f"Invalid value '{text}' for $top query option found. "
                    "The $top query option requires a non-negative integer value."
                )
            q.top = int(text)
            if q.top > MAX_PAGE_SIZE:
                # Guess: Dataverse (FetchXML top) does not return more than 5,000 rows for $top.
                raise _query_error(f"The $top query option value {q.top} exceeds the maximum of {MAX_PAGE_SIZE}.")
        if "$count" in raw:
            text = raw["$count"].strip().lower()
            if text not in ("true", "false"):
                raise _query_error(f"'{raw['$count']}' is not a valid count option.")
            q.count = text == "true"
        return q

    def _predicate(self, table: Table, q: _Query) -> Callable[[dict[str, Any]], bool] | None:
        if not q.filter:
            return None
        self._check_names(table, q.filter)
        options = FilterOptions(
            allowed_paths=frozenset(self._names(table)),
            functions=frozenset({"contains", "startswith", "endswith"}),
            case_insensitive_strings=True,  # SQL's case-insensitive collation
        )
        try:
            return compile_filter(q.filter, options)  # type: ignore[return-value]
        except ODataError as exc:
            raise self._rephrase(table, exc) from None

    def _order(self, table: Table, q: _Query) -> list[tuple[str, bool]]:
        if not q.orderby:
            return []
        self._check_names(table, q.orderby)
        try:
            return parse_orderby(q.orderby, frozenset(self._names(table)))
        except ODataError as exc:
            raise self._rephrase(table, exc) from None

    @staticmethod
    def _rephrase(table: Table, exc: ODataError) -> HTTPError:
        match = re.match(r"Could not find a property named '([^']+)'", str(exc))
        if match:
            return _unknown_property(table, match.group(1))
        return _query_error(str(exc))

    # -- reads: paging tokens ---------------------------------------------------------------------
    def _fingerprint(self, table: Table, q: _Query) -> str:
        parts = [table.set] + [q.raw.get(k, "") for k in ("$select", "$filter", "$orderby", "$top", "$count")]
        parts.append(q.raw.get("$deltatoken", ""))
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def _skiptoken(self, payload: dict[str, Any]) -> str:
        """An opaque paging cookie in Dataverse's outer shape, signed so it cannot be edited."""
        data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        blob = _b64(data) + "." + _b64(hmac.new(self._secret, data, hashlib.sha256).digest()[:12])
        tracking = "True" if payload.get("tr") else "False"
        return f'<cookie pagenumber="{payload["p"]}" pagingcookie="{blob}" istracking="{tracking}" />'

    def _read_skiptoken(self, table: Table, q: _Query) -> dict[str, Any] | None:
        if q.skiptoken is None:
            return None
        match = re.search(r'pagingcookie="([^".]+)\.([^"]+)"', q.skiptoken)
        payload: dict[str, Any] | None = None
        if match:
            with contextlib.suppress(ValueError, json.JSONDecodeError):
                data = _unb64(match.group(1))
                expected = hmac.new(self._secret, data, hashlib.sha256).digest()[:12]
                if hmac.compare_digest(expected, _unb64(match.group(2))):
                    payload = json.loads(data)
        if payload is None or payload.get("q") != self._fingerprint(table, q):
            # Guessed text: the nextLink must be sent back unchanged.
            raise _query_error("The $skiptoken query option value is not valid for this query.")
        return payload

    def _link(self, request: Request, table: Table, params: list[tuple[str, str]]) -> str:
        safe = "$,()'*:@/="
        query = "&".join(f"{k}={quote(v, safe=safe)}" for k, v in params)
        return f"{self._url(table.set)}?{query}" if query else self._url(table.set)

    def _next_link(self, request: Request, table: Table, q: _Query, payload: dict[str, Any]) -> str:
        params = [(k, v) for k, v in q.raw.items() if k != "$skiptoken"]
        params.append(("$skiptoken", self._skiptoken(payload)))
        return self._link(request, table, params)

    def _delta_link(self, request: Request, table: Table, q: _Query, seq: int) -> str:
        params = [("$select", q.raw["$select"])] if "$select" in q.raw else []
        # The real token looks like "919042!08/22/2017 08:10:44": a version and when it was issued.
        token = f"{seq}!{clock._now().strftime('%m/%d/%Y %H:%M:%S')}"
        link = self._link(request, table, params)
        return f"{link}{'&' if params else '?'}$deltatoken={quote(token, safe='')}"

    def _read_deltatoken(self, text: str) -> int:
        match = re.fullmatch(r"(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})", text.strip())
        expired = _err(
            400, "0x80044352", "Version stamp associated with the client has expired. Please perform a full sync."
        )
        if not match:
            raise expired
        seq = int(match.group(1))
        issued = datetime.strptime(match.group(2), "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        age = (clock._now() - issued).total_seconds()
        if seq < self._floor or seq > self._seq or age > self.config.delta_token_lifetime_seconds:
            raise expired
        return seq

    # -- handlers: reads -------------------------------------------------------------------------
    def _service_document(self, request: Request) -> Response:
        value = [{"name": name, "kind": "EntitySet", "url": name} for name in TABLES]
        return _json({"@odata.context": f"{self.audience()}{API}/$metadata", "value": value})

    def _whoami(self, request: Request) -> Response:
        user = getattr(self._local, "user", "anonymous")
        return _json(
            {
                "@odata.context": f"{self.audience()}{API}/$metadata#{NAMESPACE}.WhoAmIResponse",
                "BusinessUnitId": self.business_unit_id,
                "UserId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"systemuser:{user}")),
                "OrganizationId": self.organization_id,
            }
        )

    def _metadata_options(self, request: Request) -> dict[str, str]:
        options: dict[str, str] = {}
        for name, values in request.query.items():
            if len(values) > 1 and name.startswith("$"):
                raise _query_error(
                    f"Query option '{name}' was specified more than once, but it must be specified at most once."
                )
            options[name] = values[0]
        return options

    def _entity_definitions(self, request: Request) -> Response:
        with self.lock:
            return _json(self.metadata.handle(request.params["rest"], self._metadata_options(request)))

    def _global_option_sets(self, request: Request) -> Response:
        with self.lock:
            return _json(self.metadata.global_option_sets(request.params["rest"], self._metadata_options(request)))

    def _unknown(self, request: Request) -> Response:
        if self._inner.resolve(request.method, request.path) is None:  # raises 405 for a wrong method
            raise _segment_not_found(request.path.rstrip("/").rsplit("/", 1)[-1])
        raise _segment_not_found(request.path)

    def _count(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        q = self._query(request, table)
        predicate = self._predicate(table, q)
        with self.lock:
            total = sum(1 for row in self.tables[table.set].values() if predicate is None or predicate(row))
        resp = Response(200, str(total).encode())
        resp.headers.set("Content-Type", "text/plain")
        return resp

    def _list(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        q = self._query(request, table)
        prefer = _preferences(request.headers)
        with self.lock:
            token = self._read_skiptoken(table, q)
            tracking = prefer.track_changes or q.deltatoken is not None or bool(token and token.get("tr"))
            if tracking:
                for name, value in (("filter", q.filter), ("orderby", q.orderby), ("expand", q.expand)):
                    if value is not None:
                        raise _query_error(
                            f'The "${name}" query parameter isn\'t supported when Change Tracking is enabled.'
                        )
                if "$top" in q.raw:
                    raise _query_error('The "$top" query parameter isn\'t supported when Change Tracking is enabled.')
            if q.expand is not None:
                raise _query_error("The sandbox does not implement $expand.")
            size, applied = (
                (prefer.maxpagesize, True)
                if prefer.maxpagesize and 0 < prefer.maxpagesize <= MAX_PAGE_SIZE
                else (MAX_PAGE_SIZE, False)
            )
            applied_prefs = [f"odata.maxpagesize={size}"] if applied else []
            if tracking and prefer.track_changes:
                applied_prefs.insert(0, "odata.track-changes")
            if q.deltatoken is not None:
                body = self._delta(request, table, q, token, size)
            else:
                body = self._collection(request, table, q, token, size, applied, tracking)
        headers = {"Preference-Applied": ", ".join(applied_prefs)} if applied_prefs else {}
        return _json(body, headers=headers)

    def _collection(
        self,
        request: Request,
        table: Table,
        q: _Query,
        token: dict[str, Any] | None,
        size: int,
        applied: bool,
        tracking: bool,
    ) -> dict[str, Any]:
        predicate = self._predicate(table, q)
        order = [*self._order(table, q), (table.pk, False)]  # the primary key breaks ties, as the paging cookie does
        rows = [r for r in self.tables[table.set].values() if predicate is None or predicate(r)]
        total = len(rows)
        rows = list(sort_records(rows, order))  # type: ignore[arg-type]
        if token is not None:
            # Keyset paging: resume strictly after the last row of the previous page.
            sentinel = {path: value for (path, _), value in zip(order, token["k"], strict=True)}
            ranked = sort_records([*rows, sentinel], order)
            position = next(i for i, r in enumerate(ranked) if r is sentinel)
            rows = list(ranked[position + 1 :])  # type: ignore[arg-type]
        if q.top is not None and not applied:
            page, more = rows[: q.top], False
        else:  # with odata.maxpagesize, $top is ignored
            page, more = rows[:size], len(rows) > size
        body: dict[str, Any] = {"@odata.context": self._context(table, q.select)}
        if q.count:
            body["@odata.count"] = min(total, MAX_COUNT)
        body["value"] = [self._public(table, row, q.select) for row in page]
        upto = token["dt"] if token and "dt" in token else self._seq
        if more:
            last = page[-1]
            payload = {
                "q": self._fingerprint(table, q),
                "p": (token["p"] if token else 1) + 1,
                "k": [last.get(path) for path, _ in order],
            }
            if tracking:
                payload.update(tr=1, dt=upto)
            body["@odata.nextLink"] = self._next_link(request, table, q, payload)
        elif tracking:
            body["@odata.deltaLink"] = self._delta_link(request, table, q, upto)
        return body

    def _delta(
        self, request: Request, table: Table, q: _Query, token: dict[str, Any] | None, size: int
    ) -> dict[str, Any]:
        since = self._read_deltatoken(q.deltatoken or "")
        upto = token["up"] if token else self._seq
        rows = self.tables[table.set]
        items = sorted(
            [(0, seq, rid) for rid, seq in self._row_seq[table.set].items() if since < seq <= upto]
            + [
                (1, seq, rid)
                for rid, seq in self._deleted[table.set].items()
                if since < seq <= upto and rid not in rows
            ]
        )  # new or updated rows first, then deleted ones
        if token is not None:
            after = tuple(token["k"])
            items = [item for item in items if item[:2] > after]
        page, more = items[:size], len(items) > size
        deleted_context = f"{self.audience()}{API}/$metadata#{table.set}/$deletedEntity"
        value: list[dict[str, Any]] = []
        for phase, _, rid in page:
            if phase == 0:
                value.append(self._public(table, rows[rid], q.select))
            else:
                value.append({"@odata.context": deleted_context, "id": rid, "reason": "deleted"})
        body: dict[str, Any] = {"@odata.context": self._context(table, q.select, "/$delta"), "value": value}
        if more:
            payload = {
                "q": self._fingerprint(table, q),
                "p": (token["p"] if token else 1) + 1,
                "k": list(page[-1][:2]),
                "tr": 1,
                "up": upto,
            }
            body["@odata.nextLink"] = self._next_link(request, table, q, payload)
        else:
            body["@odata.deltaLink"] = self._delta_link(request, table, q, upto)
        return body

    def _retrieve(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        q = self._query(request, table)
        for name in ("$filter", "$orderby", "$top", "$skiptoken", "$deltatoken"):
            if name in q.raw:
                raise _query_error(f"The query parameter '{name}' is not supported when retrieving a single record.")
        if q.expand is not None:
            raise _query_error("The sandbox does not implement $expand.")
        with self.lock:
            row = self._find(table, ref)
            if row is None:
                raise self._missing(table, ref)
            row = dict(row)
        if_none = _condition(request, "If-None-Match")
        if if_none is not None and if_none != "*" and _etag_matches(if_none, row):
            return Response.empty(304, {"ETag": _etag(row), "Content-Type": JSON_TYPE})
        body = {"@odata.context": self._context(table, q.select, "/$entity"), **self._public(table, row, q.select)}
        return _json(body, headers={"ETag": _etag(row)})
