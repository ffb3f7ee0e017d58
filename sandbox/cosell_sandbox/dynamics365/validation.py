"""Validation of Dataverse writes: values as column types, ``@odata.bind`` lookups, defaults,
required columns and state transitions, then insert and modify."""

from __future__ import annotations

import json
import math
import uuid
from datetime import date, datetime
from typing import Any

from ..server import Request
from . import clock
from .records import (
    _duplicate,
    _err,
    _invalid_property,
    _not_convertible,
    _parse_key,
    _payload,
    _stamp,
    _undeclared,
    _validation,
)
from .schema import (
    _BIND,
    _DATE_RE,
    _DATETIME_RE,
    _GUID_RE,
    LOST,
    MONEY_MAX,
    OPEN,
    OPPORTUNITIES,
    STATE_NAMES,
    STATES,
    TABLES,
    WON,
    Column,
    Table,
)


class ValidationMixin:
    """Column validation and row writes of :class:`Dynamics365Emulator`."""

    # -- writes: validation --------------------------------------------------------------------
    def _coerce(self, table: Table, column: Column, value: Any) -> Any:
        if value is None:
            return None
        kind = column.kind
        if kind in ("string", "memo"):
            if not isinstance(value, str):
                raise _not_convertible(table, value, column)
            if value == "":
                return None  # Dataverse stores an empty string as null
            if column.max_length is not None and len(value) > column.max_length:
                raise _validation(
                    f"A validation error occurred.  The length of the '{column.name}' attribute of the "
                    f"'{table.logical}' entity exceeded the maximum allowed length of '{column.max_length}'."
                )
            return value
        if kind in ("money", "decimal"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _not_convertible(table, value, column)
            low = column.minimum if column.minimum is not None else -MONEY_MAX
            high = column.maximum if column.maximum is not None else MONEY_MAX
            if not low <= value <= high:
                raise _validation(
                    f"A validation error occurred. The value {value} of '{column.name}' on record of type "
                    f"'{table.logical}' is outside the valid range. Accepted Values: {low:g} - {high:g}"
                )
            return value
        if kind in ("int", "bigint", "choice"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _not_convertible(table, value, column)
            choices = self.metadata.values(table.logical, column.name) if kind == "choice" else []
            if choices and value not in choices:
                # PicklistValueOutOfRange 0x8004431A, with the platform's validation message; the
                # options come from the column's option set (choices.CHOICES).
                raise _err(
                    400,
                    "0x8004431a",
                    f"A validation error occurred. The value {value} of '{column.name}' on record of type "
                    f"'{table.logical}' is outside the valid range. Accepted Values: "
                    + ",".join(str(c) for c in choices),
                )
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise _not_convertible(table, value, column)
            return value
        if kind == "date":
            try:
                if not isinstance(value, str) or not _DATE_RE.match(value):
                    raise ValueError(value)
                return date.fromisoformat(value).isoformat()
            except ValueError:
                raise _not_convertible(table, value, column) from None
        if kind == "datetime":
            match = _DATETIME_RE.match(value) if isinstance(value, str) else None
            try:
                if not match:
                    raise ValueError(value)
                return _stamp(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                raise _not_convertible(table, value, column) from None
        if kind == "guid":
            if not isinstance(value, str) or not _GUID_RE.match(value):
                raise _not_convertible(table, value, column)
            return value.lower()
        raise _not_convertible(table, value, column)

    def _bind(self, table: Table, column: Column, value: Any) -> str | None:
        """``"<nav>@odata.bind": "/accounts(<guid>)"`` (relative, absolute, or ``$n`` resolved)."""
        if value is None:
            return None  # a null bind clears the lookup
        match = _BIND.match(value.strip()) if isinstance(value, str) else None
        if not match or match.group("set") != column.target:
            raise _payload(
                table,
                f"Microsoft.OData.ODataException: The value '{value}' of the '{column.nav}@odata.bind' annotation "
                f"is not a valid reference to an entity in '{column.target}'.",
            )
        target = TABLES[match.group("set")]
        ref = _parse_key(target, match.group("key"))
        row = self._find(target, ref)
        if row is None:
            raise self._missing(target, ref)
        return str(row[target.pk])

    def _changes(self, table: Table, body: Any) -> dict[str, Any]:
        """The column values a write body sets, validated and converted."""
        if not isinstance(body, dict):
            raise _payload(table, "Microsoft.OData.ODataException: The payload must be a JSON object.")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key.startswith("@"):
                if key == "@odata.type" and str(value).lstrip("#") != table.type_name:
                    raise _payload(
                        table,
                        f"Microsoft.OData.ODataException: A resource with type '{str(value).lstrip('#')}' was "
                        f"found, but it is not assignable to the expected type '{table.type_name}'.",
                    )
                continue
            prop, at, annotation = key.partition("@")
            column = table.column(prop) if self.custom.has(table, prop) else None
            if at:
                nav = table.navs.get(prop)
                if annotation == "odata.bind":
                    if nav is None:  # e.g. the lookup's logical name instead of its navigation property
                        raise _undeclared(table, prop)
                    changes[nav.name] = self._bind(table, nav, value)
                elif column is None and nav is None:
                    raise _undeclared(table, prop)
                continue
            if column is None:
                if prop in table.navs:
                    raise _payload(
                        table,
                        "Microsoft.OData.ODataException: A 'PrimitiveValue' node with non-null value was found when "
                        f"trying to read the value of the navigation property '{prop}'; however, a 'StartArray' "
                        "node, a 'StartObject' node, or a 'PrimitiveValue' node with null value was expected.",
                    )
                raise _invalid_property(table, prop)
            if column.kind == "lookup":
                raise _payload(
                    table,
                    "Microsoft.Crm.CrmHttpException: CRM do not support direct update of Entity Reference "
                    "properties, Use Navigation properties instead.",
                )
            if column.system:
                continue  # createdon, modifiedon, versionnumber: not valid for create/update; ignored
            changes[column.name] = self._coerce(table, column, value)
        return changes

    def _defaults(self, table: Table) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(table.names)
        row.update({c.name: c.default for c in table.columns if c.default is not None})
        if table.set in STATES:
            row.update(statecode=0, statuscode=1)
        if table is OPPORTUNITIES:
            row["cosell_syncwithpartnercenter"] = False
            # The currency defaults to the organization's base currency.
            row["_transactioncurrencyid_value"] = self._currency_id("USD")
        return row

    def _check_row(self, table: Table, row: dict[str, Any]) -> None:
        if self.config.enforce_required:
            for column in table.columns:
                if column.required and row.get(column.name) is None:
                    # Guessed text: the documentation does not show the API's message for this.
                    raise _validation(
                        f"A validation error occurred. The value for '{column.name}' on record of type "
                        f"'{table.logical}' is required."
                    )
        if table.alternate_key and row.get(table.alternate_key) is not None and self._key_active(table):
            owner = self._alt[table.set].get(str(row[table.alternate_key]).casefold())
            if owner is not None and owner != row[table.pk]:
                raise _duplicate()

    def _check_state(
        self, table: Table, old: dict[str, Any] | None, changes: dict[str, Any], row: dict[str, Any], trusted: bool
    ) -> None:
        states = STATES.get(table.set)
        if states is None:
            return
        state = changes.get("statecode")
        if table is OPPORTUNITIES and not trusted:
            if state in (WON, LOST):
                # CannotUseOpportunitySetStateMessage (0x80100005): won/lost only via the actions.
                word = STATE_NAMES[state].lower()
                raise _err(
                    400,
                    "0x80100005",
                    f"This message can not be used to set the state of opportunity to {word}. In order to set state "
                    f"of opportunity to {word}, use the {word} message instead.",
                )
            closed = old is not None and old["statecode"] != OPEN
            if closed and state != OPEN and self.config.closed_opportunity_writes == "reject":
                raise _err(400, "0x80040515", "The opportunity is already closed.")
        name, fitting = states[row["statecode"]]
        if "statecode" in changes and "statuscode" not in changes and row["statuscode"] not in fitting:
            row["statuscode"] = fitting[0]
        if row["statuscode"] not in fitting:
            entity = table.logical
            raise _err(
                400,
                "0x80040203",
                f"{row['statuscode']} is not a valid status code for state code {entity.capitalize()}State.{name} "
                f"on {entity} with Id {row[table.pk]}.",
            )

    def _insert(self, table: Table, changes: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        row_id = changes.pop(table.pk, None) or str(uuid.uuid4())
        if row_id in self.tables[table.set]:
            raise _duplicate()
        row = self._defaults(table)
        row.update(changes)
        row[table.pk] = row_id
        self._check_state(table, None, changes, row, trusted)
        self._check_row(table, row)
        now = _stamp(clock._now())
        row.update(createdon=now, modifiedon=now, versionnumber=self._next_version())
        self._store(table, row)
        return row

    def _modify(
        self, table: Table, old: dict[str, Any], changes: dict[str, Any], *, trusted: bool = False
    ) -> dict[str, Any]:
        if changes.get(table.pk, old[table.pk]) != old[table.pk]:
            raise _err(400, "0x80040203", f"The '{table.pk}' in the body does not match the record being updated.")
        row = dict(old)
        row.update(changes)
        self._check_state(table, old, changes, row, trusted)
        self._check_row(table, row)
        row.update(modifiedon=_stamp(clock._now()), versionnumber=self._next_version())
        self._store(table, row)
        return row

    def _body(self, request: Request, table: Table | None) -> Any:
        if not request.body.strip():
            raise _payload(table, "Microsoft.OData.ODataException: The request body is empty.")
        try:
            return json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _payload(table, f"Newtonsoft.Json.JsonReaderException: {exc}") from None
