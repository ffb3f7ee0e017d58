"""Records of the Salesforce emulator: record-level errors, ids, JSON body parsing and the
in-memory store with its External ID indexes and undo log (transactions)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..server import HTTPError, Request
from .schema import BASE62
from .soql import FieldDef, ObjectDef


class RecordError(Exception):
    """A record-level (DML) error: rendered with ``errorCode`` in REST, ``statusCode`` in collections."""

    def __init__(self, code: str, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = list(fields)

    def item(self) -> dict[str, Any]:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}

    def http(self, status: int = 400) -> HTTPError:
        return HTTPError(status, self.code, self.message, fields=self.fields)


def _success(record_id: str, **extra: Any) -> dict[str, Any]:
    """A record's result in a collection (and an upsert's answer): its id, no errors."""
    return {"id": record_id, "success": True, "errors": [], **extra}


def _bad(code: str, message: str, status: int = 400) -> HTTPError:
    return HTTPError(status, code, message)


def _not_found() -> HTTPError:
    return _bad("NOT_FOUND", "The requested resource does not exist", 404)


def _ext_not_found(value: str) -> HTTPError:
    return _bad("NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {value}", 404)


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, rem = divmod(n, 62)
        out.append(BASE62[rem])
    return "".join(reversed(out))


def _trunc_minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def _json_token(value: Any) -> tuple[str, str]:
    """(Jackson token name, text) of a JSON value, for JSON_PARSER_ERROR messages."""
    if isinstance(value, bool):
        return ("VALUE_TRUE" if value else "VALUE_FALSE"), ("true" if value else "false")
    if isinstance(value, int):
        return "VALUE_NUMBER_INT", str(value)
    if isinstance(value, float):
        return "VALUE_NUMBER_FLOAT", repr(value)
    if isinstance(value, dict):
        return "START_OBJECT", "{"
    if isinstance(value, list):
        return "START_ARRAY", "["
    return "VALUE_STRING", str(value)


class _Locator:
    """Finds where a key's value sits in a raw JSON body, for Jackson-style ``[line:L, column:C]``."""

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.seen: dict[str, int] = {}

    def where(self, key: str) -> str:
        occurrence = self.seen.get(key.lower(), 0)
        pattern = re.compile(r'"' + re.escape(key) + r'"\s*:\s*', re.IGNORECASE)
        matches = list(pattern.finditer(self.raw))
        pos = 0
        if matches:
            match = matches[min(occurrence, len(matches) - 1)]
            pos = match.end()
            token = re.match(r'"(?:[^"\\]|\\.)*"|[^,}\]\s]+|[\[{]', self.raw[pos:])
            pos += len(token.group(0)) if token else 0
        line = self.raw.count("\n", 0, pos) + 1
        column = pos - (self.raw.rfind("\n", 0, pos) + 1)
        return f"[line:{line}, column:{column}]"

    def advance(self, record: dict[str, Any]) -> None:
        for key in record:
            self.seen[key.lower()] = self.seen.get(key.lower(), 0) + 1


def _json_type_name(fdef: FieldDef) -> str:
    return {"id": "id", "reference": "id", "datetime": "datetime"}.get(
        fdef.type, fdef.type if fdef.type in ("boolean", "currency", "double", "int", "date") else "string"
    )


@dataclass
class _Cursor:
    id: str
    records: list[dict[str, Any]]
    endpoint: str
    version: str
    batch: int
    touched: float


