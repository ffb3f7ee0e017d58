"""The declarative mapping between a referral, a CRM opportunity and the canonical deal.

A mapping file (YAML) is loaded and checked once, when the DAG file is parsed: any
mistake raises :class:`MappingError` naming the file and the key, so a broken mapping
never reaches a run. The default files ship in ``cosell_sync/engine/mappings/``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from cosell_sync.crms import NAMES as CRMS

DEFAULTS = Path(__file__).with_name("mappings")
DIRECTIONS = ("both", "pc_to_crm", "crm_to_pc")
AUTHORITIES = ("partner_center", "crm", "newest")
TYPES = ("string", "decimal", "date", "currency", "country", "email", "enum", "id_list", "boolean")
KEEP = "*"  # a value map's "no opinion": the field keeps its last synced value
TARGETS = ("crm", "partner_center")  # the sides a value is written to (``required:``, ``max_length:``)
TEXT_TYPES = ("string", "email", "id_list")  # the types ``max_length:`` and ``multiline:`` apply to
RECORD_KEYS = (
    "opportunity",
    "account",
    "contact",
    "link_field",
    "link_url_field",
    "sync_flag_field",
    "audit_field",
    "sync_status_field",
    "modified_field",
    "closed_field",
)

Direction = Literal["both", "pc_to_crm", "crm_to_pc"]
Authority = Literal["partner_center", "crm", "newest"]


class MappingError(ValueError):
    """A mapping file is invalid; the message names the file and the key (``problems``: each
    problem found, when there are several, e.g. every choice label an org lacks)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


@dataclass(frozen=True)
class ValueMap:
    read: dict[str, str]  # side value -> canonical value (or KEEP)
    write: dict[str, str]  # canonical value -> side value
    # The side value to write depending on what the record holds now: held value (or the first
    # part of a composite one, e.g. the status of status/substatus) -> {canonical -> side value}.
    # A CRM loss closes a New referral as Closed/Declined, an Active one as Closed/Lost.
    write_from: dict[str, dict[str, str]] = field(default_factory=dict)

    def write_for(self, canonical: str, held: str | None) -> str | None:
        """The side value for ``canonical`` on a record that holds ``held`` now."""
        if held is not None:
            for key in (held, held.split("/", 1)[0]):
                if canonical in self.write_from.get(key, {}):
                    return self.write_from[key][canonical]
        return self.write.get(canonical)


@dataclass(frozen=True)
class FieldMapping:
    name: str  # canonical field
    referral: str  # path in the referral, e.g. details.dealValue, status/substatus, solutions[].id
    crm: str  # path in the CRM record, e.g. Amount, Account.Name
    type: str
    direction: Direction = "both"
    authority: Authority = "newest"
    sync: Literal["always", "create"] = "always"
    referral_values: ValueMap | None = None
    crm_values: ValueMap | None = None
    blank: Literal["clear", "keep"] = "clear"  # keep: a side with no value has no opinion (KEEP)
    # The targets a new record cannot be created on without this field: a record that would
    # create one there and has no value is rejected (``required: true`` is every target).
    required: tuple[str, ...] = ()
    # The longest text each target stores (characters); a longer value is rejected.
    max_length: dict[str, int] = field(default_factory=dict)
    multiline: bool = False  # CR and LF are allowed (free text such as notes); other controls never

    @property
    def synced(self) -> bool:
        """Kept in step after the link exists (``sync: create`` fields only seed a new record)."""
        return self.sync == "always"


@dataclass(frozen=True)
class SyncMapping:
    crm: str
    records: dict[str, str]
    fields: dict[str, FieldMapping]
    source: str = "<default>"

    def synced_fields(self) -> list[FieldMapping]:
        return [f for f in self.fields.values() if f.synced]

    @property
    def canonical_columns(self) -> list[str]:
        return list(self.fields)


def _fail(source: str, key: str, message: str) -> MappingError:
    return MappingError(f"mapping {source}: {key}: {message}")


def _str_map(source: str, key: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, MappingABC) or not raw:
        raise _fail(source, key, "must be a non-empty mapping of values")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if v is None or isinstance(v, list | dict):
            raise _fail(source, f"{key}.{k}", "must be a single value")
        out[str(k)] = str(v)
    return out


