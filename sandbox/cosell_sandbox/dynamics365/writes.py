"""Dataverse write handlers: create, update/upsert, delete, ``CreateMultiple``/``UpdateMultiple``/
``UpsertMultiple``, and ``WinOpportunity``/``LoseOpportunity``."""

from __future__ import annotations

from typing import Any

from ..server import Request, Response
from . import clock
from .records import (
    KeyRef,
    _condition,
    _duplicate,
    _err,
    _etag,
    _etag_matches,
    _json,
    _parse_key,
    _payload,
    _preferences,
    _query_error,
)
from .schema import (
    _BIND,
    API,
    LOST,
    NAMESPACE,
    OPEN,
    OPPORTUNITIES,
    OPPORTUNITY_CLOSE,
    STATE_NAMES,
    STATUS_FOR_STATE,
    WON,
    Table,
)


class WritesMixin:
    """The write handlers of :class:`Dynamics365Emulator`."""

    # -- handlers: writes ------------------------------------------------------------------------
    def _select_only(self, request: Request, table: Table) -> list[str] | None:
        q = self._query(request, table)
        extra = [k for k in q.raw if k != "$select"]
        if extra:
            raise _query_error(f"The query parameter '{extra[0]}' is not supported on this request.")
        return q.select

    def _representation(self, table: Table, row: dict[str, Any], select: list[str] | None, status: int) -> Response:
        body = {"@odata.context": self._context(table, select, "/$entity"), **self._public(table, row, select)}
        return _json(body, status, {"ETag": _etag(row), "Preference-Applied": "return=representation"})

    def _create(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        select = self._select_only(request, table)
        body = self._body(request, table)
        with self.lock:
            row = dict(self._insert(table, self._changes(table, body)))
        if _preferences(request.headers).return_representation:
            return self._representation(table, row, select, 201)
        return Response.empty(204, {"OData-EntityId": self._url(f"{table.set}({row[table.pk]})")})

    def _patch(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        select = self._select_only(request, table)
        body = self._body(request, table)
        if_match, if_none = _condition(request, "If-Match"), _condition(request, "If-None-Match")
        with self.lock:
            changes = self._changes(table, body)
            old = self._find(table, ref)
            if old is not None and if_none == "*":
                raise _duplicate()
            if if_match is not None:
                if old is None:
                    raise self._missing(table, ref)
                if not _etag_matches(if_match, old):
                    raise _err(
                        412,
                        "0x80060882",
                        "The version of the existing record doesn't match the RowVersion property provided.",
                    )
            if old is None:  # upsert: create
                if ref.kind == "id":
                    if changes.get(table.pk, ref.value) != ref.value:
                        raise _err(
                            400, "0x80040203", f"The '{table.pk}' in the body does not match the key in the URL."
                        )
                    changes[table.pk] = ref.value
                else:  # the body's key value wins when it differs from the URL's (documented)
                    changes.setdefault(str(table.alternate_key), ref.value)
                row, created = dict(self._insert(table, changes)), True
            else:
                if ref.kind == "alt":
                    changes.pop(str(table.alternate_key), None)  # key data in the body is ignored on update
                row, created = dict(self._modify(table, old, changes)), False
        if _preferences(request.headers).return_representation:
            return self._representation(table, row, select, 201 if created else 200)
        return Response.empty(204, {"OData-EntityId": self._url(ref.segment(table))})

    def _delete(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        if_match = _condition(request, "If-Match")
        with self.lock:
            row = self._find(table, ref)
            if row is None:
                raise self._missing(table, ref)
            if if_match is not None and not _etag_matches(if_match, row):
                raise _err(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                )
            self._discard(table, row[table.pk])
        return Response.empty(204)

    def _target(self, table: Table, target: Any, index: int) -> dict[str, Any]:
        if not isinstance(target, dict):
            raise _payload(table, f"Microsoft.OData.ODataException: Targets[{index}] is not an entity.")
        kind = target.get("@odata.type")
        if kind is None:
            # The @odata.type annotation is required on every item of Targets (documented).
            raise _payload(
                table,
                "Microsoft.OData.ODataException: A type annotation ('@odata.type') is required for every item in "
                f"the 'Targets' parameter; item {index} has none.",
            )
        if str(kind).lstrip("#") != table.type_name:
            raise _payload(
                table,
                f"Microsoft.OData.ODataException: Targets[{index}] has the type '{str(kind).lstrip('#')}', but the "
                f"action is bound to '{table.type_name}'.",
            )
        return target

    def _multiple(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        action = request.params["action"]
        body = self._body(request, table)
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not targets:
            raise _payload(table, f"Microsoft.OData.ODataException: {action} requires a non-empty 'Targets' parameter.")
        ids: list[str] = []
        with self.lock, self._transaction():  # standard tables: any error rolls back the whole call
            for index, raw in enumerate(targets):
                target = self._target(table, raw, index)
                changes = self._changes(table, target)
                if action == "CreateMultiple":
                    ids.append(str(self._insert(table, changes)[table.pk]))
                    continue
                ref: KeyRef | None = None
                if "@odata.id" in target:
                    match = _BIND.match(str(target["@odata.id"]).strip())
                    if not match or match.group("set") != table.set:
                        raise _payload(
                            table, f"Microsoft.OData.ODataException: '{target['@odata.id']}' is not a valid @odata.id."
                        )
                    ref = _parse_key(table, match.group("key"))
                elif table.pk in changes:
                    ref = KeyRef("id", str(changes[table.pk]))
                if action == "UpdateMultiple":
                    if ref is None:
                        raise _err(
                            400, "0x80040203", f"Targets[{index}] does not identify a record: '{table.pk}' is missing."
                        )
                    old = self._find(table, ref)
                    if old is None:
                        raise self._missing(table, ref)
                    self._modify(table, old, changes)
                    continue
                old = self._find(table, ref) if ref is not None else None
                if old is not None:
                    if ref is not None and ref.kind == "alt":
                        changes.pop(str(table.alternate_key), None)
                    self._modify(table, old, changes)
                else:
                    if ref is not None and ref.kind == "alt":
                        changes.setdefault(str(table.alternate_key), ref.value)
                    elif ref is not None:
                        changes[table.pk] = ref.value
                    self._insert(table, changes)
        if action == "CreateMultiple":
            return _json(
                {"@odata.context": f"{self.audience()}{API}/$metadata#{NAMESPACE}.CreateMultipleResponse", "Ids": ids}
            )
        return Response.empty(204)  # UpdateMultiple; UpsertMultiple returns 204 too (documented)

    def _close_opportunity(self, request: Request) -> Response:
        won = request.params["action"] == "WinOpportunity"
        body = self._body(request, None)
        close = body.get("OpportunityClose") if isinstance(body, dict) else None
        status = body.get("Status") if isinstance(body, dict) else None
        if not isinstance(close, dict):
            raise _payload(None, "Microsoft.OData.ODataException: The parameter 'OpportunityClose' is required.")
        if isinstance(status, bool) or not isinstance(status, int):
            raise _payload(None, "Microsoft.OData.ODataException: The parameter 'Status' must be an Edm.Int32.")
        with self.lock:
            details = self._changes(OPPORTUNITY_CLOSE, close)
            opportunity_id = details.get("_opportunityid_value")
            if opportunity_id is None:
                raise _err(
                    400, "0x80040203", "The OpportunityClose entity must reference an opportunity (opportunityid)."
                )
            opportunity = self.tables["opportunities"][opportunity_id]
            if opportunity["statecode"] != OPEN:
                raise _err(400, "0x80040515", "The opportunity is already closed.")
            state = WON if won else LOST
            if status not in STATUS_FOR_STATE[state]:
                raise _err(
                    400,
                    "0x80040203",
                    f"{status} is not a valid status code for state code OpportunityState.{STATE_NAMES[state]} "
                    f"on opportunity with Id {opportunity_id}.",
                )
            changes: dict[str, Any] = {
                "statecode": state,
                "statuscode": status,
                "actualclosedate": details.get("actualend") or clock._now().date().isoformat(),
            }
            if details.get("actualrevenue") is not None:
                changes["actualvalue"] = details["actualrevenue"]
            self._modify(OPPORTUNITIES, opportunity, changes, trusted=True)
        return Response.empty(204)