class _Source:
    """The :class:`soql.DataSource` over the emulator's store, with a per-query child index."""

    def __init__(self, store: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.store = store
        self._children: dict[tuple[str, str, bool], dict[str, list[dict[str, Any]]]] = {}

    def rows(self, obj: str, include_deleted: bool) -> Iterable[dict[str, Any]]:
        records = self.store.get(obj, {}).values()
        return list(records) if include_deleted else [r for r in records if not r["IsDeleted"]]

    def by_id(self, obj: str, record_id: str) -> dict[str, Any] | None:
        return self.store.get(obj, {}).get(record_id)

    def children(self, child: str, fk: str, parent_id: str, include_deleted: bool) -> list[dict[str, Any]]:
        key = (child, fk, include_deleted)
        index = self._children.get(key)
        if index is None:
            index = {}
            for rec in self.rows(child, include_deleted):
                if rec.get(fk):
                    index.setdefault(rec[fk], []).append(rec)
            self._children[key] = index
        return index.get(parent_id, [])


class MultipleMatches(Exception):
    """An upsert's External ID value names several records (the API answers 300 with their URLs)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids


class StoreMixin:
    """The record store of :class:`SalesforceEmulator` (callers hold ``self.lock``)."""

    # -- request parsing ---------------------------------------------------------------
    @staticmethod
    def _body(request: Request) -> tuple[Any, str]:
        """The JSON body and its text; Jackson-style JSON_PARSER_ERROR otherwise."""
        text = request.body.decode("utf-8", errors="replace")
        if not text.strip():
            raise _bad("JSON_PARSER_ERROR", "No content to map due to end-of-input at [line:1, column:0]")
        try:
            return json.loads(text), text
        except json.JSONDecodeError as exc:
            ch = text[exc.pos] if exc.pos < len(text) else "<EOF>"
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Unexpected character ('{ch}' (code {ord(ch) if len(ch) == 1 else -1})): was expecting double-quote "
                f"to start field name or a valid value at [line:{exc.lineno}, column:{exc.colno}]",
            ) from None

    def _object(self, name: str) -> ObjectDef:
        odef = self.schema.get(name)
        if odef is None:
            raise _not_found()
        return odef

    def _url(self, version: str, obj: str, record_id: str) -> str:
        return f"/services/data/v{version}/sobjects/{obj}/{record_id}"

    # -- the store ----------------------------------------------------------------------
    def _reset_store(self) -> None:
        self.records = {name: {} for name in self.schema.objects}
        self._ext_index = {}
        for odef in self.schema.objects.values():
            for fdef in odef.fields.values():
                if fdef.external_id or fdef.unique:
                    self._ext_index[(odef.name, fdef.name)] = {}
        if "OpportunityContactRole" in self.records:  # an opportunity's roles, for :meth:`_after_write`
            self._ext_index[("OpportunityContactRole", "OpportunityId")] = {}

    def _index_ops(self, obj: str, record: dict[str, Any] | None, add: bool) -> None:
        if record is None or record.get("IsDeleted"):
            return
        for (iobj, fname), index in self._ext_index.items():
            if iobj != obj:
                continue
            value = record.get(fname)
            if value is None:
                continue
            key = str(value).casefold()
            if add:
                index.setdefault(key, set()).add(record["Id"])
            else:
                ids = index.get(key)
                if ids is not None:
                    ids.discard(record["Id"])
                    if not ids:
                        del index[key]

    def _put(self, obj: str, record: dict[str, Any]) -> None:
        store = self.records[obj]
        old = store.get(record["Id"])
        if self._undo is not None:
            self._undo.append((obj, record["Id"], old))
        self._index_ops(obj, old, add=False)
        store[record["Id"]] = record
        self._index_ops(obj, record, add=True)

    @contextmanager
    def _transaction(self) -> Iterator[list[tuple[str, str, dict[str, Any] | None]]]:
        """Collect an undo log of every store write; :meth:`_rollback` reverts it."""
        outer = self._undo
        self._undo = []
        try:
            yield self._undo
        finally:
            self._undo = outer

    def _rollback(self, log: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        for obj, record_id, old in reversed(log):
            store = self.records[obj]
            self._index_ops(obj, store.get(record_id), add=False)
            if old is None:
                store.pop(record_id, None)
            else:
                store[record_id] = old
                self._index_ops(obj, old, add=True)

    def _ext_matches(self, obj: str, fname: str, value: Any) -> list[str]:
        index = self._ext_index.get((obj, fname))
        if index is None:
            return []
        return sorted(index.get(str(value).casefold(), ()))
