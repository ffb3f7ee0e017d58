"""The publisher's customizations of the opportunity table, and the metadata writes that make them
(Microsoft Learn: "Create and update column definitions using the Web API", "Define alternate keys
using the Web API", "Insert, update, delete, and order global option sets" / ``InsertOptionValue``).

The emulator's schema (:mod:`.schema`) knows every ``cosell_*`` column the sync uses. An org made
with ``POST /_sandbox/config {"cosell_columns": false}`` does not have them yet: no such column,
no choice options, no ``cosell_referralid`` alternate key. Until created, a column is unknown
to queries, writes and table definitions alike, and addressing a row by the key fails.

* ``POST EntityDefinitions(LogicalName='opportunity')/Attributes`` with ``StringAttributeMetadata``,
  ``MemoAttributeMetadata``, ``BooleanAttributeMetadata`` or ``PicklistAttributeMetadata`` (its
  ``OptionSet.Options``, each ``Label.LocalizedLabels``; a ``null`` ``Value`` is given the
  publisher's next value) answers 204 with ``OData-EntityId``. A name in use is
  ``0x80047013`` "An attribute with the specified name already exists".
* ``POST EntityDefinitions(LogicalName='opportunity')/Keys`` (``EntityKeyMetadata``) answers 204;
  the key's index is built asynchronously, as in Dataverse: ``EntityKeyIndexStatus`` is
  ``Pending`` for ``key_activation_seconds``, then ``Active`` (or ``Failed`` when rows hold
  duplicate values). Only an ``Active`` key addresses rows.
* ``POST InsertOptionValue`` adds an option to a local choice column.
* ``MSCRM.SolutionUniqueName`` is accepted (the emulator has no solutions to add components to).

Limitation: the emulator adds only the ``cosell_*`` columns its schema knows, with their known
types; any other column is refused with a message saying so.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..server import Request, Response
from .choices import CHOICES, Choice, Option
from .records import _err, _json
from .schema import OPPORTUNITIES, Table

CUSTOM_COLUMNS = tuple(c.name for c in OPPORTUNITIES.columns if c.name.startswith("cosell_"))
# The metadata type each kind of column is created as.
_KIND_TYPES = {
    "string": "StringAttributeMetadata",
    "memo": "MemoAttributeMetadata",
    "bool": "BooleanAttributeMetadata",
    "choice": "PicklistAttributeMetadata",
}
_CREATABLE = tuple(_KIND_TYPES.values())


def _bad(message: str) -> Exception:
    return _err(400, "0x80040203", message)  # InvalidArgument


def _label_text(label: Any) -> str | None:
    if not isinstance(label, dict):
        return None
    for item in label.get("LocalizedLabels") or []:
        if isinstance(item, dict) and str(item.get("Label") or "").strip():
            return str(item["Label"])
    return None


@dataclass
class Customizations:
    """Which ``cosell_*`` columns the org has, the options of those created through the API, and
    the alternate key's index status."""

    absent: set[str] = field(default_factory=set)
    choices: dict[str, Choice] = field(default_factory=dict)  # created picklists: their options
    key_status: str | None = "Active"  # None: no key; Pending, Active or Failed
    key_ready_at: float = 0.0

    def strip(self) -> None:
        self.absent = set(CUSTOM_COLUMNS)
        self.choices.clear()
        self.key_status = None

    def has(self, table: Table, name: str) -> bool:
        return table is not OPPORTUNITIES or name not in self.absent


