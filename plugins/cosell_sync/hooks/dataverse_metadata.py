"""Reads of a Dataverse table's definition (``EntityDefinitions``) beyond the choice options
:meth:`~cosell_sync.hooks.dynamics365.DynamicsHook.choice_options` reads: its columns with their
types, and its alternate keys. ``cosell-sync check`` compares them with the mapping."""

from __future__ import annotations

from typing import Any

from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.dynamics365 import LOGICAL_NAMES, DynamicsHook
from cosell_sync.hooks.odata import quote, with_query


def _definition(hook: DynamicsHook, entity_set: str, part: str, select: str) -> list[dict[str, Any]]:
    logical = LOGICAL_NAMES.get(entity_set)
    if logical is None:
        raise ConfigurationError(f"unknown entity set {entity_set!r}; known: {sorted(LOGICAL_NAMES)}")
    url = f"{hook.settings.api_url}/EntityDefinitions(LogicalName={quote(logical)})/{part}"
    return list(hook.api.request("GET", with_query(url, {"$select": select})).json().get("value", []))


def column_types(hook: DynamicsHook, entity_set: str) -> dict[str, str]:
    """The table's columns, logical name -> ``AttributeType`` (``String``, ``Picklist``, ``Lookup`` ...)."""
    rows = _definition(hook, entity_set, "Attributes", "LogicalName,AttributeType")
    return {str(a["LogicalName"]): str(a["AttributeType"]) for a in rows}


def alternate_keys(hook: DynamicsHook, entity_set: str) -> dict[str, list[str]]:
    """The table's alternate keys, key logical name -> its columns (``KeyAttributes``)."""
    rows = _definition(hook, entity_set, "Keys", "LogicalName,KeyAttributes")
    return {str(k["LogicalName"]): [str(c) for c in k.get("KeyAttributes") or []] for k in rows}
