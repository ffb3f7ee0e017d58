"""Dataverse columns: the names the mapping's ``crm`` paths resolve to, and canonical values as
Dataverse takes them (choices as ints, dates as ``YYYY-MM-DD``, the currency as a lookup bind).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping
from cosell_sync.engine.normalize import as_boolean, side_value
from cosell_sync.hooks.dynamics365 import GUID, LOST, WON, DynamicsHook
from cosell_sync.sides.base import (
    missing,
    plain,
)

ID_CHUNK = 50  # values per "$filter=x eq a or x eq b ..." read (keeps the URL short)
ACCOUNT, CONTACT, CURRENCY = "account", "contact", "transactioncurrency"  # nested prefixes of crm paths
ACCOUNT_LOOKUP, CONTACT_LOOKUP, CURRENCY_LOOKUP = "parentaccountid", "parentcontactid", "transactioncurrencyid"
CONTACT_ACCOUNT_LOOKUP = "parentcustomerid_account"
ACCOUNT_NAME, ACCOUNT_POSTAL_CODE, CONTACT_EMAIL, CONTACT_LAST_NAME = (
    "name",
    "address1_postalcode",
    "emailaddress1",
    "lastname",
)


CURRENCY_CODE = "isocurrencycode"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_INTEGER = re.compile(r"-?\d+")


class RowError(ValueError):
    """A record cannot be written as it is (the message names the field)."""


def email_key(value: Any) -> str | None:
    if missing(value) or not str(value).strip():
        return None
    return str(value).strip().lower()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def every_row(answers: Sequence[list[dict[str, Any]] | Exception]) -> Iterator[dict[str, Any]]:
    """Every row of :meth:`~cosell_sync.hooks.dynamics365.DynamicsHook.query_each`'s answers,
    once none failed (else the first failed read's exception is raised)."""
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer
    for answer in answers:
        yield from answer  # type: ignore[misc]


def is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(GUID.fullmatch(value))


def cell_text(value: Any) -> str | None:
    return None if missing(value) or value == "" else str(value)


class DynamicsValues:
    """Canonical values as opportunity, account and contact columns."""

    def column_value(self, fm: FieldMapping, canonical: Any) -> Any:
        """A canonical value as Dataverse takes it (choices as ints, dates as ``YYYY-MM-DD``);
        None for a missing value. Raises :class:`ValueError` naming the field."""
        if missing(canonical) or canonical == KEEP:
            return None
        canonical = plain(canonical)
        if fm.type == "enum":
            raw = side_value(fm, "crm", canonical)
            if raw is None:
                known = ", ".join(sorted(fm.crm_values.write)) if fm.crm_values else ""
                raise RowError(f"{fm.name}: {canonical!r} has no Dynamics 365 value for {fm.crm} (known: {known})")
            return int(raw) if _INTEGER.fullmatch(raw) else raw
        if fm.type == "boolean":  # a Yes/No (Two Options) column takes JSON true/false
            flag = as_boolean(canonical)
            if flag is None:
                raise RowError(f"{fm.name}: {canonical!r} is not true or false")
            return flag
        if fm.type == "decimal":
            if isinstance(canonical, bool):
                raise RowError(f"{fm.name}: {canonical!r} is not a number")
            try:
                number = float(canonical)
            except (TypeError, ValueError):
                raise RowError(f"{fm.name}: {canonical!r} is not a number") from None
            if not math.isfinite(number):
                raise RowError(f"{fm.name}: {canonical!r} is not a finite number")
            return int(number) if isinstance(canonical, int) else number
        if fm.type == "date":
            if isinstance(canonical, str) and _ISO_DATE.fullmatch(canonical.strip()):
                return canonical.strip()
            try:
                return pd.to_datetime(canonical, utc=True, format="ISO8601").strftime("%Y-%m-%d")
            except (TypeError, ValueError):
                raise RowError(f"{fm.name}: {canonical!r} is not an ISO 8601 date") from None
        if fm.type == "id_list" and isinstance(canonical, list | tuple | set):
            return ";".join(sorted({str(i).strip() for i in canonical if str(i).strip()})) or None
        return str(canonical)

    def _stage_action(self, canonical: Any) -> int | None:
        """WON or LOST when ``canonical`` (the stage) closes the opportunity, else None."""
        if self.stage_field is None or missing(canonical) or canonical == KEEP:
            return None
        raw = side_value(self.stage_field, "crm", plain(canonical))
        if raw is None:
            known = ", ".join(sorted(self.stage_field.crm_values.write)) if self.stage_field.crm_values else ""
            raise RowError(f"{self.stage_field.name}: {canonical!r} has no Dynamics 365 value (known: {known})")
        state = int(raw) if _INTEGER.fullmatch(raw) else None
        return state if state in (WON, LOST) else None

    def _currency_bind(self, code: Any) -> str:
        try:
            currency_id = self.hook.currency_id(str(code))
        except LookupError as exc:
            name = self.currency_field.name if self.currency_field else "currency"
            raise RowError(f"{name}: {exc.args[0] if exc.args else exc}") from None
        return DynamicsHook.bind("transactioncurrencies", currency_id)

    def _opportunity_columns(self, values: Mapping[str, Any], *, clear_missing: bool) -> dict[str, Any]:
        """The opportunity columns (and the currency lookup) for canonical ``values``; a missing
        value clears its column with ``clear_missing``, else it is left out. The currency is
        never cleared (Dataverse needs one)."""
        body: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, str) and value == KEEP:
                continue  # no opinion
            fm = self.opportunity_fields.get(name)
            if fm is not None:
                converted = self.column_value(fm, value)
                if converted is not None or clear_missing:
                    body[fm.crm] = converted
            elif self.currency_field is not None and name == self.currency_field.name and not missing(value):
                body[f"{CURRENCY_LOOKUP}@odata.bind"] = self._currency_bind(value)
        return body

    def _nested_body(self, values: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
        """An account or contact row from canonical values (missing values left out)."""
        body: dict[str, Any] = {}
        for name, column in columns.items():
            value = self.column_value(self.mapping.fields[name], values.get(name))
            if value is not None:
                body[column] = value
        return body
