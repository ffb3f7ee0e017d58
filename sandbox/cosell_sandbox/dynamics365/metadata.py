"""Table definitions of the Dataverse emulator (``EntityDefinitions``, ``Attributes`` with their casts,
``Keys``, ``GlobalOptionSetDefinitions``), built from its schema and :mod:`.choices`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .choices import CHOICES, Choice, Option, option_values
from .definitions import (
    _ATTRIBUTE_NAVS,
    _ATTRIBUTE_TYPES,
    _BASE_ATTRIBUTE_PROPS,
    _BASES,
    _DISPLAY_NAMES,
    _ENTITY_INFO,
    _ENTITY_PROPS,
    _ENUM_TYPES,
    _KEY_PROPS,
    _OPTIONSET_PROPS,
    _SCHEMA_NAMES,
    _TYPE_PROPS,
    NS,
    Spec,
    _attribute_not_found,
    _entity_not_found,
    _id,
    _label,
    _no_property,
    _predicate,
    _segment,
    _shape,
    _spec,
)
from .records import _err, _query_error


class Metadata:
    """Definitions of the emulator's tables, built from its schema and :data:`CHOICES`."""

    def __init__(
        self,
        tables: list[Any],
        base: Callable[[], int],
        origin: Callable[[], str],
        custom: Callable[[], Any] | None = None,
        key_status: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.tables = {t.logical: t for t in tables}
        self.base = base
        self.origin = origin
        self.custom = custom  # the org's customizations.Customizations (columns it has, created choices)
        self.key_status = key_status or (lambda table: "Active" if table.alternate_key else None)

    # -- choices -----------------------------------------------------------------------------
    def choice(self, logical: str, column: str) -> Choice | None:
        created = self.custom().choices.get(column) if self.custom and logical == "opportunity" else None
        return created or CHOICES.get((logical, column))

    def values(self, logical: str, column: str) -> list[int]:
        choice = self.choice(logical, column)
        return [v for v, _ in option_values(choice, self.base())] if choice else []

    def value_of(self, logical: str, column: str, label: str) -> int:
        choice = self.choice(logical, column)
        assert choice is not None
        return next(v for v, o in option_values(choice, self.base()) if o.label == label)

    def label(self, logical: str, column: str, value: Any) -> str | None:
        choice = self.choice(logical, column)
        if choice is None:
            return None
        return next((o.label for v, o in option_values(choice, self.base()) if v == value), None)

    # -- entities ----------------------------------------------------------------------------
    def _attribute_name(self, column: Any) -> str:
        name = column.name
        return name[1:-6] if column.kind == "lookup" and name.startswith("_") and name.endswith("_value") else name

    def entity(self, table: Any) -> dict[str, Any]:
        info = _ENTITY_INFO[table.logical]
        singular, plural = info["Display"]
        return {
            "MetadataId": _id("entity", table.logical),
            "HasChanged": None,
            "LogicalName": table.logical,
            "SchemaName": info["SchemaName"],
            "EntitySetName": table.set,
            "LogicalCollectionName": table.set,
            "CollectionSchemaName": info["CollectionSchemaName"],
            "PrimaryIdAttribute": table.pk,
            "PrimaryNameAttribute": info["PrimaryNameAttribute"],
            "ObjectTypeCode": info["ObjectTypeCode"],
            "IsCustomEntity": False,
            "IsManaged": True,
            "IsActivity": False,
            "IsIntersect": False,
            "IsLogicalEntity": False,
            "IsPrivate": False,
            "OwnershipType": info["OwnershipType"],
            "TableType": "Standard",
            "ChangeTrackingEnabled": True,
            "DisplayName": _label(singular),
            "DisplayCollectionName": _label(plural),
            "Description": _label(None),
            "IntroducedVersion": "5.0.0.0",
            "IsValidForAdvancedFind": True,
            "IsCustomizable": {"Value": True, "CanBeChanged": True, "ManagedPropertyLogicalName": "iscustomizable"},
            "EntityColor": None,
            "HasNotes": True,
            "HasActivities": table.logical != "transactioncurrency",
            "IsAuditEnabled": {
                "Value": False,
                "CanBeChanged": True,
                "ManagedPropertyLogicalName": "canmodifyauditsettings",
            },
        }

    def find_entity(self, key: str) -> Any:
        """``LogicalName='x'`` or a MetadataId."""
        key = key.strip()
        match = re.fullmatch(r"LogicalName\s*=\s*'((?:[^']|'')*)'", key)
        if match:
            name = match.group(1).replace("''", "'")
            table = self.tables.get(name)
            if table is None:
                raise _entity_not_found(name)
            return table
        match = re.fullmatch(r"(?:MetadataId\s*=\s*)?([0-9a-fA-F-]{36})", key)
        if match:
            wanted = match.group(1).lower()
            for table in self.tables.values():
                if _id("entity", table.logical) == wanted:
                    return table
            # Guessed text for an unknown MetadataId.
            raise _err(404, "0x80040217", f"Could not find an entity with id {wanted}.")
        raise _query_error(f"The key '({key})' does not match any key defined for type '{NS}.EntityMetadata'.")

    # -- attributes --------------------------------------------------------------------------
    def _type_of(self, table: Any, column: Any) -> str:
        if column.name == table.pk:
            return "UniqueIdentifierAttributeMetadata"
        choice = self.choice(table.logical, column.name)
        if choice is not None:
            return f"{choice.kind}AttributeMetadata"
        return {
            "guid": "UniqueIdentifierAttributeMetadata",
            "string": "StringAttributeMetadata",
            "memo": "MemoAttributeMetadata",
            "money": "MoneyAttributeMetadata",
            "decimal": "DecimalAttributeMetadata",
            "int": "IntegerAttributeMetadata",
            "bigint": "BigIntAttributeMetadata",
            "bool": "BooleanAttributeMetadata",
            "date": "DateTimeAttributeMetadata",
            "datetime": "DateTimeAttributeMetadata",
            "lookup": "LookupAttributeMetadata",
        }[column.kind]

    def attribute(self, table: Any, column: Any) -> dict[str, Any]:
        name = self._attribute_name(column)
        type_name = self._type_of(table, column)
        attribute_type = _ATTRIBUTE_TYPES[type_name]
        if name == "parentcustomerid":
            attribute_type = "Customer"  # a polymorphic lookup, typed LookupAttributeMetadata
        custom = name.startswith("cosell_")
        required = "SystemRequired" if name == table.pk else ("ApplicationRequired" if column.required else "None")
        info = _ENTITY_INFO[table.logical]
        out: dict[str, Any] = {
            "@odata.type": f"#{NS}.{type_name}",
            "MetadataId": _id("attribute", table.logical, name),
            "HasChanged": None,
            "AttributeOf": None,
            "AttributeType": attribute_type,
            "AttributeTypeName": {"Value": f"{attribute_type}Type"},
            "ColumnNumber": table.columns.index(column) + 1,
            "Description": _label(None),
            "DisplayName": _label(_DISPLAY_NAMES.get(name) or _SCHEMA_NAMES.get(name, name)),
            "EntityLogicalName": table.logical,
            "ExternalName": None,
            "IntroducedVersion": "1.0.0.0" if custom else "5.0.0.0",
            "IsCustomAttribute": custom,
            "IsCustomizable": {"Value": True, "CanBeChanged": custom, "ManagedPropertyLogicalName": "iscustomizable"},
            "IsFilterable": True,
            "IsLogical": False,
            "IsManaged": not custom,
            "IsPrimaryId": name == table.pk,
            "IsPrimaryName": name == info["PrimaryNameAttribute"],
            "IsRetrievable": True,
            "IsSearchable": True,
            "IsSecured": False,
            "IsValidForCreate": not column.system and not table.read_only,
            "IsValidForRead": True,
            "IsValidForUpdate": not column.system and name != table.pk and not table.read_only,
            "IsValidODataAttribute": True,
            "LogicalName": name,
            "RequiredLevel": {
                "Value": required,
                "CanBeChanged": required != "SystemRequired",
                "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
            },
            "SchemaName": _SCHEMA_NAMES.get(name, name),
            "SourceType": 0,
            "IsAuditEnabled": {
                "Value": True,
                "CanBeChanged": True,
                "ManagedPropertyLogicalName": "canmodifyauditsettings",
            },
        }
        if type_name in ("StringAttributeMetadata", "MemoAttributeMetadata"):
            fmt = "Text" if type_name == "StringAttributeMetadata" else "TextArea"
            if name.endswith("link"):
                fmt = "Url"
            if name.startswith("emailaddress"):
                fmt = "Email"
            out.update(
                MaxLength=column.max_length,
                DatabaseLength=(column.max_length or 0) * 2,
                Format=fmt,
                FormatName={"Value": fmt},
                ImeMode="Auto",
                IsLocalizable=False,
            )
            if type_name == "StringAttributeMetadata":
                out["YomiOf"] = None
        elif type_name in ("MoneyAttributeMetadata", "DecimalAttributeMetadata"):
            money = type_name == "MoneyAttributeMetadata"
            out.update(
                MaxValue=column.maximum if column.maximum is not None else 100000000000.0,
                MinValue=column.minimum if column.minimum is not None else -100000000000.0,
                Precision=2 if money else 10,
                ImeMode="Auto",
            )
            if money:
                out.update(PrecisionSource=2, IsBaseCurrency=False)
        elif type_name == "IntegerAttributeMetadata":
            out.update(MaxValue=2147483647, MinValue=-2147483648, Format="None")
        elif type_name == "BigIntAttributeMetadata":
            out.update(MaxValue=9223372036854775807, MinValue=-9223372036854775808)
        elif type_name == "BooleanAttributeMetadata":
            out.update(DefaultValue=bool(column.default))
        elif type_name == "DateTimeAttributeMetadata":
            date_only = column.kind == "date"
            out.update(
                Format="DateOnly" if date_only else "DateAndTime",
                DateTimeBehavior={"Value": "DateOnly" if date_only else "UserLocal"},
                ImeMode="Auto",
                CanChangeDateTimeBehavior={
                    "Value": False,
                    "CanBeChanged": False,
                    "ManagedPropertyLogicalName": "canchangedatetimebehavior",
                },
            )
        elif type_name == "LookupAttributeMetadata":
            targets = ["account", "contact"] if name == "parentcustomerid" else [self._logical_of_set(column.target)]
            out.update(Targets=targets, Format=None)
        elif type_name in _ENUM_TYPES:
            out["DefaultFormValue"] = -1 if type_name == "PicklistAttributeMetadata" else None
            if type_name == "PicklistAttributeMetadata":
                out.update(ParentPicklistLogicalName=None, ChildPicklistLogicalNames=[])
        out["_type"] = type_name
        out["_column"] = column
        return out

    def _logical_of_set(self, entity_set: str | None) -> str:
        return next((t.logical for t in self.tables.values() if t.set == entity_set), entity_set or "")

    def attributes(self, table: Any) -> list[dict[str, Any]]:
        custom = self.custom() if self.custom else None
        return [self.attribute(table, c) for c in table.columns if custom is None or custom.has(table, c.name)]

    def find_attribute(self, table: Any, key: str) -> dict[str, Any]:
        key = key.strip()
        items = self.attributes(table)
        match = re.fullmatch(r"LogicalName\s*=\s*'((?:[^']|'')*)'", key)
        if match:
            name = match.group(1).replace("''", "'")
            found = next((a for a in items if a["LogicalName"] == name), None)
            if found is None:
                raise _attribute_not_found(table.logical, name)
            return found
        match = re.fullmatch(r"(?:MetadataId\s*=\s*)?([0-9a-fA-F-]{36})", key)
        if match:
            found = next((a for a in items if a["MetadataId"] == match.group(1).lower()), None)
            if found is None:
                raise _attribute_not_found(table.logical, match.group(1))
            return found
        raise _query_error(f"The key '({key})' does not match any key defined for type '{NS}.AttributeMetadata'.")

    # -- option sets --------------------------------------------------------------------------
    def _option(self, choice: Choice, value: int, option: Option) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Value": value,
            "Color": None,
            "IsManaged": choice.global_name is None and choice.kind != "Picklist",
            "ExternalValue": None,
            "ParentValues": [],
            "Tag": None,
            "IsHidden": False,
            "MetadataId": None,
            "HasChanged": None,
            "Label": _label(option.label),
            "Description": _label(None),
        }
        if choice.kind == "State":
            out = {
                "@odata.type": f"#{NS}.StateOptionMetadata",
                **out,
                "DefaultStatus": option.default_status,
                "InvariantName": option.label,
            }
        elif choice.kind == "Status":
            out = {"@odata.type": f"#{NS}.StatusOptionMetadata", **out, "State": option.state, "TransitionData": None}
        return out

    def option_set(self, table: Any, attribute: dict[str, Any], global_only: bool) -> dict[str, Any] | None:
        column = attribute["LogicalName"]
        choice = self.choice(table.logical, attribute["_column"].name)
        if attribute["_type"] == "BooleanAttributeMetadata":
            if global_only:
                return None
            return {
                "@odata.type": f"#{NS}.BooleanOptionSetMetadata",
                "MetadataId": _id("optionset", table.logical, column),
                "HasChanged": None,
                "Name": f"{table.logical}_{column}",
                "IsGlobal": False,
                "IsCustomOptionSet": column.startswith("cosell_"),
                "OptionSetType": "Boolean",
                "TrueOption": {"Value": 1, "Label": _label("Yes"), "Description": _label(None)},
                "FalseOption": {"Value": 0, "Label": _label("No"), "Description": _label(None)},
            }
        if choice is None or (global_only and choice.global_name is None):
            return None
        name = choice.global_name or f"{table.logical}_{column}"
        return self._option_set_body(choice, name)

    def _option_set_body(self, choice: Choice, name: str) -> dict[str, Any]:
        custom = name.startswith("cosell_")
        return {
            "@odata.type": f"#{NS}.OptionSetMetadata",
            "MetadataId": _id("optionset", name),
            "HasChanged": None,
            "Name": name,
            "DisplayName": _label(name),
            "Description": _label(None),
            "IsCustomOptionSet": custom,
            "IsGlobal": choice.global_name is not None,
            "IsManaged": not custom,
            "IsCustomizable": {"Value": True, "CanBeChanged": custom, "ManagedPropertyLogicalName": "iscustomizable"},
            "OptionSetType": choice.kind,
            "IntroducedVersion": "1.0.0.0" if custom else "5.0.0.0",
            "ExternalTypeName": None,
            "ParentOptionSetName": None,
            "Options": [self._option(choice, v, o) for v, o in option_values(choice, self.base())],
        }

    # -- keys ------------------------------------------------------------------------------------
    def keys(self, table: Any) -> list[dict[str, Any]]:
        status = self.key_status(table)
        if not table.alternate_key or status is None:
            return []
        name = f"{table.alternate_key}_key"
        return [
            {
                "MetadataId": _id("key", table.logical, name),
                "HasChanged": None,
                "LogicalName": name,
                "SchemaName": f"{_SCHEMA_NAMES.get(table.alternate_key, table.alternate_key)}_Key",
                "DisplayName": _label("Referral ID"),
                "EntityLogicalName": table.logical,
                "KeyAttributes": [table.alternate_key],
                "EntityKeyIndexStatus": status,
                "IsManaged": False,
                "IsCustomizable": {"Value": True, "CanBeChanged": True, "ManagedPropertyLogicalName": "iscustomizable"},
                "IsSecondaryKey": False,
                "IntroducedVersion": "1.0.0.0",
            }
        ]

    # -- requests ------------------------------------------------------------------------------
    def context(self, suffix: str) -> str:
        return f"{self.origin()}/api/data/v9.2/$metadata#{suffix}"

    def handle(self, rest: str, options: dict[str, str]) -> dict[str, Any]:
        """``GET EntityDefinitions<rest>`` (``rest`` after the set name, decoded)."""
        spec = _spec(options)
        match = re.fullmatch(r"(?:\((?P<key>[^()]*)\))?(?P<tail>(?:/.*)?)", rest)
        if not match:
            raise _segment(rest)
        tail = [s for s in match.group("tail").split("/") if s] if match.group("tail") else []
        if match.group("key") is None:
            if tail:
                raise _segment(tail[0])
            return self._entities(spec)
        table = self.find_entity(match.group("key"))
        if not tail:
            return {"@odata.context": self.context("EntityDefinitions/$entity"), **self._entity_item(table, spec)}
        return self._navigate(table, tail, spec)

    def _entities(self, spec: Spec) -> dict[str, Any]:
        predicate = _predicate(spec.filter, _ENTITY_PROPS)
        items = [self.entity(t) for t in self.tables.values()]
        items = [i for i in items if predicate is None or predicate(i)]
        selected = f"({','.join(spec.select)})" if spec.select else ""
        tables = {_id("entity", t.logical): t for t in self.tables.values()}
        value = [self._entity_item(tables[i["MetadataId"]], spec, i) for i in items]
        return {"@odata.context": self.context(f"EntityDefinitions{selected}"), "value": value}

    def _entity_item(self, table: Any, spec: Spec, item: dict[str, Any] | None = None) -> dict[str, Any]:
        out = _shape(item or self.entity(table), spec, _ENTITY_PROPS, "EntityMetadata")
        for nav, nested in (spec.expand or {}).items():
            if nav == "Attributes":
                out["Attributes"] = self._attribute_list(table, None, nested)
            elif nav == "Keys":
                out["Keys"] = self._key_list(table, nested)
            else:
                raise _no_property(nav, "EntityMetadata")
        return out

    def _navigate(self, table: Any, tail: list[str], spec: Spec) -> dict[str, Any]:
        head, rest = tail[0], tail[1:]
        entity_id = _id("entity", table.logical)
        key_match = re.fullmatch(r"(Attributes|Keys)(?:\((.*)\))?", head)
        if not key_match:
            raise _segment(head)
        nav, key = key_match.group(1), key_match.group(2)
        if nav == "Keys":
            if rest:
                raise _segment(rest[0])
            items = self._key_list(table, spec)
            if key is None:
                return {"@odata.context": self.context(f"EntityDefinitions({entity_id})/Keys"), "value": items}
            wanted = key.strip()
            name = re.fullmatch(r"LogicalName\s*=\s*'([^']*)'", wanted)
            found = next(
                (k for k in items if (name and k["LogicalName"] == name.group(1)) or k["MetadataId"] == wanted.lower()),
                None,
            )
            if found is None:
                raise _err(404, "0x80040217", f"Could not find key '{wanted}' on entity '{table.logical}'.")  # guessed
            return {"@odata.context": self.context(f"EntityDefinitions({entity_id})/Keys/$entity"), **found}
        cast = None
        if rest:
            cast_match = re.fullmatch(r"Microsoft\.Dynamics\.CRM\.(\w+)", rest[0])
            if (
                len(rest) > 1
                or not cast_match
                or cast_match.group(1) not in (*_ATTRIBUTE_TYPES, "EnumAttributeMetadata")
            ):
                raise _segment(rest[-1])
            cast = cast_match.group(1)
        if key is None:
            items = self._attribute_list(table, cast, spec)
            suffix = f"/{NS}.{cast}" if cast else ""
            return {
                "@odata.context": self.context(f"EntityDefinitions({entity_id})/Attributes{suffix}"),
                "value": items,
            }
        attribute = self.find_attribute(table, key)
        if cast is not None and not self._is_a(attribute["_type"], cast):
            # Guessed: the service finds no attribute of that type under the key.
            raise _err(
                404,
                "0x80060888",
                f"The attribute with LogicalName = '{attribute['LogicalName']}' is not of type '{NS}.{cast}'; it is a "
                f"'{NS}.{attribute['_type']}'.",
            )
        suffix = f"/{NS}.{cast}" if cast else ""
        return {
            "@odata.context": self.context(
                f"EntityDefinitions({entity_id})/Attributes({attribute['MetadataId']}){suffix}/$entity"
            ),
            **self._attribute_item(table, attribute, cast, spec),
        }

    @staticmethod
    def _is_a(type_name: str, cast: str) -> bool:
        return cast == type_name or cast in _BASES.get(type_name, ())

    def _attribute_list(self, table: Any, cast: str | None, spec: Spec) -> list[dict[str, Any]]:
        items = [a for a in self.attributes(table) if cast is None or self._is_a(a["_type"], cast)]
        predicate = _predicate(spec.filter, self._attribute_props(cast))
        return [self._attribute_item(table, a, cast, spec) for a in items if predicate is None or predicate(a)]

    @staticmethod
    def _attribute_props(cast: str | None) -> tuple[str, ...]:
        extra = _TYPE_PROPS.get(cast, ()) if cast else ()
        if cast in _ENUM_TYPES:
            extra = (*extra, *_TYPE_PROPS["EnumAttributeMetadata"])
        return (*_BASE_ATTRIBUTE_PROPS, *extra)

    def _attribute_item(self, table: Any, attribute: dict[str, Any], cast: str | None, spec: Spec) -> dict[str, Any]:
        type_name = cast or "AttributeMetadata"
        out = _shape(attribute, spec, self._attribute_props(cast), type_name)
        for nav, nested in (spec.expand or {}).items():
            enum_cast = cast in (*_ENUM_TYPES, "EnumAttributeMetadata", "BooleanAttributeMetadata")
            if nav not in _ATTRIBUTE_NAVS or not enum_cast:
                # The option set navigation properties exist on the typed (cast) definitions only.
                raise _no_property(nav, type_name)
            option_set = self.option_set(table, attribute, global_only=nav == "GlobalOptionSet")
            if option_set is not None:
                option_set = _shape(
                    option_set, nested, (*_OPTIONSET_PROPS, "TrueOption", "FalseOption"), "OptionSetMetadataBase"
                )
            out[nav] = option_set
        return out

    def _key_list(self, table: Any, spec: Spec) -> list[dict[str, Any]]:
        predicate = _predicate(spec.filter, _KEY_PROPS)
        return [
            _shape(k, spec, _KEY_PROPS, "EntityKeyMetadata")
            for k in self.keys(table)
            if predicate is None or predicate(k)
        ]

    def global_option_sets(self, rest: str, options: dict[str, str]) -> dict[str, Any]:
        """``GET GlobalOptionSetDefinitions`` and ``GlobalOptionSetDefinitions(Name='x')``."""
        spec = _spec(options)
        sets = {c.global_name: c for c in CHOICES.values() if c.global_name}
        match = re.fullmatch(r"(?:\((?:Name\s*=\s*'([^']*)'|([0-9a-fA-F-]{36}))\))?", rest)
        if not match:
            raise _segment(rest)
        bodies = {name: self._option_set_body(choice, name) for name, choice in sets.items()}
        if match.group(1) is None and match.group(2) is None:
            value = [_shape(b, spec, _OPTIONSET_PROPS, "OptionSetMetadataBase") for b in bodies.values()]
            return {"@odata.context": self.context("GlobalOptionSetDefinitions"), "value": value}
        found = next(
            (b for n, b in bodies.items() if n == match.group(1) or b["MetadataId"] == (match.group(2) or "").lower()),
            None,
        )
        if found is None:
            # Guessed text (ObjectDoesNotExist).
            raise _err(404, "0x80040217", f"Could not find optionset with name '{match.group(1) or match.group(2)}'.")
        return {
            "@odata.context": self.context("GlobalOptionSetDefinitions/$entity"),
            **_shape(found, spec, _OPTIONSET_PROPS, "OptionSetMetadataBase"),
        }
