"""The Salesforce side of a sync: extract opportunities (with their account and primary
contact), create opportunities from referrals, update them, and store links.

Reads are SOQL built with :mod:`cosell_sync.hooks._soql` (every value escaped). Writes go
through sObject Collections (200 records a call; Bulk API 2.0 above the hook's
``bulk_threshold`` for updates and upserts), and every record reports its own outcome:

* **Extract.** Every Opportunity-level field the mapping's ``crm`` paths and ``records:``
  names need, the account through the ``Account`` parent relationship, and the primary
  contact through the ``OpportunityContactRoles`` child subquery (``IsPrimary = TRUE``),
  flattened into ``record["Contact"]`` so that ``Contact.Email`` paths resolve.
* **Create** (the steps of :class:`cosell_sync.sides.crm.CrmWorkflow`). An opportunity that
  already holds the referral id (an earlier try of the task made it) is adopted, never
  written over. Accounts are matched by name + postal code (case- and space-insensitive) and
  created when missing; contacts are matched by email (case-insensitive) and created when
  missing; new opportunities are *upserted* by the link field (the referral id), so an HTTP
  retry of the call cannot duplicate one; the contact becomes the opportunity's primary
  ``OpportunityContactRole``.
* **Update.** Only the Opportunity-level fields asked for (accounts and contacts are shared
  between deals, so they are never updated from one referral), plus the sync status and a
  new audit line (newest first, bounded). The query that reads the audit trail right before
  the write also reads ``SystemModstamp``: a record changed since extract is deferred.
* **Failures.** A record Salesforce rejects fails alone, with Salesforce's ``statusCode`` and
  message. A call that fails as a whole is retried in halves until the records that fail it
  are isolated (a create only when nothing can have been written), so the good records of the
  batch are written. Authentication and configuration errors are not about records: they
  raise, so the task fails and retries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
import requests

from cosell_sync.engine.mapping import KEEP, FieldMapping, MappingError, SyncMapping
from cosell_sync.engine.normalize import _normalize_column, as_boolean, side_value
from cosell_sync.errors import (
    ApiError,
    AuthenticationError,
    ConfigurationError,
    CosellError,
    ThrottledError,
    TransportError,
)
from cosell_sync.hooks._soql import Condition, literal, name, select
from cosell_sync.hooks.salesforce import COLLECTION_LIMIT, RecordResult, SalesforceSyncHook
from cosell_sync.sides.base import RunContext, WriteResult, audit_line, match_key, missing, plain, prepend_audit
from cosell_sync.sides.crm import CrmWorkflow, Pending

log = logging.getLogger(__name__)

IN_LIMIT = 200  # values per IN (...) list
IN_CHARS = 8000  # and at most this many characters of literals, so the GET query URL stays short
DEFAULT_CLOSE_DAYS = 90  # CloseDate is required: a referral without one closes 90 days after the run
DEFAULT_STAGE = "new"  # StageName is required: a referral without a stage starts at the mapping's "new"
FALLBACK_STAGE = "Prospecting"  # ... or this, when the mapping does not map StageName at all
SYNCED, ERROR = "Synced", "Error"
ROLE_ATTEMPTS = 3  # tries of the primary contact roles of new opportunities (see _ensure_roles)
CREATE_ATTEMPTS = 3  # tries of the accounts and contacts of new opportunities (see _tried_again)
AUDIT_VALUE_CHARS = 200  # long values (notes) are shortened in the audit line, so history is kept
ERROR_CHARS = 2000  # Salesforce quotes the rejected value in some messages (a 1 MB description ...)
CONTACT_ROLES = "OpportunityContactRoles"  # the child relationship from Opportunity
ROLE_OBJECT = "OpportunityContactRole"
_SF_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


@dataclass
class _Outcome:
    """One record's outcome of a write call."""

    ok: bool
    id: str | None = None
    created: bool | None = None
    error: str | None = None
    code: str | None = None