def _value_map(source: str, key: str, raw: Any) -> ValueMap:
    if not isinstance(raw, MappingABC):
        raise _fail(source, key, "must have 'read' and 'write'")
    unknown = set(raw) - {"read", "write", "write_from"}
    if unknown:
        raise _fail(source, f"{key}.{sorted(unknown)[0]}", "unknown key (expected 'read', 'write', 'write_from')")
    for part in ("read", "write"):
        if part not in raw:
            raise _fail(source, f"{key}.{part}", "is required")
    read = _str_map(source, f"{key}.read", raw["read"])
    write = _str_map(source, f"{key}.write", raw["write"])
    write_from: dict[str, dict[str, str]] = {}
    if "write_from" in raw:
        if not isinstance(raw["write_from"], MappingABC) or not raw["write_from"]:
            raise _fail(source, f"{key}.write_from", "must map a held value to {canonical: value to write}")
        for held, overrides in raw["write_from"].items():
            where = f"{key}.write_from.{held}"
            write_from[str(held)] = _str_map(source, where, overrides)
            for canonical, value in write_from[str(held)].items():
                if canonical not in write:
                    raise _fail(source, f"{where}.{canonical}", "is not a canonical value of 'write'")
                if read.get(value) != canonical:
                    raise _fail(source, f"{where}.{canonical}", f"'{value}' must read back as '{canonical}'")
    return ValueMap(read, write, write_from)


