"""Dataverse table definitions (``EntityDefinitions``) through the Web API, beyond the choice
options :meth:`~cosell_sync.hooks.dynamics365.DynamicsHook.choice_options` reads: a table's
columns with their types and its alternate keys (``cosell-sync check`` compares them with the
mapping), and the writes of ``cosell-sync setup dynamics365``: create columns (String, Memo,
Boolean, Picklist), add choice options (``InsertOptionValue``) and create an alternate key
(Microsoft Learn: "Create and update column definitions using the Web API", "Define alternate
keys using the Web API").

Every call goes through the :class:`~cosell_sync.hooks.dynamics365.DynamicsHook`'s client (its
token, retries and typed errors). ``solution`` adds ``MSCRM.SolutionUniqueName`` so that new
components land in that unmanaged solution rather than the default one.
"""

from __future__ import annotations

from typing import Any

from cosell_sync.engine.dataverse_setup import ColumnSpec, ExistingColumn
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.dynamics365 import LOGICAL_NAMES, DynamicsHook
from cosell_sync.hooks.odata import quote, with_query

NS = "Microsoft.Dynamics.CRM"
LANGUAGE = 1033  # the labels setup writes are English (US); orgs show them until translated


def label(text: str) -> dict[str, Any]:
    return {
        "@odata.type": f"{NS}.Label",
        "LocalizedLabels": [{"@odata.type": f"{NS}.LocalizedLabel", "Label": text, "LanguageCode": LANGUAGE}],
    }


def _headers(solution: str | None) -> dict[str, str]:
    return {"MSCRM.SolutionUniqueName": solution} if solution else {}


def _url(hook: DynamicsHook, path: str) -> str:
    return f"{hook.settings.api_url}/{path}"


def _entity(logical: str) -> str:
    return f"EntityDefinitions(LogicalName={quote(logical)})"


def _definition(hook: DynamicsHook, logical: str, part: str, select: str) -> list[dict[str, Any]]:
    """The rows of a table definition's ``part`` (``Attributes``, ``Keys``), ``select``ed."""
    url = with_query(_url(hook, f"{_entity(logical)}/{part}"), {"$select": select})
    return list(hook.api.request("GET", url).json().get("value", []))


def _logical(entity_set: str) -> str:
    logical = LOGICAL_NAMES.get(entity_set)
    if logical is None:
        raise ConfigurationError(f"unknown entity set {entity_set!r}; known: {sorted(LOGICAL_NAMES)}")
    return logical


def column_types(hook: DynamicsHook, entity_set: str) -> dict[str, str]:
    """The table's columns, logical name -> ``AttributeType`` (``String``, ``Picklist``, ``Lookup`` ...)."""
    rows = _definition(hook, _logical(entity_set), "Attributes", "LogicalName,AttributeType")
    return {str(a["LogicalName"]): str(a["AttributeType"]) for a in rows}


def alternate_keys(hook: DynamicsHook, entity_set: str) -> dict[str, list[str]]:
    """The table's alternate keys, key logical name -> its columns (``KeyAttributes``)."""
    rows = _definition(hook, _logical(entity_set), "Keys", "LogicalName,KeyAttributes")
    return {str(k["LogicalName"]): [str(c) for c in k.get("KeyAttributes") or []] for k in rows}


def read_columns(hook: DynamicsHook, logical: str, entity_set: str) -> dict[str, ExistingColumn]:
    """Every column of the table: its metadata type, and a choice column's option labels."""
    items = _definition(hook, logical, "Attributes", "LogicalName")
    types = {str(a["LogicalName"]): str(a.get("@odata.type", "")).lstrip("#").removeprefix(f"{NS}.") for a in items}
    picklists = [name for name, kind in types.items() if kind == "PicklistAttributeMetadata"]
    options = hook.choice_options(entity_set, picklists) if picklists else {}
    return {name: ExistingColumn(kind, tuple(options.get(name, {}))) for name, kind in types.items()}


def read_keys(hook: DynamicsHook, logical: str) -> list[tuple[list[str], str | None]]:
    """The table's alternate keys: (their columns, ``EntityKeyIndexStatus``)."""
    return [
        (list(k.get("KeyAttributes") or []), k.get("EntityKeyIndexStatus"))
        for k in _definition(hook, logical, "Keys", "KeyAttributes,EntityKeyIndexStatus")
    ]


def attribute_body(spec: ColumnSpec) -> dict[str, Any]:
    """The ``AttributeMetadata`` that creates ``spec`` (a choice's options valued by the org)."""
    body: dict[str, Any] = {
        "@odata.type": f"{NS}.{spec.metadata_type}",
        "SchemaName": spec.name,
        "DisplayName": label(spec.display),
        "Description": label(f"{spec.display} (cosell-sync)"),
        "RequiredLevel": {
            "Value": "None",
            "CanBeChanged": True,
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
    }
    if spec.kind == "String":
        body.update(MaxLength=spec.max_length, FormatName={"Value": "Url" if spec.name.endswith("link") else "Text"})
    elif spec.kind == "Memo":
        body.update(MaxLength=spec.max_length, Format="TextArea")
    elif spec.kind == "Boolean":
        body.update(
            DefaultValue=False,
            OptionSet={
                "@odata.type": f"{NS}.BooleanOptionSetMetadata",
                "OptionSetType": "Boolean",
                "TrueOption": {"Value": 1, "Label": label("Yes")},
                "FalseOption": {"Value": 0, "Label": label("No")},
            },
        )
    else:
        body["OptionSet"] = {
            "@odata.type": f"{NS}.OptionSetMetadata",
            "IsGlobal": False,
            "OptionSetType": "Picklist",
            "Options": [{"Value": None, "Label": label(text)} for text in spec.labels],
        }
    return body


def create_column(hook: DynamicsHook, logical: str, spec: ColumnSpec, solution: str | None = None) -> None:
    url = _url(hook, f"{_entity(logical)}/Attributes")
    hook.api.request("POST", url, json=attribute_body(spec), headers=_headers(solution))


def add_option(hook: DynamicsHook, logical: str, column: str, text: str, solution: str | None = None) -> None:
    body: dict[str, Any] = {
        "EntityLogicalName": logical,
        "AttributeLogicalName": column,
        "Value": None,
        "Label": label(text),
    }
    if solution:
        body["SolutionUniqueName"] = solution
    hook.api.request("POST", _url(hook, "InsertOptionValue"), json=body)


def create_key(hook: DynamicsHook, logical: str, column: str, display: str, solution: str | None = None) -> None:
    body = {"SchemaName": f"{column}_key", "DisplayName": label(display), "KeyAttributes": [column]}
    hook.api.request("POST", _url(hook, f"{_entity(logical)}/Keys"), json=body, headers=_headers(solution))