class CustomizationMixin:
    """Metadata writes of :class:`Dynamics365Emulator` (see the module's docstring)."""

    custom: Customizations

    # -- what the rest of the emulator asks ---------------------------------------------------
    def _names(self, table: Table) -> list[str]:
        return [n for n in table.names if self.custom.has(table, n)]

    def _key_active(self, table: Table) -> bool:
        if table is not OPPORTUNITIES:
            return bool(table.alternate_key)
        return self._key_status(table) == "Active"

    def _key_status(self, table: Table) -> str | None:
        """The key's index status, finishing a pending index build once its time has come."""
        custom = self.custom
        if table is OPPORTUNITIES and custom.key_status == "Pending" and time.time() >= custom.key_ready_at:
            seen: set[str] = set()
            duplicate = False
            for row in self.tables[table.set].values():  # type: ignore[attr-defined]
                value = row.get(table.alternate_key or "")
                if value is not None:
                    duplicate |= str(value).casefold() in seen
                    seen.add(str(value).casefold())
            custom.key_status = "Failed" if duplicate else "Active"
        return custom.key_status if table is OPPORTUNITIES else ("Active" if table.alternate_key else None)

    # -- POST EntityDefinitions(...)/Attributes and /Keys -----------------------------------------
    def _create_definition(self, request: Request) -> Response:
        match = re.fullmatch(r"\((?P<key>[^()]*)\)/(?P<nav>Attributes|Keys)", request.params["rest"])
        if not match:
            raise _err(405, "0x80060888", "The requested resource does not support http method 'POST'.")
        table = self.metadata.find_entity(match.group("key"))  # type: ignore[attr-defined]
        body = request.json()
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        with self.lock:  # type: ignore[attr-defined]
            if match.group("nav") == "Keys":
                name = self._create_key(table, body)
                path = f"EntityDefinitions(LogicalName='{table.logical}')/Keys(LogicalName='{name}')"
            else:
                name = self._create_attribute(table, body)
                path = f"EntityDefinitions(LogicalName='{table.logical}')/Attributes(LogicalName='{name}')"
        return Response.empty(204, {"OData-EntityId": self._url(path)})  # type: ignore[attr-defined]

    def _create_attribute(self, table: Table, body: dict[str, Any]) -> str:
        type_name = str(body.get("@odata.type") or "").lstrip("#").removeprefix("Microsoft.Dynamics.CRM.")
        if not type_name:
            raise _bad("The @odata.type of the attribute metadata is required.")
        if type_name not in _CREATABLE:
            raise _bad(f"Creating a column of type {type_name} is not supported by the sandbox emulator.")
        schema = str(body.get("SchemaName") or "")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", schema):
            raise _bad("Attribute SchemaName is required and may hold only letters, digits and underscores.")
        if _label_text(body.get("DisplayName")) is None:
            raise _bad("Attribute DisplayName is required (a Label with LocalizedLabels).")
        name = schema.lower()
        if name in table.names and self.custom.has(table, name):
            raise _err(400, "0x80047013", "An attribute with the specified name already exists")
        column = table.column(name)
        if column is None or table is not OPPORTUNITIES or name not in CUSTOM_COLUMNS:
            raise _bad(f"The sandbox emulator can only add its known cosell_* columns, not '{name}'.")
        if _KIND_TYPES.get(column.kind) != type_name:
            raise _bad(f"The sandbox emulator adds '{name}' as {_KIND_TYPES.get(column.kind)}, not {type_name}.")
        if type_name in ("StringAttributeMetadata", "MemoAttributeMetadata"):
            length = body.get("MaxLength")
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise _bad(f"MaxLength of {schema} must be a positive integer.")
        if type_name == "PicklistAttributeMetadata":
            self.custom.choices[name] = self._picklist(name, body.get("OptionSet"))
        self.custom.absent.discard(name)
        return name

    def _picklist(self, name: str, option_set: Any) -> Choice:
        if not isinstance(option_set, dict) or not isinstance(option_set.get("Options"), list):
            raise _bad(f"The OptionSet of {name} with its Options is required for a choice column.")
        choice = Choice("Picklist", ())
        for option in option_set["Options"]:
            choice = self._add_option(
                name,
                choice,
                option.get("Value") if isinstance(option, dict) else None,
                _label_text(option.get("Label")) if isinstance(option, dict) else None,
            )
        return choice

    def _add_option(self, name: str, choice: Choice, value: Any, label: str | None) -> Choice:
        if label is None:
            raise _bad(f"Each option of {name} needs a Label with LocalizedLabels.")
        base = self.config.choice_value_base  # type: ignore[attr-defined]
        taken = [o.value for o in choice.options if o.value is not None]
        if value is None:
            value = max(taken, default=base - 1) + 1  # the publisher prefix's next value
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"Option values of {name} must be integers.")
        if value in taken:
            raise _err(400, "0x80047011", f"An option with value {value} already exists in {name}.")
        if any(o.label.casefold() == label.casefold() for o in choice.options):
            raise _err(400, "0x80047012", f"An option with label '{label}' already exists in {name}.")
        return Choice(choice.kind, (*choice.options, Option(value, label)), choice.global_name)

    def _create_key(self, table: Table, body: dict[str, Any]) -> str:
        schema = str(body.get("SchemaName") or "")
        attributes = body.get("KeyAttributes")
        if not schema or not isinstance(attributes, list) or not attributes:
            raise _bad("An entity key needs a SchemaName and KeyAttributes.")
        if _label_text(body.get("DisplayName")) is None:
            raise _bad("An entity key needs a DisplayName (a Label with LocalizedLabels).")
        for attribute in attributes:
            if str(attribute) not in self._names(table):
                raise _bad(f"The attribute '{attribute}' of the key does not exist on {table.logical}.")
        if table is not OPPORTUNITIES or attributes != [table.alternate_key]:
            raise _bad(f"The sandbox emulator can only add the {table.alternate_key} key of opportunity.")
        if self.custom.key_status is not None:
            raise _err(400, "0x80040237", "An entity key with these attributes or this name already exists.")
        self.custom.key_status = "Pending"
        self.custom.key_ready_at = time.time() + self.config.key_activation_seconds  # type: ignore[attr-defined]
        return f"{table.alternate_key}_key"

    # -- POST InsertOptionValue -------------------------------------------------------------------
    def _insert_option_value(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        entity, name = body.get("EntityLogicalName"), str(body.get("AttributeLogicalName") or "")
        with self.lock:  # type: ignore[attr-defined]
            table = self.metadata.find_entity(f"LogicalName='{entity}'")  # type: ignore[attr-defined]
            choice = self.metadata.choice(table.logical, name)  # type: ignore[attr-defined]
            if choice is None or choice.kind != "Picklist" or not self.custom.has(table, name):
                raise _bad(f"'{name}' is not a choice column of {table.logical}.")
            if choice.global_name is not None and name not in self.custom.choices:
                raise _bad(f"'{name}' uses a global choice: insert its options with OptionSetName.")
            explicit = self.custom.choices.get(name) or Choice(
                "Picklist", tuple(Option(v, o.label) for v, o in self._option_pairs(table, name))
            )
            updated = self._add_option(name, explicit, body.get("Value"), _label_text(body.get("Label")))
            self.custom.choices[name] = updated
            return _json(
                {
                    "@odata.context": self._url("$metadata#Microsoft.Dynamics.CRM.InsertOptionValueResponse"),
                    "NewOptionValue": updated.options[-1].value,
                }
            )  # type: ignore[attr-defined]

    def _option_pairs(self, table: Table, name: str) -> list[tuple[int, Option]]:
        from .choices import option_values

        return option_values(CHOICES[(table.logical, name)], self.config.choice_value_base)  # type: ignore[attr-defined]