def _clip(text: str, limit: int = ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _valid_id(value: Any) -> str | None:
    text = None if missing(value) else str(value).strip()
    return text if text and _SF_ID.fullmatch(text) else None


def _chunks(values: Sequence[Any], limit: int = IN_LIMIT, chars: int = IN_CHARS) -> Iterator[list[Any]]:
    """``values`` in IN-list sized pieces: at most ``limit`` values and about ``chars`` characters."""
    chunk: list[Any] = []
    size = 0
    for value in values:
        width = len(literal(value)) + 2
        if chunk and (len(chunk) >= limit or size + width > chars):
            yield chunk
            chunk, size = [], 0
        chunk.append(value)
        size += width
    if chunk:
        yield chunk


def _strip_attributes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_attributes(v) for k, v in value.items() if k != "attributes"}
    if isinstance(value, list):
        return [_strip_attributes(v) for v in value]
    return value


def _describe(exc: Exception) -> tuple[str, str]:
    """(message, code) of an exception that failed a call; never a credential (our errors
    carry the service's message and a URL path only)."""
    if isinstance(exc, ApiError):
        return _clip(str(exc)), exc.code or type(exc).__name__
    if isinstance(exc, CosellError):
        return _clip(str(exc)), type(exc).__name__
    return _clip(f"{type(exc).__name__}: {exc}"), type(exc).__name__


def _first_code(result: RecordResult) -> str | None:
    for err in result.errors:
        code = err.get("statusCode") or err.get("errorCode")
        if code:
            return str(code)
    return None