def _field(source: str, name: str, raw: Any) -> FieldMapping:
    key = f"fields.{name}"
    if not isinstance(raw, MappingABC):
        raise _fail(source, key, "must be a mapping")
    allowed = {
        "referral",
        "crm",
        "type",
        "direction",
        "authority",
        "sync",
        "values",
        "blank",
        "required",
        "max_length",
        "multiline",
    }
    unknown = set(raw) - allowed
    if unknown:
        raise _fail(source, f"{key}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for required in ("referral", "crm", "type"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise _fail(source, f"{key}.{required}", "is required and must be a non-empty string")
    ftype = raw["type"]
    if ftype not in TYPES:
        raise _fail(source, f"{key}.type", f"'{ftype}' is not one of {', '.join(TYPES)}")
    direction = raw.get("direction", "both")
    if direction not in DIRECTIONS:
        raise _fail(source, f"{key}.direction", f"'{direction}' is not one of {', '.join(DIRECTIONS)}")
    authority = raw.get("authority", "newest")
    if authority not in AUTHORITIES:
        raise _fail(source, f"{key}.authority", f"'{authority}' is not one of {', '.join(AUTHORITIES)}")
    sync = raw.get("sync", "always")
    if sync not in ("always", "create"):
        raise _fail(source, f"{key}.sync", f"'{sync}' is not one of always, create")
    blank = raw.get("blank", "clear")
    if blank not in ("clear", "keep"):
        raise _fail(source, f"{key}.blank", f"'{blank}' is not one of clear, keep")
    referral_values = crm_values = None
    if ftype == "enum":
        values = raw.get("values")
        if not isinstance(values, MappingABC) or set(values) != {"referral", "crm"}:
            raise _fail(source, f"{key}.values", "an enum needs value maps for both 'referral' and 'crm'")
        referral_values = _value_map(source, f"{key}.values.referral", values["referral"])
        crm_values = _value_map(source, f"{key}.values.crm", values["crm"])
        canonical = {v for v in referral_values.read.values() if v != KEEP}
        canonical |= {v for v in crm_values.read.values() if v != KEEP}
        for side, vmap in (("referral", referral_values), ("crm", crm_values)):
            missing = sorted(canonical - set(vmap.write))
            if missing:
                raise _fail(source, f"{key}.values.{side}.write", f"no value to write for canonical '{missing[0]}'")
            extra = sorted(set(vmap.write) - canonical)
            if extra:
                raise _fail(source, f"{key}.values.{side}.write.{extra[0]}", "is not a canonical value any side reads")
    elif "values" in raw:
        raise _fail(source, f"{key}.values", "value maps are only for type enum")
    if "/" in raw["referral"] and ftype != "enum":
        raise _fail(source, f"{key}.referral", "a composite path (a/b) is only allowed for enums")
    required = _required(source, f"{key}.required", raw.get("required", False))
    max_length = _max_length(source, f"{key}.max_length", raw.get("max_length"), ftype)
    multiline = raw.get("multiline", False)
    if not isinstance(multiline, bool):
        raise _fail(source, f"{key}.multiline", "must be true or false")
    if multiline and ftype != "string":
        raise _fail(source, f"{key}.multiline", "is only for type string")
    return FieldMapping(
        name=name,
        referral=raw["referral"].strip(),
        crm=raw["crm"].strip(),
        type=ftype,
        direction=direction,
        authority=authority,
        sync=sync,
        referral_values=referral_values,
        crm_values=crm_values,
        blank=blank,
        required=required,
        max_length=max_length,
        multiline=multiline,
    )


def _required(source: str, key: str, raw: Any) -> tuple[str, ...]:
    """``required: true`` (a new record on any target needs the field), ``false``, or a list of
    targets (``[crm]``: a referral that would create a CRM opportunity needs it)."""
    if raw is True:
        return TARGETS
    if raw is False or raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _fail(source, key, f"must be true, false or a list of targets ({', '.join(TARGETS)})")
    for target in raw:
        if target not in TARGETS:
            raise _fail(source, key, f"'{target}' is not a target (expected {', '.join(TARGETS)})")
    return tuple(t for t in TARGETS if t in raw)


def _max_length(source: str, key: str, raw: Any, ftype: str) -> dict[str, int]:
    """``max_length: N`` (every target) or ``{crm: N, partner_center: M}``."""
    if raw is None:
        return {}
    if ftype not in TEXT_TYPES:
        raise _fail(source, key, f"is only for text types ({', '.join(TEXT_TYPES)})")
    limits = dict.fromkeys(TARGETS, raw) if not isinstance(raw, MappingABC) else dict(raw)
    if not limits:
        raise _fail(source, key, "must be a positive whole number or a mapping of targets to one")
    for target, limit in limits.items():
        if target not in TARGETS:
            raise _fail(source, f"{key}.{target}", f"is not a target (expected {', '.join(TARGETS)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _fail(
                source, key if not isinstance(raw, MappingABC) else f"{key}.{target}", "must be a positive whole number"
            )
    return {str(t): int(v) for t, v in limits.items()}


def parse_mapping(doc: Any, source: str = "<mapping>") -> SyncMapping:
    if not isinstance(doc, MappingABC):
        raise _fail(source, "<root>", "must be a mapping")
    unknown = set(doc) - {"version", "crm", "records", "fields"}
    if unknown:
        raise _fail(source, sorted(unknown)[0], "unknown top-level key")
    if doc.get("version") != 1:
        raise _fail(source, "version", "must be 1")
    crm = doc.get("crm")
    if crm not in CRMS:
        raise _fail(source, "crm", f"must be one of {', '.join(CRMS)}")
    records = doc.get("records")
    if not isinstance(records, MappingABC):
        raise _fail(source, "records", "must be a mapping")
    for key in RECORD_KEYS:
        if not isinstance(records.get(key), str) or not records[key]:
            raise _fail(source, f"records.{key}", "is required")
    extra_records = set(records) - set(RECORD_KEYS)
    if extra_records:
        raise _fail(source, f"records.{sorted(extra_records)[0]}", "unknown key")
    raw_fields = doc.get("fields")
    if not isinstance(raw_fields, MappingABC) or not raw_fields:
        raise _fail(source, "fields", "must be a non-empty mapping")
    fields = {str(name): _field(source, str(name), raw) for name, raw in raw_fields.items()}
    for required in ("name", "stage"):
        if required not in fields:
            raise _fail(source, f"fields.{required}", "is required (the deal needs a name and a stage)")
    return SyncMapping(crm=crm, records={k: str(v) for k, v in records.items()}, fields=fields, source=source)


# -- choice columns named by label -------------------------------------------------------------------
def pinned(value: str) -> bool:
    """A CRM choice value given as its integer (pinned), not by its label."""
    return value.strip().lstrip("-").isdigit()


def _crm_side_values(vmap: ValueMap) -> list[str]:
    values = [*vmap.read, *vmap.write.values()]
    for held, overrides in vmap.write_from.items():
        values += [held, *overrides.values()]
    return values


def choice_columns(mapping: SyncMapping, *, labelled_only: bool = False) -> dict[str, str]:
    """CRM column -> canonical field of every enum field (``labelled_only``: only those whose CRM
    values name a label somewhere rather than pinning an integer)."""
    out = {}
    for fm in mapping.fields.values():
        if fm.type != "enum" or fm.crm_values is None:
            continue
        if labelled_only and all(pinned(v) or v == KEEP for v in _crm_side_values(fm.crm_values)):
            continue
        out[fm.crm] = fm.name
    return out


@dataclass
class _Choices:
    """One choice column's options in the org, and the problems found translating to them."""

    column: str
    labels: dict[str, int]  # label -> value
    where: str
    problems: list[str]

    def shown(self) -> str:
        ordered = sorted(self.labels.items(), key=lambda kv: kv[1])
        return ", ".join(f"'{label}' ({value})" for label, value in ordered) or "none"

    def value(self, raw: str, key: str) -> str:
        """``raw`` (a label or a pinned integer) as the org's integer value, as text."""
        if raw == KEEP:
            return raw
        if pinned(raw):
            if int(raw) not in self.labels.values():
                self.problems.append(
                    f"{key}: {raw} is not a value of {self.column} in {self.where}; its options: {self.shown()}"
                )
            return str(int(raw))
        folded = {label.casefold(): value for label, value in self.labels.items()}
        found = self.labels.get(raw, folded.get(raw.casefold()))
        if found is None:
            self.problems.append(
                f"{key}: the label '{raw}' is not an option of {self.column} in {self.where}; "
                f"its options: {self.shown()}"
            )
            return raw
        return str(found)


def resolve_choices(
    mapping: SyncMapping, options: MappingABC[str, MappingABC[str, int]], *, where: str = "the CRM"
) -> SyncMapping:
    """The mapping with each CRM choice value named by its label replaced by the org's integer value
    (``options``: column -> {label: value}, as the CRM's metadata lists them). A label the org does
    not have, or a pinned integer that is not one of its values, is a :class:`MappingError` naming
    the mapping file, the field and the value, and listing the labels the org has."""
    problems: list[str] = []
    fields = dict(mapping.fields)
    for name, fm in mapping.fields.items():
        if fm.type != "enum" or fm.crm_values is None or fm.crm not in options:
            continue
        labels = {str(label): int(value) for label, value in options[fm.crm].items()}
        choices = _Choices(fm.crm, labels, where, problems)
        key, vmap = f"fields.{name}.values.crm", fm.crm_values
        read = {choices.value(k, f"{key}.read.{k}"): v for k, v in vmap.read.items()}
        write = {c: choices.value(v, f"{key}.write.{c}") for c, v in vmap.write.items()}
        write_from = {
            choices.value(held, f"{key}.write_from.{held}"): {
                c: choices.value(v, f"{key}.write_from.{held}.{c}") for c, v in overrides.items()
            }
            for held, overrides in vmap.write_from.items()
        }
        fields[name] = dataclasses.replace(fm, crm_values=ValueMap(read, write, write_from))
    if problems:
        raise MappingError(f"mapping {mapping.source}: " + "; ".join(problems), problems)
    return dataclasses.replace(mapping, fields=fields)


def load_mapping_file(path: str | os.PathLike[str]) -> SyncMapping:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"mapping {source}: cannot be read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MappingError(f"mapping {source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_mapping(doc, Path(path).name)


@cache
def _load_cached(path: str, mtime: float) -> SyncMapping:
    return load_mapping_file(path)


def load_mapping(crm: str, path: str | os.PathLike[str] | None = None) -> SyncMapping:
    """The mapping for ``crm``: ``path``, else ``$COSELL_MAPPING_<CRM>``, else the shipped default.
    (The DAGs pass the ``cosell_mapping_<crm>`` Airflow Variable as ``path`` when it is set:
    :func:`cosell_sync.dag_factory.mapping_override`; this module reads no Airflow state.)"""
    if crm not in CRMS:
        raise MappingError(f"unknown CRM '{crm}' (expected one of {', '.join(CRMS)})")
    chosen = Path(path or os.environ.get(f"COSELL_MAPPING_{crm.upper()}") or DEFAULTS / f"{crm}.yaml")
    try:
        mtime = chosen.stat().st_mtime
    except OSError as exc:
        raise MappingError(f"mapping {chosen}: cannot be read: {exc.strerror}") from None
    mapping = _load_cached(str(chosen), mtime)
    if mapping.crm != crm:
        raise MappingError(f"mapping {chosen.name}: crm: is '{mapping.crm}', expected '{crm}'")
    return mapping
