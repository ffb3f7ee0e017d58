"""The Salesforce side: the mapping's fields on Opportunity, Account and Contact, values as
Salesforce stores them, and the create/update steps of :class:`cosell_sync.sides.crm.CrmSide`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, MappingError, SyncMapping
from cosell_sync.engine.normalize import as_boolean, normalize_column, side_value
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.salesforce import SalesforceSyncHook
from cosell_sync.hooks.soql import name
from cosell_sync.sides.base import RunContext, WriteResult, audit_line, missing, plain, prepend_audit
from cosell_sync.sides.crm import CrmSide, Pending, text
from cosell_sync.sides.salesforce.matching import SalesforceMatching
from cosell_sync.sides.salesforce.query import SalesforceReads, as_aware, same_stamp, valid_id
from cosell_sync.sides.salesforce.writes import SalesforceWrites, clip

log = logging.getLogger(__name__)


DEFAULT_CLOSE_DAYS = 90  # CloseDate is required: a referral without one closes 90 days after the run
DEFAULT_STAGE = "new"  # StageName is required: a referral without a stage starts at the mapping's "new"
FALLBACK_STAGE = "Prospecting"  # ... or this, when the mapping does not map StageName at all
SYNCED, ERROR = "Synced", "Error"
AUDIT_VALUE_CHARS = 200  # long values (notes) are shortened in the audit line, so history is kept


def _audit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields as the audit line shows them: long text shortened (its length kept)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str) and len(value) > AUDIT_VALUE_CHARS:
            value = f"{value[:AUDIT_VALUE_CHARS]}... ({len(value)} chars)"
        out[key] = value
    return out


class SalesforceSide(SalesforceReads, SalesforceWrites, SalesforceMatching, CrmSide):
    """:class:`cosell_sync.sides.base.CrmSide` for Salesforce (Opportunity, Account, Contact), on
    the shared create/update sequence of :class:`cosell_sync.sides.crm.CrmSide`."""

    crm = "salesforce"
    id_field = "Id"

    def __init__(self, hook: SalesforceSyncHook, mapping: SyncMapping) -> None:
        if mapping.crm != self.crm:
            raise MappingError(f"mapping {mapping.source}: crm: is '{mapping.crm}', expected '{self.crm}'")
        self.hook = hook
        self.mapping = mapping
        r = mapping.records
        self.opportunity = r["opportunity"]
        self.account = r["account"]
        self.contact = r["contact"]
        self.link_field = r["link_field"]
        self.link_url_field = r["link_url_field"]
        self.audit_field = r["audit_field"]
        self.status_field = r["sync_status_field"]
        for key, value in r.items():
            self._check_name(f"records.{key}", value, dotted=False)

        account_prefix, contact_prefix = f"{self.account}.", f"{self.contact}."
        self.opp_fields: list[FieldMapping] = []  # written to the Opportunity itself
        self.account_fields: list[tuple[FieldMapping, str]] = []  # (mapping, Account field)
        self.contact_fields: list[tuple[FieldMapping, str]] = []  # (mapping, Contact field)
        self.parent_paths: list[str] = []  # other parent relationship paths, read only
        for fm in mapping.fields.values():
            self._check_name(f"fields.{fm.name}.crm", fm.crm, dotted=True)
            if fm.crm.startswith(account_prefix) and fm.crm.count(".") == 1:
                self.account_fields.append((fm, fm.crm[len(account_prefix) :]))
            elif fm.crm.startswith(contact_prefix) and fm.crm.count(".") == 1:
                self.contact_fields.append((fm, fm.crm[len(contact_prefix) :]))
            elif "." in fm.crm:
                self.parent_paths.append(fm.crm)
            else:
                self.opp_fields.append(fm)
        self.by_crm = {fm.crm.lower(): fm for fm in mapping.fields.values()}
        self._read_backs: dict[tuple[str, Any], Any] = {}  # (field, Salesforce value) -> canonical

    def check_mapping(self) -> dict[str, Any]:
        """At the start of a run: every picklist value the mapping names (read, write and
        ``write_from``) is an active value of that Opportunity picklist in the org, as ``describe()``
        lists it; else a :class:`ConfigurationError` naming the file, the field and the value, and
        listing the org's values. One describe call; fields that are not picklists are not checked."""
        if not any(fm.type == "enum" and fm.crm_values is not None for fm in self.opp_fields):
            return {}
        problems = self.picklist_problems(self.hook.describe(self.opportunity))
        if problems:
            raise ConfigurationError(f"mapping {self.mapping.source}: " + "; ".join(problems))
        return {}

    def picklist_problems(self, described: Mapping[str, Any]) -> list[str]:
        """Each picklist value the mapping names that the Opportunity's ``describe()`` (``described``)
        does not list as active, as one message naming the mapping key, the value and the org's values."""
        picklists = {
            str(f["name"]).lower(): [str(p["value"]) for p in f.get("picklistValues") or [] if p.get("active", True)]
            for f in described.get("fields", [])
            if f.get("type") in ("picklist", "multipicklist")
        }
        problems = []
        for fm in self.opp_fields:
            values = picklists.get(fm.crm.lower())
            if fm.type != "enum" or fm.crm_values is None or values is None:
                continue
            vmap = fm.crm_values
            named = [(f"read.{v}", v) for v in vmap.read]
            named += [(f"write.{c}", v) for c, v in vmap.write.items()]
            named += [(f"write_from.{h}.{c}", v) for h, o in vmap.write_from.items() for c, v in o.items()]
            for where, value in named:
                if value != KEEP and value not in values:
                    problems.append(
                        f"fields.{fm.name}.values.crm.{where}: '{value}' is not a value of the {fm.crm} picklist "
                        f"in this Salesforce org; its values: {', '.join(repr(v) for v in values) or 'none'}"
                    )
        return problems

    def _check_name(self, key: str, value: str, *, dotted: bool) -> None:
        try:
            name(value)
        except ValueError:
            raise MappingError(
                f"mapping {self.mapping.source}: {key}: '{value}' is not a Salesforce field path"
            ) from None
        if not dotted and "." in value:
            raise MappingError(f"mapping {self.mapping.source}: {key}: '{value}' must be a field of the object")

    def _field_for(self, crm_path: str) -> FieldMapping | None:
        return self.by_crm.get(crm_path.lower())

    def _write_value(self, fm: FieldMapping, canonical: Any) -> Any:
        """A canonical value as Salesforce stores it; raises ValueError when an enum has no value."""
        value = side_value(fm, "crm", canonical)
        if value is None:
            if fm.type == "enum":
                raise ValueError(f"{fm.crm}: no Salesforce value for canonical {fm.name} '{canonical}'")
            return None
        if fm.type == "boolean":  # a checkbox takes JSON true/false
            flag = as_boolean(value)
            if flag is None:
                raise ValueError(f"{fm.crm}: {value!r} is not true or false")
            return flag
        if fm.type == "decimal":
            return float(value)
        if fm.type == "date":
            if isinstance(value, datetime):
                return as_aware(value).astimezone(UTC).date().isoformat()
            if isinstance(value, date):
                return value.isoformat()
            return str(value)[:10]
        return value

    def _opportunity_values(self, fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Opportunity field -> value, canonical field -> value) for the Opportunity-level fields
        in ``fields`` (KEEP values skipped); raises ValueError for an enum with no Salesforce value."""
        values: dict[str, Any] = {}
        written: dict[str, Any] = {}
        for fm in self.opp_fields:
            if fm.name not in fields:
                continue
            canonical = plain(fields[fm.name])
            if canonical == KEEP:
                continue
            values[fm.crm] = None if canonical is None else self._write_value(fm, canonical)
            written[fm.name] = canonical
        return values, written

    def _read_back(self, fm: FieldMapping, value: Any) -> Any:
        """The canonical value that extracting ``value`` (as Salesforce stores it in ``fm.crm``)
        yields, exactly as the normalizer reads it; None when it reads as nothing (no value, no
        mapping, or "no opinion")."""
        key = (fm.name, value)
        if key not in self._read_backs:  # the same few defaults for every row of a run
            values, errors = normalize_column(pd.Series([value], dtype=object), fm, "crm")
            canonical = None if not missing(errors.iloc[0]) else plain(values.iloc[0])
            self._read_backs[key] = None if canonical == KEEP else canonical
        return self._read_backs[key]

    def _defaults(self, values: dict[str, Any], written: dict[str, Any], ctx: RunContext) -> None:
        """Salesforce requires StageName and CloseDate: a referral without a stage starts at the
        mapping's value for "new", one without a close date closes 90 days after the run.
        ``written`` gets what these invented values read back as (the next extract sees them)."""
        if values.get("StageName") is None:
            stage_fm = self._field_for("StageName")
            stage = side_value(stage_fm, "crm", DEFAULT_STAGE) if stage_fm is not None else None
            values["StageName"] = stage or FALLBACK_STAGE
            if stage_fm is not None:
                written[stage_fm.name] = self._read_back(stage_fm, values["StageName"])
        if values.get("CloseDate") is None:
            close = (ctx.now.date() + timedelta(days=DEFAULT_CLOSE_DAYS)).isoformat()
            values["CloseDate"] = close
            close_fm = self._field_for("CloseDate")
            if close_fm is not None:
                written[close_fm.name] = self._read_back(close_fm, close)
        for key in [k for k, v in values.items() if v is None]:
            del values[key]  # nothing to clear on a new record; a rerun keeps what a seller added
        for key in [k for k, v in written.items() if v is None]:
            del written[key]

    def _side_fields(self, row: Mapping[str, Any], pairs: list[tuple[FieldMapping, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fm, field in pairs:
            canonical = plain(row.get(fm.name))
            if canonical is None or canonical == KEEP:
                continue
            value = self._write_value(fm, canonical)
            if value is not None:
                out[field] = value
        return out

    def opportunity_level(self) -> set[str]:
        return {fm.name for fm in self.opp_fields}

    def id_key(self, crm_id: Any) -> str:
        return str(crm_id).strip()[:15]  # an Id's case-sensitive 15-character form

    def prepare_create(self, row: Pending, ctx: RunContext) -> None:
        """The Opportunity's values (``row.payload``), with the required StageName and CloseDate
        filled in when the referral has none; ``row.written``: every canonical value the new
        records will hold, those defaults included."""
        values, written = self._opportunity_values(row.values)
        self._defaults(values, written, ctx)
        self._side_fields(row.values, self.account_fields)  # checked here, written by ensure_accounts
        self._side_fields(row.values, self.contact_fields)
        for fm, _ in (*self.account_fields, *self.contact_fields):
            if fm.name in row.values:
                written[fm.name] = row.values[fm.name]
        row.payload, row.written = values, written

    def upsert_opportunities(self, rows: list[Pending], ctx: RunContext) -> None:
        """One upsert per new opportunity, keyed by the referral id (an HTTP retry of the call
        cannot duplicate it), carrying the link, the sync status and the first audit line."""
        todo = [r for r in rows if not r.adopted]
        payloads = []
        for row in todo:
            payload = {self.link_field: row.referral_id, **row.payload}
            if row.account_id:
                payload["AccountId"] = row.account_id
            payload[self.link_url_field] = ctx.referral_link(str(row.referral_id))
            payload[self.status_field] = SYNCED
            payload[self.audit_field] = audit_line(ctx, "pc_to_crm", _audit_fields(row.written))
            payloads.append(payload)
        for row, outcome in zip(
            todo, self._write("upsert", self.opportunity, payloads, external_id=self.link_field), strict=True
        ):
            if outcome.ok:
                row.crm_id, row.created = outcome.id, outcome.created
            else:
                row.fail(outcome.error or "rejected", outcome.code or "UNKNOWN")

    def after_create(self, rows: list[Pending], ctx: RunContext) -> None:
        """The contact as each opportunity's primary contact role (an adopted one gets it only if
        it has none: the earlier try may have died before it)."""
        errors: list[tuple[str, str | None] | None] = [None] * len(rows)
        self._ensure_roles([(i, r.crm_id, r.contact_id, r.created) for i, r in enumerate(rows) if r.crm_id], errors)
        for row, error in zip(rows, errors, strict=True):
            if error is not None:
                row.fail(*error)

    def version(self, record: Mapping[str, Any]) -> str | None:
        """The ``SystemModstamp`` an opportunity was extracted with (checked before an update)."""
        stamp = record.get("SystemModstamp")
        return None if missing(stamp) else str(stamp)

    def prepare_update(self, row: Pending) -> None:
        row.payload, row.written = self._opportunity_values(row.values)
        row.values = {k: v for k, v in row.values.items() if k in row.written}

    def read_current(self, rows: list[Pending], ctx: RunContext) -> None:
        """The audit trail and ``SystemModstamp`` of the opportunities about to be updated, in
        one query per 200 ids, right before the write. sObject Collections carry no ETag: a
        record modified since extract is not written at all and is deferred to the next run
        (``changed_during_run``); a record with no known version is written unconditionally.
        What remains is the window between this query and the write itself."""
        stamps: dict[str, str | None] = {}
        ids = [v for v in (valid_id(r.crm_id) for r in rows) if v]
        audits, unread = self._read_audit(ids, stamps=stamps)
        for row in rows:
            key = self.id_key(row.crm_id)
            if key in unread:  # never overwrite an audit trail we could not read
                message, code = unread[key]
                row.fail(f"reading {self.audit_field}: {message}", code)
                continue
            row.current = {self.audit_field: audits.get(key)}
            current = stamps.get(key)
            if row.version is not None and current is not None and not same_stamp(row.version, current):
                log.info("Opportunity %s changed during the run (%s -> %s): deferred", row.crm_id, row.version, current)
                row.defer(list(row.values))

    def write_updates(self, rows: list[Pending], ctx: RunContext) -> None:
        records = []
        for row in rows:
            line = audit_line(ctx, "pc_to_crm", _audit_fields(row.written))
            records.append(
                {
                    "Id": str(row.crm_id),
                    **row.payload,
                    self.status_field: SYNCED,
                    self.audit_field: prepend_audit((row.current or {}).get(self.audit_field), line),
                }
            )
        for row, outcome in zip(rows, self._write("update", self.opportunity, records), strict=True):
            if not outcome.ok:
                row.fail(outcome.error or "rejected", outcome.code or "UNKNOWN")

    def mark(self, crm_ids: list[str], status: str, ctx: RunContext, *, error: str | None = None) -> None:
        """Set the sync status (``Synced``/``Error``) of ``crm_ids`` in one collections update; with
        ``error``, also prepend an audit line carrying it. A record Salesforce rejects is logged
        (this runs on error paths: it must not hide the error being reported)."""
        ids = list(dict.fromkeys(v for v in (valid_id(i) for i in crm_ids) if v))
        if not ids or ctx.dry_run:
            return
        records: list[dict[str, Any]] = [{"Id": i, self.status_field: status} for i in ids]
        if error:
            audits, unread = self._read_audit(ids)
            line = audit_line(ctx, "error", {"sync_status": status, "error": clip(str(error), 1000)})
            for record in records:
                if record["Id"][:15] not in unread:  # never overwrite an audit trail we could not read
                    record[self.audit_field] = prepend_audit(audits.get(record["Id"][:15]), line)
        for record, outcome in zip(records, self._write("update", self.opportunity, records), strict=True):
            if not outcome.ok:
                log.warning("Could not mark opportunity %s as %s: %s", record["Id"], status, outcome.error)

    def write_links(self, links: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """``links``: ``crm_id``, ``referral_id``: store the referral id and its link (with sync
        status Synced and an audit line) on opportunities that referrals were just created for.
        One result per row, keyed by the CRM id."""
        rows = [dict(r) for r in links.to_dict("records")] if len(links) else []
        results: list[WriteResult] = []
        pending: list[WriteResult] = []
        for row in rows:
            rid, crm_id = text(row.get("referral_id")), text(row.get("crm_id"))
            result = WriteResult(key=crm_id or "", action="update", ok=True, referral_id=rid, crm_id=crm_id)
            results.append(result)
            if crm_id is None or rid is None:
                _fail(result, "a link needs both a CRM id and a referral id", "MISSING_ARGUMENT")
            else:
                pending.append(result)
        if ctx.dry_run or not pending:
            return results
        held: dict[str, str | None] = {}
        audits, unread = self._read_audit([v for v in (valid_id(r.crm_id) for r in pending) if v], links=held)
        # An opportunity that holds the referral id already (an earlier try of the task wrote
        # it) is not written again: no second audit line.
        for result in pending:
            result.adopted = (
                str(held.get(str(result.crm_id)[:15]) or "").casefold() == str(result.referral_id).casefold()
            )
        pending = [r for r in pending if not r.adopted]
        records = []
        for result in pending:
            crm_id, rid = str(result.crm_id), str(result.referral_id)
            record = {
                "Id": crm_id,
                self.link_field: rid,
                self.link_url_field: ctx.referral_link(rid),
                self.status_field: SYNCED,
            }
            if crm_id[:15] not in unread:
                line = audit_line(ctx, "crm_to_pc", {"referral_id": rid})
                record[self.audit_field] = prepend_audit(audits.get(crm_id[:15]), line)
            records.append(record)
        for result, outcome in zip(pending, self._write("update", self.opportunity, records), strict=True):
            if not outcome.ok:
                _fail(result, outcome.error or "rejected", outcome.code or "UNKNOWN")
        return results


def _fail(result: WriteResult, message: str, code: str) -> None:
    result.ok, result.fields = False, {}
    result.error, result.error_code = message, code
