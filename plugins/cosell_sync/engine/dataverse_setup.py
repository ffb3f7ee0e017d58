"""What ``cosell-sync setup dynamics365`` must create on the opportunity table: the custom columns
a mapping uses, their choice options and the alternate key, and the plan against what the org has.

Pure logic: the columns come from the mapping, the org's state is passed in (read by
:mod:`cosell_sync.hooks.dataverse_metadata`), and the plan says what to create, which options
to add, and which existing columns are incompatible (reported, never changed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cosell_sync.engine.mapping import SyncMapping, pinned

# Column kind -> the attribute metadata type it is created as and accepted as.
METADATA_TYPES = {
    "String": "StringAttributeMetadata",
    "Memo": "MemoAttributeMetadata",
    "Boolean": "BooleanAttributeMetadata",
    "Picklist": "PicklistAttributeMetadata",
}
# The shipped mapping's columns (SPEC §4, "Default CRM fields"): kind, length and display name.
DEFAULT_COLUMNS: dict[str, tuple[str, int | None, str]] = {
    "cosell_syncwithpartnercenter": ("Boolean", None, "Sync with Partner Center"),
    "cosell_referralid": ("String", 100, "Referral ID"),
    "cosell_referrallink": ("String", 500, "Referral Link"),
    "cosell_howcanmicrosofthelp": ("Picklist", None, "How Can Microsoft Help"),
    "cosell_solutions": ("String", 255, "Solutions"),
    "cosell_sharewithmicrosoft": ("Boolean", None, "Share with Microsoft"),
    "cosell_microsoftstatus": ("String", 40, "Microsoft Status"),
    "cosell_audit": ("Memo", 1_048_576, "Co-sell Audit"),  # the largest multiline text column
    "cosell_syncstatus": ("Picklist", None, "Sync Status"),
}
_RECORD_KINDS = {
    "link_field": ("String", 100),
    "link_url_field": ("String", 500),
    "sync_flag_field": ("Boolean", None),
    "audit_field": ("Memo", 1_048_576),
    "sync_status_field": ("Picklist", None),
}


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # a key of METADATA_TYPES
    display: str
    max_length: int | None = None
    labels: tuple[str, ...] = ()  # Picklist options, in order

    @property
    def metadata_type(self) -> str:
        return METADATA_TYPES[self.kind]


@dataclass(frozen=True)
class ExistingColumn:
    metadata_type: str  # e.g. "StringAttributeMetadata"
    labels: tuple[str, ...] = ()  # a choice column's option labels


@dataclass
class SetupPlan:
    create: list[ColumnSpec] = field(default_factory=list)
    add_options: dict[str, list[str]] = field(default_factory=dict)
    create_key: bool = False
    key_column: str = ""
    key_status: str | None = None  # the existing key's EntityKeyIndexStatus
    present: list[str] = field(default_factory=list)  # columns already right
    errors: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.create or self.add_options or self.create_key)

    def lines(self) -> list[str]:
        out = [f"  create column {c.name} ({c.kind}{_length(c)}){_options(c.labels)}" for c in self.create]
        out += [f"  add options to {name}: {', '.join(labels)}" for name, labels in self.add_options.items()]
        if self.create_key:
            out.append(f"  create alternate key on {self.key_column}")
        return out


def _length(spec: ColumnSpec) -> str:
    return f", {spec.max_length:,} characters" if spec.max_length else ""


def _options(labels: Sequence[str]) -> str:
    return f": {', '.join(labels)}" if labels else ""


def _display(name: str) -> str:
    return name.split("_", 1)[-1].replace("_", " ").title()


def required_columns(mapping: SyncMapping, sync_statuses: Sequence[str]) -> list[ColumnSpec]:
    """The custom opportunity columns ``mapping`` uses (those with its link field's publisher
    prefix), with their kind, length and choice labels."""
    link = mapping.records["link_field"]
    prefix = link.split("_", 1)[0] + "_"
    specs: dict[str, ColumnSpec] = {}
    for role, (kind, length) in _RECORD_KINDS.items():
        name = mapping.records.get(role)
        if name:
            labels = tuple(sync_statuses) if role == "sync_status_field" else ()
            default = DEFAULT_COLUMNS.get(name)
            specs[name] = ColumnSpec(name, kind, default[2] if default else _display(name), length, labels)
    for fm in mapping.fields.values():
        name = fm.crm
        if "." in name or not name.startswith(prefix) or name in specs:
            continue
        labels = ()
        if fm.crm_values is not None:
            labels = tuple(dict.fromkeys(v for v in fm.crm_values.write.values() if v and not pinned(v)))
        if name in DEFAULT_COLUMNS:
            kind, length, display = DEFAULT_COLUMNS[name]
        elif fm.type == "boolean":
            kind, length, display = "Boolean", None, _display(name)
        elif fm.type == "enum":
            kind, length, display = "Picklist", None, _display(name)
        else:
            kind, length, display = "String", fm.max_length.get("crm", 255), _display(name)
        specs[name] = ColumnSpec(name, kind, display, length, labels if kind == "Picklist" else ())
    return list(specs.values())


def plan_setup(
    specs: Sequence[ColumnSpec],
    existing: Mapping[str, ExistingColumn],
    keys: Sequence[tuple[Sequence[str], str | None]],
    key_column: str,
) -> SetupPlan:
    """What to create so that the table has ``specs`` and an alternate key on ``key_column``;
    ``keys`` are the table's alternate keys as (attributes, index status)."""
    plan = SetupPlan(key_column=key_column)
    for spec in specs:
        have = existing.get(spec.name)
        if have is None:
            plan.create.append(spec)
            continue
        if have.metadata_type != spec.metadata_type:
            plan.errors.append(
                f"Column {spec.name} exists as {have.metadata_type}, but the mapping needs {spec.metadata_type}: "
                "change the mapping or replace the column (setup never changes an existing column)."
            )
            continue
        folded = {label.casefold() for label in have.labels}
        missing = [label for label in spec.labels if label.casefold() not in folded]
        if missing:
            plan.add_options[spec.name] = missing
        else:
            plan.present.append(spec.name)
    key = next((status for attributes, status in keys if list(attributes) == [key_column]), "absent")
    if key == "absent":
        plan.create_key = True
    else:
        plan.key_status = key
    return plan