def _unencodable(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` cannot be sent as standard JSON (naming its fields), or None."""
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fields = []
        for key, value in record.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                fields.append(str(key))
        return _clip(f"{type(exc).__name__}: {exc} (fields: {', '.join(fields)})")
    return None


def _may_split(exc: Exception, op: str) -> bool:
    """Whether a call that failed as a whole is retried in halves: always when the request
    was never sent (it could not be encoded); on a 4xx for the whole call (nothing written);
    for updates and upserts (idempotent) also on a 500. Never on throttling, an unavailable
    service (502, 503, 504) or a lost connection (the hook retried it already): those are not
    about the records, and halves would only multiply the calls to a failing network."""
    if isinstance(exc, ThrottledError):
        return False
    if isinstance(exc, requests.exceptions.InvalidJSONError) and not isinstance(exc, requests.JSONDecodeError):
        return True  # raised while building the request: nothing was sent
    decoding = (json.JSONDecodeError, requests.JSONDecodeError)  # an answer that could not be read: it was sent
    if isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, decoding):
        return True  # the record could not be encoded, or the hook refused it before sending
    if isinstance(exc, ApiError) and exc.status is not None and 400 <= exc.status < 500:
        return exc.status not in (401, 403)  # a refused session or permission: halves would be refused too
    if op == "create":
        return False  # the answer may have been lost after Salesforce created the records
    if isinstance(exc, TransportError):
        return False
    status = exc.status if isinstance(exc, ApiError) else None
    return status is not None and status >= 500 and status not in _UNAVAILABLE


_UNAVAILABLE = frozenset({502, 503, 504})  # the service (not a record) is down: halves would fail too


def _audit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields as the audit line shows them: long text shortened (its length kept)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str) and len(value) > AUDIT_VALUE_CHARS:
            value = f"{value[:AUDIT_VALUE_CHARS]}... ({len(value)} chars)"
        out[key] = value
    return out


def _as_aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _stamp(value: Any) -> datetime | None:
    """A ``SystemModstamp`` as an aware datetime ("...+0000", "...Z", "...+00:00"); None if unreadable."""
    if isinstance(value, datetime):
        return _as_aware(value)
    try:
        return _as_aware(datetime.fromisoformat(re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", str(value).strip())))
    except ValueError:
        return None


def _same_stamp(a: Any, b: Any) -> bool:
    """Two ``SystemModstamp`` values name the same instant (texts compared when one is unreadable)."""
    ta, tb = _stamp(a), _stamp(b)
    if ta is None or tb is None:
        return str(a).strip() == str(b).strip()
    return ta == tb


class SalesforceSide(CrmWorkflow):
    """:class:`cosell_sync.sides.base.CrmSide` for Salesforce (Opportunity, Account, Contact), on
    the shared create/update sequence of :class:`cosell_sync.sides.crm.CrmWorkflow`."""

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
        enums = [fm for fm in self.opp_fields if fm.type == "enum" and fm.crm_values is not None]
        if not enums:
            return {}
        described = self.hook.describe(self.opportunity)
        picklists = {
            str(f["name"]).lower(): [str(p["value"]) for p in f.get("picklistValues") or [] if p.get("active", True)]
            for f in described.get("fields", [])
            if f.get("type") in ("picklist", "multipicklist")
        }
        problems = []
        for fm in enums:
            values = picklists.get(fm.crm.lower())
            if values is None:
                continue
            vmap = fm.crm_values
            assert vmap is not None
            named = [(f"read.{v}", v) for v in vmap.read]
            named += [(f"write.{c}", v) for c, v in vmap.write.items()]
            named += [(f"write_from.{h}.{c}", v) for h, o in vmap.write_from.items() for c, v in o.items()]
            for where, value in named:
                if value != KEEP and value not in values:
                    problems.append(
                        f"fields.{fm.name}.values.crm.{where}: '{value}' is not a value of the {fm.crm} picklist "
                        f"in this Salesforce org; its values: {', '.join(repr(v) for v in values) or 'none'}"
                    )
        if problems:
            raise ConfigurationError(f"mapping {self.mapping.source}: " + "; ".join(problems))
        return {}

    def _check_name(self, key: str, value: str, *, dotted: bool) -> None:
        try:
            name(value)
        except ValueError:
            raise MappingError(
                f"mapping {self.mapping.source}: {key}: '{value}' is not a Salesforce field path"
            ) from None
        if not dotted and "." in value:
            raise MappingError(f"mapping {self.mapping.source}: {key}: '{value}' must be a field of the object")

    # -- helpers ------------------------------------------------------------------------------
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
                return _as_aware(value).astimezone(UTC).date().isoformat()
            if isinstance(value, date):
                return value.isoformat()
            return str(value)[:10]
        return value

    def _query(self, soql: str) -> list[dict[str, Any]]:
        return [_strip_attributes(r) for r in self.hook.query_records(soql)]

    def _query_in(
        self,
        sobject: str,
        fields: Sequence[str],
        field: str,
        values: Iterable[Any],
        *,
        order_by: Sequence[str] = (),
        extra: Sequence[Condition] = (),
    ) -> list[dict[str, Any]]:
        """Every record whose ``field`` is one of ``values`` (IN lists chunked), de-duplicated by Id."""
        distinct = list(dict.fromkeys(v for v in values if v is not None and v != ""))
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(distinct):
            soql = select(sobject, fields, [*extra, Condition(field, "IN", chunk)], order_by=order_by)
            for record in self._query(soql):
                out.setdefault(record["Id"], record)
        return list(out.values())

    def _write(
        self, op: str, sobject: str, records: Sequence[Mapping[str, Any]], *, external_id: str | None = None
    ) -> list[_Outcome]:
        """One outcome per record, in order: collections calls of 200 records, or one bulk job
        above the hook's ``bulk_threshold``.

        A record whose values cannot be sent as JSON (``Infinity``) fails alone, before any call.
        A call that fails as a whole is retried in halves until the records that fail it are
        isolated (each then fails with the call's error); the others are written. A create is
        split only when the error proves nothing was written (a 4xx for the call, a request that
        could not be built): after a lost answer it may have been, and re-sending could
        duplicate. Throttling is not about the records: not split. Splitting costs at most
        about 2·n calls for n records."""
        if not records:
            return []
        outcomes: list[_Outcome | None] = [None] * len(records)
        sendable: list[int] = []
        for i, record in enumerate(records):
            problem = _unencodable(record)
            if problem is None:
                sendable.append(i)
            else:
                outcomes[i] = _Outcome(False, error=problem, code="JSON_SERIALIZATION")
        calls = [0, 0]  # calls made, calls that failed as a whole
        written = self._write_split(op, sobject, [records[i] for i in sendable], external_id, calls)
        for i, outcome in zip(sendable, written, strict=True):
            outcomes[i] = outcome
        if calls[1]:
            log.warning(
                "Salesforce %s of %d %s record(s): %d call(s) failed as a whole; split retries took %d call(s) "
                "in all, %d record(s) failed",
                op, len(records), sobject, calls[1], calls[0], sum(1 for o in outcomes if o and not o.ok),
            )  # fmt: skip
        return [o if o is not None else _Outcome(False, error="not written", code="UNPROCESSED") for o in outcomes]

    def _write_split(
        self, op: str, sobject: str, records: Sequence[Mapping[str, Any]], external_id: str | None, calls: list[int]
    ) -> list[_Outcome]:
        """:meth:`_write`'s calls for ``records`` (sent as the hook's calls allow), halving a
        call that fails as a whole."""
        if not records:
            return []
        bulk = op != "create" and len(records) > self.hook.bulk_threshold
        size = len(records) if bulk else COLLECTION_LIMIT
        outcomes: list[_Outcome] = []
        for start in range(0, len(records), size):
            chunk = list(records[start : start + size])
            calls[0] += 1
            try:
                if op == "create":
                    results = self.hook.create_records(sobject, chunk)
                elif op == "update":
                    results = self.hook.update_records(sobject, chunk)
                else:
                    assert external_id is not None
                    results = self.hook.upsert_records(sobject, external_id, chunk)
            except (AuthenticationError, ConfigurationError):
                raise  # not about these records: the task fails and is retried
            except Exception as exc:
                calls[1] += 1
                message, code = _describe(exc)
                if len(chunk) > 1 and _may_split(exc, op):
                    log.warning(
                        "Salesforce %s of %d %s record(s) failed as a whole (%s); retrying in halves",
                        op, len(chunk), sobject, message,
                    )  # fmt: skip
                    half = len(chunk) // 2
                    outcomes += self._write_split(op, sobject, chunk[:half], external_id, calls)
                    outcomes += self._write_split(op, sobject, chunk[half:], external_id, calls)
                    continue
                log.warning("Salesforce %s of %d %s record(s) failed: %s", op, len(chunk), sobject, message)
                outcomes.extend(_Outcome(False, error=message, code=code) for _ in chunk)
                continue
            for result in results:
                if result.success:
                    outcomes.append(_Outcome(True, result.id, result.created))
                else:
                    outcomes.append(_Outcome(False, result.id, None, _clip(result.error_message), _first_code(result)))
        return outcomes

    def _read_audit(
        self,
        values: Sequence[str],
        *,
        by: str = "Id",
        stamps: dict[str, str | None] | None = None,
        links: dict[str, str | None] | None = None,
    ) -> tuple[dict[str, str | None], dict[str, tuple[str, str]]]:
        """The audit field of the opportunities whose ``by`` field is one of ``values``:
        (key -> text, key -> (error, code) for values whose read failed). Keys: an Id's
        15-character (case-sensitive) form, or the case-folded value of another field.
        ``stamps``: also read each one's ``SystemModstamp`` (same query) into it, by the same key;
        ``links``: the same for the referral id it holds."""
        key: Callable[[Any], str] = (lambda v: str(v)[:15]) if by == "Id" else (lambda v: str(v).casefold())
        audit: dict[str, str | None] = {}
        failed: dict[str, tuple[str, str]] = {}
        extra = [*(["SystemModstamp"] if stamps is not None else []), *([self.link_field] if links is not None else [])]
        fields = list(dict.fromkeys(["Id", by, self.audit_field, *extra]))
        for chunk in _chunks(list(dict.fromkeys(values))):
            soql = select(self.opportunity, fields, [Condition(by, "IN", chunk)])
            try:
                for record in self._query(soql):
                    audit[key(record[by])] = record.get(self.audit_field)
                    if stamps is not None:
                        stamps[key(record[by])] = record.get("SystemModstamp")
                    if links is not None:
                        links[key(record[by])] = record.get(self.link_field)
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception as exc:
                error = _describe(exc)
                failed.update({key(v): error for v in chunk})
        return audit, failed

    # -- extract --------------------------------------------------------------------------------
    def extract_fields(self) -> list[str]:
        """The Opportunity fields (and parent relationship paths) read by :meth:`extract`."""
        r = self.mapping.records
        wanted = [
            "Id",
            "AccountId",
            "SystemModstamp",
            "IsClosed",
            *[fm.crm for fm in self.opp_fields],
            r["link_field"],
            r["link_url_field"],
            r["sync_flag_field"],
            r["audit_field"],
            r["sync_status_field"],
            r["modified_field"],
            r["closed_field"],
            *[f"{self.account}.{f}" for _, f in self.account_fields],
            *self.parent_paths,
        ]
        seen: set[str] = set()
        out = []
        for item in wanted:
            if item.lower() not in seen:  # SOQL refuses a field selected twice
                seen.add(item.lower())
                out.append(item)
        return out

    def _contact_subquery(self) -> str:
        fields = {"contactid": "ContactId"}
        for _, f in self.contact_fields:
            if f.lower() != "id":
                fields.setdefault(f"contact.{f.lower()}", f"Contact.{f}")
        return select(CONTACT_ROLES, list(fields.values()), [Condition("IsPrimary", "=", True)])

    def _extract_soql(self, where: Sequence[Condition]) -> str:
        outer = select(self.opportunity, self.extract_fields(), where, order_by=["SystemModstamp", "Id"])
        # The child subquery is itself built by select() (names checked, values escaped); it goes
        # into the field list, which select() only accepts as plain names.
        head = f" FROM {self.opportunity}"
        return outer.replace(head, f", ({self._contact_subquery()}){head}", 1)

    def _flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        roles = record.pop(CONTACT_ROLES, None)
        rows = roles.get("records") if isinstance(roles, dict) else None
        contact = None
        if rows:
            role = rows[0]
            nested = role.get("Contact") or {}
            contact = {"Id": role.get("ContactId"), **{k: v for k, v in nested.items() if k != "Id"}}
        record[self.contact] = contact
        return record

    def extract(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        crm_ids: list[str] | None = None,
        referral_ids: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Opportunities as nested records (``Account``: the account's mapped fields, ``Contact``:
        the primary contact or None), ordered by ``SystemModstamp, Id``.

        ``since``/``until``: ``SystemModstamp > since`` and ``<= until`` (naive datetimes are UTC).
        ``crm_ids``/``referral_ids``: only these (the union when both are given); an empty list
        selects nothing, and ids that cannot be Salesforce ids are skipped (they match nothing,
        and Salesforce would refuse the whole query). No arguments: every opportunity.
        """
        window: list[Condition] = []
        if since is not None:
            window.append(Condition("SystemModstamp", ">", _as_aware(since)))
        if until is not None:
            window.append(Condition("SystemModstamp", "<=", _as_aware(until)))
        if crm_ids is None and referral_ids is None:
            return [self._flatten(r) for r in self._query(self._extract_soql(window))]
        filters: list[tuple[str, list[Any]]] = []
        if crm_ids is not None:
            valid = [v for v in (_valid_id(i) for i in crm_ids) if v]
            skipped = len([i for i in crm_ids if not missing(i)]) - len(valid)
            if skipped:
                log.warning("Skipped %d value(s) that are not Salesforce ids", skipped)
            filters.append(("Id", list(dict.fromkeys(valid))))
        if referral_ids is not None:
            refs = [str(i) for i in referral_ids if not missing(i) and str(i) != ""]
            filters.append((self.link_field, list(dict.fromkeys(refs))))
        found: dict[str, dict[str, Any]] = {}
        for field, values in filters:
            for chunk in _chunks(values):
                for record in self._query(self._extract_soql([*window, Condition(field, "IN", chunk)])):
                    found.setdefault(record["Id"], record)
        records = sorted(found.values(), key=lambda r: (r.get("SystemModstamp") or "", r["Id"]))
        return [self._flatten(r) for r in records]

    # -- create ---------------------------------------------------------------------------------
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
            values, errors = _normalize_column(pd.Series([value], dtype=object), fm, "crm")
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

    # -- the workflow's steps (cosell_sync.sides.crm) ----------------------------------------------
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

    def ensure_accounts(self, rows: list[Pending], ctx: RunContext) -> None:
        errors = [r.error for r in rows]
        account_ids = self._tried_again(self._ensure_accounts, [r.values for r in rows], errors)
        for row, account_id, error in zip(rows, account_ids, errors, strict=True):
            row.account_id = account_id
            if error is not None:
                row.fail(*error)

    def ensure_contacts(self, rows: list[Pending], ctx: RunContext) -> None:
        errors = [r.error for r in rows]
        contact_ids = self._tried_again(
            self._ensure_contacts, [r.values for r in rows], errors, [r.account_id for r in rows]
        )
        for row, contact_id, error in zip(rows, contact_ids, errors, strict=True):
            row.contact_id = contact_id
            if error is not None:
                row.fail(*error)

    @staticmethod
    def _tried_again(
        ensure: Callable[..., list[str | None]],
        values: list[dict[str, Any]],
        errors: list[tuple[str, str] | None],
        *columns: list[Any],
    ) -> list[str | None]:
        """``ensure`` (match or create accounts, or contacts) for the rows, then again, up to
        :data:`CREATE_ATTEMPTS` times in all, for the rows it failed: a create whose call failed
        as a whole (a 500, a lost answer) is not sent again by the hook, as it may have landed;
        the next try looks it up first (found, it is used) and creates only what is missing.
        Without this, one transient fault costs the record a run."""
        failed_before = [e is not None for e in errors]  # not ours to try again
        ids = ensure(values, errors, *columns)
        for _ in range(CREATE_ATTEMPTS - 1):
            again = [i for i, e in enumerate(errors) if e is not None and not failed_before[i]]
            if not again:
                break
            sub_errors: list[tuple[str, str] | None] = [None] * len(again)
            sub_ids = ensure([values[i] for i in again], sub_errors, *([c[i] for i in again] for c in columns))
            for k, i in enumerate(again):
                ids[i], errors[i] = sub_ids[k], sub_errors[k]
        return ids

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

    def _ensure_accounts(self, rows: list[dict[str, Any]], errors: list[tuple[str, str] | None]) -> list[str | None]:
        """Per row: the Id of the account matched (or created) by name + postal code; rows whose
        account cannot be found or created get that account's error."""
        n = len(rows)
        account_ids: list[str | None] = [None] * n
        name_fm = self._field_for(f"{self.account}.Name")
        if name_fm is None:
            return account_ids
        postal_fm = self._field_for(f"{self.account}.BillingPostalCode")
        keys: list[str | None] = [None] * n
        first_row: dict[str, int] = {}
        for i, row in enumerate(rows):
            account_name = plain(row.get(name_fm.name))
            if errors[i] is not None or account_name is None or not str(account_name).strip():
                continue
            postal = plain(row.get(postal_fm.name)) if postal_fm else None
            keys[i] = match_key(account_name, postal)
            first_row.setdefault(keys[i], i)
        if not first_row:
            return account_ids

        # Existing accounts: by name (as given, and with its spaces collapsed) and by postal code
        # (as given, and without spaces), matched here on the normalized key.
        names: list[str] = []
        postals: list[str] = []
        for i in first_row.values():
            account_name = str(plain(rows[i].get(name_fm.name))).strip()
            names += [account_name, " ".join(account_name.split())]
            postal = plain(rows[i].get(postal_fm.name)) if postal_fm else None
            if postal is not None and str(postal).strip():
                postals += [str(postal).strip(), re.sub(r"\s+", "", str(postal))]
        fields = ["Id", "Name", "BillingPostalCode", "CreatedDate"]
        order = ["CreatedDate", "Id"]
        try:
            found = self._query_in(self.account, fields, "Name", names, order_by=order)
            found += self._query_in(self.account, fields, "BillingPostalCode", postals, order_by=order)
        except (AuthenticationError, ConfigurationError):
            raise
        except Exception as exc:
            message, code = _describe(exc)
            for i, key in enumerate(keys):
                if key is not None:
                    errors[i] = (f"account lookup: {message}", code)
            return account_ids
        by_key: dict[str, str] = {}
        for record in sorted(found, key=lambda r: (r.get("CreatedDate") or "", r["Id"])):
            by_key.setdefault(match_key(record.get("Name"), record.get("BillingPostalCode")), record["Id"])

        missing = [key for key in first_row if key not in by_key]
        failed: dict[str, tuple[str, str]] = {}
        payloads = [self._side_fields(rows[first_row[key]], self.account_fields) for key in missing]
        for key, outcome in zip(missing, self._write("create", self.account, payloads), strict=True):
            if outcome.ok and outcome.id:
                by_key[key] = outcome.id
            else:
                account_name = plain(rows[first_row[key]].get(name_fm.name))
                failed[key] = (f"account '{account_name}': {outcome.error or 'not created'}", outcome.code or "UNKNOWN")
        for i, key in enumerate(keys):
            if key is None:
                continue
            if key in failed:
                errors[i] = failed[key]
            else:
                account_ids[i] = by_key[key]
        return account_ids

    def _ensure_contacts(
        self, rows: list[dict[str, Any]], errors: list[tuple[str, str] | None], account_ids: list[str | None]
    ) -> list[str | None]:
        """Per row: the Id of the contact matched (or created) by email; a contact that cannot be
        created fails its rows (the deal is retried with its contact, never silently without)."""
        n = len(rows)
        contact_ids: list[str | None] = [None] * n
        email_fm = self._field_for(f"{self.contact}.Email")
        if email_fm is None:
            return contact_ids
        emails: list[str | None] = [None] * n
        first_row: dict[str, int] = {}
        for i, row in enumerate(rows):
            email = plain(row.get(email_fm.name))
            if errors[i] is not None or email is None or not str(email).strip():
                continue
            emails[i] = str(email).strip().lower()
            first_row.setdefault(emails[i], i)
        if not first_row:
            return contact_ids
        try:
            found = self._query_in(
                self.contact,
                ["Id", "Email", "AccountId", "CreatedDate"],
                "Email",
                list(first_row),
                order_by=["CreatedDate", "Id"],
            )
        except (AuthenticationError, ConfigurationError):
            raise
        except Exception as exc:
            message, code = _describe(exc)
            for i, email in enumerate(emails):
                if email is not None:
                    errors[i] = (f"contact lookup: {message}", code)
            return contact_ids
        existing: dict[str, list[dict[str, Any]]] = {}
        for record in sorted(found, key=lambda r: (r.get("CreatedDate") or "", r["Id"])):
            if record.get("Email"):
                existing.setdefault(str(record["Email"]).strip().lower(), []).append(record)

        missing = [email for email in first_row if email not in existing]
        payloads = []
        for email in missing:
            i = first_row[email]
            values = self._side_fields(rows[i], self.contact_fields)
            if not values.get("LastName"):
                values["LastName"] = email.split("@", 1)[0]  # LastName is required by Salesforce
            if account_ids[i]:
                values["AccountId"] = account_ids[i]
            payloads.append(values)
        created: dict[str, str] = {}
        failed: dict[str, tuple[str, str]] = {}
        for email, outcome in zip(missing, self._write("create", self.contact, payloads), strict=True):
            if outcome.ok and outcome.id:
                created[email] = outcome.id
            else:
                failed[email] = (f"contact '{email}': {outcome.error or 'not created'}", outcome.code or "UNKNOWN")
        for i, email in enumerate(emails):
            if email is None:
                continue
            if email in failed:
                errors[i] = failed[email]
            elif email in created:
                contact_ids[i] = created[email]
            else:
                candidates = existing[email]
                same_account = [c for c in candidates if account_ids[i] and c.get("AccountId") == account_ids[i]]
                contact_ids[i] = (same_account or candidates)[0]["Id"]
        return contact_ids

    def _ensure_roles(
        self,
        items: list[tuple[int, str | None, str | None, bool | None]],
        errors: list[tuple[str, str] | None],
    ) -> None:
        """The contact as the primary contact role of each opportunity (row, opp id, contact id,
        created). An opportunity that existed already (a rerun) gets one only if it has no primary
        contact yet, so a rerun never adds a second role and never overrides a seller's choice."""
        wanted = [(i, opp, contact) for i, opp, contact, _ in items if opp and contact]
        if not wanted:
            return
        rerun = [opp for i, opp, contact, created in items if opp and contact and not created]
        has_primary: set[str] = set()
        if rerun:
            try:
                roles = self._query_in(
                    ROLE_OBJECT,
                    ["Id", "OpportunityId"],
                    "OpportunityId",
                    rerun,
                    extra=[Condition("IsPrimary", "=", True)],
                )
                has_primary = {str(r["OpportunityId"])[:15] for r in roles}
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception as exc:
                message, code = _describe(exc)
                for i, opp, _contact, created in items:
                    if opp in rerun and not created:
                        errors[i] = (f"contact role lookup: {message}", code)
                rerun_failed = set(rerun)
                wanted = [w for w in wanted if w[1] not in rerun_failed]
        todo = [(i, opp, contact) for i, opp, contact in wanted if str(opp)[:15] not in has_primary]
        for attempt in range(1, ROLE_ATTEMPTS + 1):
            payloads = [{"OpportunityId": opp, "ContactId": contact, "IsPrimary": True} for _, opp, contact in todo]
            failed = []
            for item, outcome in zip(todo, self._write("create", ROLE_OBJECT, payloads), strict=True):
                if outcome.ok:
                    errors[item[0]] = None  # an earlier attempt's error is mended
                else:
                    failed.append(item)
                    errors[item[0]] = (
                        f"primary contact role: {outcome.error or 'not created'}",
                        outcome.code or "UNKNOWN",
                    )
            if not failed or attempt == ROLE_ATTEMPTS:
                return
            # A role that failed is created nowhere else: once the opportunity is linked, the
            # next run does not create it again. So it is tried again now, after looking which
            # ones exist (a create whose answer was lost did create them).
            try:
                roles = self._query_in(
                    ROLE_OBJECT,
                    ["Id", "OpportunityId"],
                    "OpportunityId",
                    [opp for _, opp, _ in failed],
                    extra=[Condition("IsPrimary", "=", True)],
                )
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception:
                log.warning("Salesforce: could not look for the contact roles that failed", exc_info=True)
                return
            landed = {str(r["OpportunityId"])[:15] for r in roles}
            todo = []
            for i, opp, contact in failed:
                if str(opp)[:15] in landed:
                    errors[i] = None
                else:
                    todo.append((i, opp, contact))
            if not todo:
                return

    # -- update ---------------------------------------------------------------------------------
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
        ids = [v for v in (_valid_id(r.crm_id) for r in rows) if v]
        audits, unread = self._read_audit(ids, stamps=stamps)
        for row in rows:
            key = self.id_key(row.crm_id)
            if key in unread:  # never overwrite an audit trail we could not read
                message, code = unread[key]
                row.fail(f"reading {self.audit_field}: {message}", code)
                continue
            row.current = {self.audit_field: audits.get(key)}
            current = stamps.get(key)
            if row.version is not None and current is not None and not _same_stamp(row.version, current):
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

    # -- mark, links ----------------------------------------------------------------------------
    def mark(self, crm_ids: list[str], status: str, ctx: RunContext, *, error: str | None = None) -> None:
        """Set the sync status (``Synced``/``Error``) of ``crm_ids`` in one collections update; with
        ``error``, also prepend an audit line carrying it. A record Salesforce rejects is logged
        (this runs on error paths: it must not hide the error being reported)."""
        ids = list(dict.fromkeys(v for v in (_valid_id(i) for i in crm_ids) if v))
        if not ids or ctx.dry_run:
            return
        records: list[dict[str, Any]] = [{"Id": i, self.status_field: status} for i in ids]
        if error:
            audits, unread = self._read_audit(ids)
            line = audit_line(ctx, "error", {"sync_status": status, "error": _clip(str(error), 1000)})
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
            rid, crm_id = _text(row.get("referral_id")), _text(row.get("crm_id"))
            result = WriteResult(key=crm_id or "", action="update", ok=True, referral_id=rid, crm_id=crm_id)
            results.append(result)
            if crm_id is None or rid is None:
                _fail(result, "a link needs both a CRM id and a referral id", "MISSING_ARGUMENT")
            else:
                pending.append(result)
        if ctx.dry_run or not pending:
            return results
        held: dict[str, str | None] = {}
        audits, unread = self._read_audit([v for v in (_valid_id(r.crm_id) for r in pending) if v], links=held)
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


def _text(value: Any) -> str | None:
    """A frame cell as stripped text, None when missing or empty."""
    return None if missing(value) else (str(value).strip() or None)


def _fail(result: WriteResult, message: str, code: str) -> None:
    result.ok, result.fields = False, {}
    result.error, result.error_code = message, code


__all__ = ["SalesforceSide"]
