"""The Dynamics 365 (Dataverse) side of the sync: extract opportunities, and load creates,
updates, sync-status marks and links back through :class:`~cosell_sync.hooks.dynamics.DynamicsHook`.

What goes where is read from the mapping (``engine/mappings/dynamics365.yaml``): a ``crm``
path without a dot is an opportunity column; ``account.<column>`` and ``contact.<column>``
are columns of the opportunity's ``parentaccountid`` and ``parentcontactid`` rows;
``transactioncurrency.isocurrencycode`` is the opportunity's currency (bound through
``transactioncurrencyid``). The field mapped to ``records.closed_field`` (``statecode``) is
the stage: it is never written, won and lost are carried out with the ``WinOpportunity`` /
``LoseOpportunity`` actions, as Dataverse requires.

Writes go through ``$batch`` (at most 1,000 requests per call, ``continue-on-error``), so
every record gets its own outcome: a record Dataverse rejects becomes a failed
:class:`~cosell_sync.sides.base.WriteResult` carrying Dataverse's hex error code and message,
and never stops the others. The create and update sequences are those of
:class:`cosell_sync.sides.crm.CrmWorkflow`: an opportunity that already holds the referral id
(an earlier try made it) is adopted, never written over, and new opportunities are
alternate-key upserts on the referral id (``PATCH opportunities(cosell_referralid='...')``),
so an HTTP retry cannot create a second one.

Updates are conditional: each PATCH carries the ``@odata.etag`` the opportunity was extracted
with as ``If-Match``. A 412 (a seller edited it during the run) re-reads the record, keeps the
planned fields the CRM still holds as planned, defers the others (not written, planned again
next run) and retries once with the new ETag; a second 412 fails the record.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, MappingError, SyncMapping, choice_columns, resolve_choices
from cosell_sync.engine.normalize import as_boolean, crm_frame, side_value
from cosell_sync.errors import ApiError, ConfigurationError, ThrottledError, TransportError
from cosell_sync.hooks._batch import MAX_BATCH_REQUESTS, BatchRequest, BatchResponse
from cosell_sync.hooks._odata import eq, quote, with_query
from cosell_sync.hooks.dynamics import GUID, LOST, WON, DynamicsHook, primary_key
from cosell_sync.sides.base import (
    RunContext,
    WriteResult,
    audit_line,
    fails_the_task,
    match_key,
    missing,
    plain,
    prepend_audit,
    same_value,
)
from cosell_sync.sides.crm import CrmWorkflow, Pending

log = logging.getLogger(__name__)

ID_CHUNK = 50  # values per "$filter=x eq a or x eq b ..." read (keeps the URL short)
# cosell_syncstatus choice values (Synced, Pending, Error)
SYNC_STATUSES = ("Synced", "Pending", "Error")  # the sync status column's option labels
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
LAST_NAME_MAX = 50  # contact.lastname length; the e-mail's local part is cut to fit
CLOSE_SUBJECT_MAX = 200  # opportunityclose.subject length
PRECONDITION_FAILED = 412
DUPLICATE_RECORD = "0x80040237"  # also a 412, but about alternate keys, not versions
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_INTEGER = re.compile(r"-?\d+")


class _RowError(ValueError):
    """A record cannot be written as it is (the message names the field)."""


def _email_key(value: Any) -> str | None:
    if missing(value) or not str(value).strip():
        return None
    return str(value).strip().lower()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(GUID.fullmatch(value))


def _text(value: Any) -> str | None:
    return None if missing(value) or value == "" else str(value)


def _error_of(resp: BatchResponse) -> tuple[str, str | None]:
    message = resp.error_message or (resp.body if isinstance(resp.body, str) and resp.body else None)
    return str(message or f"HTTP {resp.status}"), resp.error_code


def _etag_or_failure(outcomes: Any) -> Callable[[_Row, BatchResponse], None]:
    """The batch callback of a PATCH: keep the new ETag, or record the part's error."""

    def answered(row: _Row, resp: BatchResponse) -> None:
        if resp.ok:
            row.etag = resp.body.get("@odata.etag") if isinstance(resp.body, dict) else None
        else:
            outcomes.fail(row, *_error_of(resp))

    return answered


def _version_conflict(resp: BatchResponse) -> bool:
    """A 412 that means "the row changed since its ETag was read" (not DuplicateRecord)."""
    return resp.status == PRECONDITION_FAILED and resp.error_code != DUPLICATE_RECORD


def _unchanged(held: Any, expected: Any) -> bool:
    """Whether a planned field may still be written after a re-read: the CRM holds what the
    plan expected, or holds "no opinion" (KEEP: an open opportunity's stage, a blank ``keep``
    field), which the merge reads as its last synced value, so a new plan would write the same."""
    return (isinstance(held, str) and held == KEEP) or same_value(held, expected)


def _exception_error(exc: BaseException) -> tuple[str, str | None]:
    code = getattr(exc, "code", None)
    return str(exc) or type(exc).__name__, str(code) if code else None


def _unencodable_body(request: BatchRequest) -> str | None:
    """Why a request's body cannot be sent as standard JSON (naming its fields), or None."""
    if request.body is None:
        return None
    try:
        json.dumps(request.body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fields = []
        for key, value in request.body.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                fields.append(str(key))
        return f"{type(exc).__name__}: {exc} (fields: {', '.join(fields)})"
    return None


def _may_split_batch(exc: BaseException, *, creates: bool) -> bool:
    """Whether a ``$batch`` call that failed as a whole is retried in halves: on a 4xx for the
    call (nothing was written); without creates (PATCH is idempotent) also on a 500. Never on
    throttling, an unavailable service (502, 503, 504) or a lost connection."""
    if isinstance(exc, ThrottledError):
        return False
    status = getattr(exc, "status", None)
    if isinstance(exc, ApiError) and status is not None and 400 <= status < 500:
        return status not in (401, 403)  # a refused token or privilege: halves would be refused too
    if creates:
        return False  # the answer may have been lost after Dataverse created the rows
    if isinstance(exc, TransportError):
        return False  # the hook retried it already: a failing network, not a record
    return isinstance(exc, ApiError) and status is not None and status >= 500 and status not in (502, 503, 504)


_Row = Pending  # one record being written (cosell_sync.sides.crm)


class _Outcomes:
    """Failures go onto the rows themselves; the first failure of a row sticks."""

    def fail(self, row: Pending, message: str, code: str | None = None) -> None:
        row.fail(message, code)

    def failed(self, row: Pending) -> bool:
        return not row.ok

    def finish(self, rows: Iterable[Pending]) -> list[WriteResult]:
        return [row.result() for row in rows]


_OUTCOMES = _Outcomes()


def choice_options(hook: DynamicsHook, mapping: SyncMapping) -> dict[str, dict[str, int]]:
    """The org's options (label -> value), from the opportunity table's metadata, of the choice
    columns the mapping names by label and of the sync status column (its statuses are labels)."""
    columns = {*choice_columns(mapping, labelled_only=True), mapping.records["sync_status_field"]}
    return hook.choice_options(mapping.records["opportunity"], sorted(columns))


def resolve_mapping(mapping: SyncMapping, options: Mapping[str, Mapping[str, int]]) -> SyncMapping:
    """``mapping`` in this org's choice values; a label (or a pinned value) the org does not have is
    a :class:`ConfigurationError` naming the file, the field and the value, listing the labels."""
    try:
        return resolve_choices(mapping, options, where="this Dataverse org")
    except MappingError as exc:
        raise ConfigurationError(str(exc)) from None


def sync_statuses(mapping: SyncMapping, options: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The sync status column's value for each status (Synced, Pending, Error), by its label."""
    column = mapping.records["sync_status_field"]
    labels = {label.casefold(): value for label, value in (options.get(column) or {}).items()}
    missing = [status for status in SYNC_STATUSES if status.casefold() not in labels]
    if missing:
        raise ConfigurationError(
            f"mapping {mapping.source}: records.sync_status_field: the choice column {column} of this Dataverse org "
            f"has no option labelled {', '.join(repr(m) for m in missing)}; its options: "
            f"{', '.join(repr(label) for label in options.get(column) or {}) or 'none'}"
        )
    return {status: int(labels[status.casefold()]) for status in SYNC_STATUSES}


def check_choices(hook: DynamicsHook, mapping: SyncMapping) -> dict[str, dict[str, int]]:
    """At the start of a run: every choice value of a column the mapping names by label (pinned
    integers beside them too) is one the org has, and so are the sync statuses. Returns those
    columns' options, for the run's other tasks to build their side with, without reading the
    metadata again (``DynamicsSide(hook, mapping, choices=...)``)."""
    options = choice_options(hook, mapping)
    resolve_mapping(mapping, options)
    sync_statuses(mapping, options)
    return options


class DynamicsSide(CrmWorkflow):
    """:class:`~cosell_sync.sides.base.CrmSide` for Dynamics 365 (Dataverse Web API), on the
    shared create/update sequence of :class:`cosell_sync.sides.crm.CrmWorkflow`."""

    crm = "dynamics365"
    id_field = "opportunityid"
    id_chunk = ID_CHUNK
    batch_size = MAX_BATCH_REQUESTS

    def __init__(
        self, hook: DynamicsHook, mapping: SyncMapping, choices: Mapping[str, Mapping[str, int]] | None = None
    ) -> None:
        """``choices``: the org's options as :func:`check_choices` read them at the start of the run;
        without them they are read from the metadata now."""
        if mapping.crm != self.crm:
            raise ConfigurationError(f"mapping {mapping.source}: crm is '{mapping.crm}', expected '{self.crm}'")
        self.hook = hook
        if choices is None:
            choices = choice_options(hook, mapping)
        mapping = resolve_mapping(mapping, choices)  # choices named by label: this org's values
        self.sync_status_values = sync_statuses(mapping, choices)
        self.mapping = mapping
        r = mapping.records
        self.opportunity_set, self.account_set, self.contact_set = r["opportunity"], r["account"], r["contact"]
        self.opportunity_pk = primary_key(self.opportunity_set)
        self.account_pk = primary_key(self.account_set)
        self.contact_pk = primary_key(self.contact_set)
        self.link_field = r["link_field"]
        self.link_url_field = r["link_url_field"]
        self.sync_flag_field = r["sync_flag_field"]
        self.audit_field = r["audit_field"]
        self.sync_status_field = r["sync_status_field"]
        self.modified_field = r["modified_field"]
        self.closed_field = r["closed_field"]

        self.opportunity_fields: dict[str, FieldMapping] = {}  # canonical -> field, crm path = a column
        self.account_fields: dict[str, str] = {}  # canonical -> account column
        self.contact_fields: dict[str, str] = {}  # canonical -> contact column
        self.stage_field: FieldMapping | None = None
        self.currency_field: FieldMapping | None = None
        for fm in mapping.fields.values():
            prefix, dot, column = fm.crm.partition(".")
            if not dot:
                if fm.crm == self.closed_field:
                    self.stage_field = fm
                else:
                    self.opportunity_fields[fm.name] = fm
                continue
            if "." in column or not column:
                raise self._unsupported(fm)
            if prefix == ACCOUNT:
                self.account_fields[fm.name] = column
            elif prefix == CONTACT:
                self.contact_fields[fm.name] = column
            elif prefix == CURRENCY and column == CURRENCY_CODE:
                self.currency_field = fm
            else:
                raise self._unsupported(fm)
        self._account_name = next((n for n, c in self.account_fields.items() if c == ACCOUNT_NAME), None)
        self._account_postal = next((n for n, c in self.account_fields.items() if c == ACCOUNT_POSTAL_CODE), None)
        self._contact_email = next((n for n, c in self.contact_fields.items() if c == CONTACT_EMAIL), None)
        self._currencies: dict[str, dict[str, Any]] | None = None  # transactioncurrencyid -> row

    def _unsupported(self, fm: FieldMapping) -> ConfigurationError:
        return ConfigurationError(
            f"mapping {self.mapping.source}: fields.{fm.name}.crm: '{fm.crm}' is not supported for Dynamics 365 "
            "(use an opportunity column, account.<column>, contact.<column> or transactioncurrency.isocurrencycode)"
        )

    # -- extract ------------------------------------------------------------------------------------
    def opportunity_select(self) -> list[str]:
        """The opportunity columns an extract reads."""
        columns = [
            self.opportunity_pk,
            *(fm.crm for fm in self.opportunity_fields.values()),
            self.closed_field,
            "statecode",
            "statuscode",
            self.modified_field,
            "modifiedon",
            f"_{ACCOUNT_LOOKUP}_value",
            f"_{CONTACT_LOOKUP}_value",
            f"_{CURRENCY_LOOKUP}_value",
            self.link_field,
            self.link_url_field,
            self.sync_flag_field,
            self.sync_status_field,
            self.audit_field,
        ]
        return list(dict.fromkeys(columns))

    def extract(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        crm_ids: list[str] | None = None,
        referral_ids: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Opportunities modified in ``(since, until]`` (every one when neither is given), or,
        with ``crm_ids`` and/or ``referral_ids``, those opportunities (an empty list names none),
        each with its ``account``, ``contact`` and ``transactioncurrency`` nested."""
        filters: list[str | None]
        if crm_ids is None and referral_ids is None:
            filters = [None]
        else:
            clauses: list[str] = []
            for crm_id in dict.fromkeys(str(i).strip() for i in crm_ids or [] if not missing(i)):
                if _is_guid(crm_id):
                    clauses.append(eq(self.opportunity_pk, uuid.UUID(crm_id)))
                else:
                    log.warning("dynamics365 extract: %r is not an opportunity id (GUID); skipped", crm_id)
            for referral_id in dict.fromkeys(str(i) for i in referral_ids or [] if not missing(i) and str(i)):
                clauses.append(eq(self.link_field, referral_id))
            filters = [" or ".join(chunk) for chunk in _chunks(clauses, self.id_chunk)]
        rows: dict[str, dict[str, Any]] = {}
        select = self.opportunity_select()
        for flt in filters:
            for row in self.hook.read_modified_since(
                self.opportunity_set, since, select=select, extra_filter=flt, until=until
            ):
                rows.setdefault(str(row[self.opportunity_pk]).lower(), row)
        records = sorted(rows.values(), key=lambda r: (str(r.get("modifiedon") or ""), str(r[self.opportunity_pk])))
        self._nest(records)
        log.info("dynamics365 extract: %d opportunities", len(records))
        return records

    def _nest(self, records: list[dict[str, Any]]) -> None:
        account_ref, contact_ref, currency_ref = (
            f"_{ACCOUNT_LOOKUP}_value",
            f"_{CONTACT_LOOKUP}_value",
            f"_{CURRENCY_LOOKUP}_value",
        )
        accounts = self._read_by_ids(
            self.account_set,
            self.account_pk,
            [r[account_ref] for r in records if r.get(account_ref)],
            [self.account_pk, *dict.fromkeys(self.account_fields.values())],
        )
        contacts = self._read_by_ids(
            self.contact_set,
            self.contact_pk,
            [r[contact_ref] for r in records if r.get(contact_ref)],
            [self.contact_pk, *dict.fromkeys(self.contact_fields.values())],
        )
        currencies = self._currency_rows([r[currency_ref] for r in records if r.get(currency_ref)])
        for record in records:
            account_id, contact_id, currency_id = (record.get(k) for k in (account_ref, contact_ref, currency_ref))
            record[ACCOUNT] = accounts.get(str(account_id).lower()) if account_id else None
            record[CONTACT] = contacts.get(str(contact_id).lower()) if contact_id else None
            currency = currencies.get(str(currency_id).lower()) if currency_id else None
            record[CURRENCY] = {CURRENCY_CODE: currency.get(CURRENCY_CODE)} if currency else None

    def _read_by_ids(
        self, entity_set: str, pk: str, ids: Iterable[str], select: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """Rows by primary key, ``id eq a or id eq b ...`` in chunks; keyed by the lowercase id."""
        wanted = list(dict.fromkeys(str(i).lower() for i in ids if _is_guid(str(i))))
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(wanted, self.id_chunk):
            flt = " or ".join(eq(pk, uuid.UUID(i)) for i in chunk)
            for row in self.hook.query(entity_set, select=list(select), filter=flt):
                out[str(row[pk]).lower()] = row
        return out

    def _currency_rows(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The currency table, read once (again only if an opportunity names an unknown currency)."""
        wanted = {str(i).lower() for i in ids}
        if not wanted:
            return self._currencies or {}
        if self._currencies is None or not wanted <= set(self._currencies):
            select = ["transactioncurrencyid", CURRENCY_CODE]
            self._currencies = {
                str(row["transactioncurrencyid"]).lower(): row
                for row in self.hook.query("transactioncurrencies", select=select)
            }
        return self._currencies

    # -- value conversion ---------------------------------------------------------------------------
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
                raise _RowError(f"{fm.name}: {canonical!r} has no Dynamics 365 value for {fm.crm} (known: {known})")
            return int(raw) if _INTEGER.fullmatch(raw) else raw
        if fm.type == "boolean":  # a Yes/No (Two Options) column takes JSON true/false
            flag = as_boolean(canonical)
            if flag is None:
                raise _RowError(f"{fm.name}: {canonical!r} is not true or false")
            return flag
        if fm.type == "decimal":
            if isinstance(canonical, bool):
                raise _RowError(f"{fm.name}: {canonical!r} is not a number")
            try:
                number = float(canonical)
            except (TypeError, ValueError):
                raise _RowError(f"{fm.name}: {canonical!r} is not a number") from None
            if not math.isfinite(number):
                raise _RowError(f"{fm.name}: {canonical!r} is not a finite number")
            return int(number) if isinstance(canonical, int) else number
        if fm.type == "date":
            if isinstance(canonical, str) and _ISO_DATE.fullmatch(canonical.strip()):
                return canonical.strip()
            try:
                return pd.to_datetime(canonical, utc=True, format="ISO8601").strftime("%Y-%m-%d")
            except (TypeError, ValueError):
                raise _RowError(f"{fm.name}: {canonical!r} is not an ISO 8601 date") from None
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
            raise _RowError(f"{self.stage_field.name}: {canonical!r} has no Dynamics 365 value (known: {known})")
        state = int(raw) if _INTEGER.fullmatch(raw) else None
        return state if state in (WON, LOST) else None

    def _currency_bind(self, code: Any) -> str:
        try:
            currency_id = self.hook.currency_id(str(code))
        except LookupError as exc:
            name = self.currency_field.name if self.currency_field else "currency"
            raise _RowError(f"{name}: {exc.args[0] if exc.args else exc}") from None
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

    # -- batches and reads, chunk by chunk ------------------------------------------------------------
    def _run_batch(
        self,
        items: Sequence[tuple[_Row, BatchRequest]],
        on_response: Callable[[_Row, BatchResponse], None],
        on_error: Callable[[_Row, str, str | None], None],
    ) -> None:
        """``$batch`` calls of at most ``batch_size`` requests with continue-on-error.

        A request whose body cannot be sent as standard JSON (``Infinity``) fails its record
        before any call. A call that fails as a whole is retried in halves until the requests
        that fail it are isolated (each record then fails with the call's error); the others
        are written. Creates (POST) are split only when the error proves nothing was written
        (a 4xx for the call): after a lost answer they may have been. Throttling and an
        unavailable service are not about the records: not split. At most about 2·n calls.

        The chunks go out concurrently (the hook's :meth:`~DynamicsHook.map_concurrently`: as many
        at once as the org's ``x-ms-dop-hint`` says, at most 52), each split on its own; the
        callbacks are called afterwards, on this thread, in the requests' order. An error that
        fails the task is raised once every chunk has ended and the others' outcomes are told."""
        sendable: list[tuple[_Row, BatchRequest]] = []
        for row, request in items:
            problem = _unencodable_body(request)
            if problem is None:
                sendable.append((row, request))
            else:
                on_error(row, problem, "JSON_SERIALIZATION")

        def send(
            chunk: Sequence[tuple[_Row, BatchRequest]],
        ) -> tuple[list[Callable[[], None]], list[int], Exception | None]:
            told: list[Callable[[], None]] = []  # the chunk's outcomes, told on the caller's thread
            counted = [0, 0]
            try:
                self._batch_split(
                    chunk,
                    lambda row, response: told.append(lambda: on_response(row, response)),
                    lambda row, message, code: told.append(lambda: on_error(row, message, code)),
                    counted,
                )
            except Exception as exc:  # fails the task (see _batch_split): raised after the others
                return told, counted, exc
            return told, counted, None

        calls = [0, 0]  # calls made, calls that failed as a whole
        failure: Exception | None = None
        for told, counted, exc in self.hook.map_concurrently(send, list(_chunks(sendable, self.batch_size))):
            for tell in told:
                tell()
            calls = [calls[0] + counted[0], calls[1] + counted[1]]
            failure = failure or exc
        if failure is not None:
            raise failure
        if calls[1]:
            log.warning(
                "dynamics365: %d $batch call(s) failed as a whole; split retries: %d call(s) in all for %d request(s)",
                calls[1], calls[0], len(sendable),
            )  # fmt: skip

    def _batch_split(
        self,
        chunk: Sequence[tuple[_Row, BatchRequest]],
        on_response: Callable[[_Row, BatchResponse], None],
        on_error: Callable[[_Row, str, str | None], None],
        calls: list[int],
    ) -> None:
        """One ``$batch`` call for ``chunk``, halved while it fails as a whole (see :meth:`_run_batch`)."""
        calls[0] += 1
        try:
            responses = self.hook.batch([request for _, request in chunk], continue_on_error=True)
        except Exception as exc:  # the whole call failed
            if fails_the_task(exc):
                raise  # not about these records (a refused token, a setting, a bug)
            calls[1] += 1
            creates = any(request.method.upper() == "POST" for _, request in chunk)
            if len(chunk) > 1 and _may_split_batch(exc, creates=creates):
                log.warning("dynamics365: a $batch of %d requests failed (%s); retrying in halves", len(chunk), exc)
                half = len(chunk) // 2
                self._batch_split(chunk[:half], on_response, on_error, calls)
                self._batch_split(chunk[half:], on_response, on_error, calls)
                return
            log.warning("dynamics365: a $batch of %d requests failed: %s", len(chunk), exc)
            message, code = _exception_error(exc)
            for row, _ in chunk:
                on_error(row, message, code)
            return
        for n, (row, _) in enumerate(chunk):
            if n < len(responses):
                on_response(row, responses[n])
            else:
                on_error(row, "Dataverse returned no response for this request in the $batch", None)

    def _read_chunked(
        self,
        rows: Sequence[_Row],
        value: Callable[[_Row], str],
        clause: Callable[[str], str],
        select: Sequence[str],
        on_error: Callable[[_Row, str, str | None], None],
    ) -> list[dict[str, Any]]:
        """Opportunities matching ``clause(value(row))`` for the rows, in chunks; a chunk whose
        read fails fails its records."""
        found: list[dict[str, Any]] = []
        by_value: dict[str, list[_Row]] = {}
        for row in rows:
            by_value.setdefault(value(row), []).append(row)
        for chunk in _chunks(list(by_value), self.id_chunk):
            flt = " or ".join(clause(v) for v in chunk)
            try:
                found += list(self.hook.query(self.opportunity_set, select=list(select), filter=flt))
            except Exception as exc:
                if fails_the_task(exc):
                    raise
                message, code = _exception_error(exc)
                for v in chunk:
                    for row in by_value[v]:
                        on_error(row, message, code)
        return found

    # -- create -------------------------------------------------------------------------------------
    # -- the workflow's steps (cosell_sync.sides.crm) ------------------------------------------------
    def opportunity_level(self) -> set[str]:
        return {n for n in self.mapping.fields if n not in self.account_fields and n not in self.contact_fields}

    def id_key(self, crm_id: Any) -> str:
        return str(crm_id).strip().lower()

    def normal_id(self, crm_id: Any) -> str | None:
        return None if missing(crm_id) else str(crm_id).lower()

    def prepare_create(self, row: Pending, ctx: RunContext) -> None:
        """A stage of won/lost is carried out after the upsert (``row.close``)."""
        row.close = self._stage_action(row.values.get(self.stage_field.name)) if self.stage_field else None
        row.written = dict(row.values)

    def ensure_accounts(self, rows: list[Pending], ctx: RunContext) -> None:
        self._ensure_accounts(rows, ctx, _OUTCOMES)

    def ensure_contacts(self, rows: list[Pending], ctx: RunContext) -> None:
        self._ensure_contacts(rows, ctx, _OUTCOMES)

    def upsert_opportunities(self, rows: list[Pending], ctx: RunContext) -> None:
        self._upsert_opportunities([r for r in rows if not r.adopted], ctx, _OUTCOMES)

    def after_create(self, rows: list[Pending], ctx: RunContext) -> None:
        """Won and lost, with WinOpportunity/LoseOpportunity (not again on an adopted opportunity
        an earlier try closed already)."""
        for row in rows:
            if row.ok and row.close is not None and (row.current or {}).get("statecode") != row.close:
                self._close(row, ctx, _OUTCOMES)

    def prepare_update(self, row: Pending) -> None:
        if not _is_guid(row.crm_id):
            raise _RowError(f"crm_id: {row.crm_id!r} is not a Dataverse row id (GUID)")
        row.crm_id = str(row.crm_id).lower()
        row.close = self._stage_action(row.values.get(self.stage_field.name)) if self.stage_field else None
        row.action = "win" if row.close == WON else "lose" if row.close == LOST else "update"
        row.written = dict(row.values)

    def read_current(self, rows: list[Pending], ctx: RunContext) -> None:
        """The audit trail (to prepend to) and state of each opportunity about to be updated."""
        current = self._read_chunked(
            rows,
            lambda r: str(r.crm_id),
            lambda v: eq(self.opportunity_pk, uuid.UUID(v)),
            [self.opportunity_pk, self.audit_field, "statecode"],
            _OUTCOMES.fail,
        )
        before = {str(r[self.opportunity_pk]).lower(): r for r in current}
        for row in rows:
            row.current = before.get(str(row.crm_id))

    def write_updates(self, rows: list[Pending], ctx: RunContext) -> None:
        """Conditional PATCHes in ``$batch``: ``If-Match`` is the ETag the opportunity was
        extracted with (``*`` only when none is known). A record answering 412 changed since it
        was read: all such records are read again and re-merged against ``expected`` (planned
        fields the CRM still holds as expected are written, in one more ``$batch`` with the new
        ETag; the others are deferred); a second 412, or a failed re-read, fails it."""
        requests: list[tuple[Pending, BatchRequest]] = []
        for row in rows:
            request = self._update_request(row, ctx, row.current, row.version)
            if isinstance(request, BatchRequest):
                requests.append((row, request))
            else:
                row.fail(*request)
        changed: list[Pending] = []

        def answered(row: Pending, resp: BatchResponse) -> None:
            if resp.ok:
                row.etag = resp.body.get("@odata.etag") if isinstance(resp.body, dict) else None
            elif _version_conflict(resp):
                changed.append(row)
            else:
                row.fail(*_error_of(resp))

        self._run_batch(requests, answered, _OUTCOMES.fail)
        if changed:
            self._remerge_and_retry(changed, ctx)

    def after_update(self, rows: list[Pending], ctx: RunContext) -> None:
        """Won and lost, with WinOpportunity/LoseOpportunity (not again when already so)."""
        for row in rows:
            if row.ok and row.close is not None and (row.current or {}).get("statecode") != row.close:
                self._close(row, ctx, _OUTCOMES)

    def _ensure_accounts(self, rows: list[_Row], ctx: RunContext, outcomes: _Outcomes) -> None:
        """Match each row's account by name + postal code (case- and space-insensitive), or create it."""
        if self._account_name is None:
            return
        need: dict[str, list[_Row]] = {}
        for row in rows:
            name = row.values.get(self._account_name)
            if missing(name) or not str(name).strip():
                continue
            postal = row.values.get(self._account_postal) if self._account_postal else None
            need.setdefault(match_key(name, postal), []).append(row)
        if not need:
            return
        found = self._find_accounts({key: str(group[0].values[self._account_name]) for key, group in need.items()})
        label = {key: f"account '{group[0].values[self._account_name]}'" for key, group in need.items()}
        creating: list[tuple[_Row, BatchRequest]] = []
        key_of: dict[int, str] = {}  # position of the group's first row -> match key
        for key, group in need.items():
            if key in found:
                continue
            try:
                body = self._nested_body(group[0].values, self.account_fields)
            except ValueError as exc:
                for row in group:
                    outcomes.fail(row, f"{label[key]}: {exc}")
                continue
            body[self.account_pk] = str(uuid.uuid4())  # known up front: a retry cannot duplicate it
            creating.append((group[0], BatchRequest("POST", self.account_set, body)))
            key_of[group[0].pos] = key

        self._create_grouped(creating, key_of, need, found, self.account_pk, label.__getitem__, outcomes)
        log.info("dynamics365 create: %d accounts matched, %d to create", len(need) - len(creating), len(creating))
        for key, group in need.items():
            for row in group:
                row.account_id = found.get(key)

    def _create_grouped(
        self,
        creating: list[tuple[_Row, BatchRequest]],
        key_of: Mapping[int, str],
        need: Mapping[str, list[_Row]],
        found: dict[str, str],
        pk: str,
        describe: Callable[[str], str],
        outcomes: _Outcomes,
    ) -> None:
        """POST one new record per group (accounts by match key, contacts by e-mail) in
        ``$batch``: its id goes to ``found[key]`` (the id we generated when the answer has
        none), or every row of the group fails with the part's error.

        Each create names the id generated for it, so the hook sends the call again after a
        lost answer; a create that landed on the earlier send is then refused as DuplicateRecord.
        Such a record is read back by its id: found, it is the one we created."""
        request_of = {row.pos: request for row, request in creating}
        duplicate: list[tuple[_Row, str]] = []

        def failed(first: _Row, message: str, code: str | None = None) -> None:
            key = key_of[first.pos]
            for row in need[key]:
                outcomes.fail(row, f"{describe(key)}: {message}", code)

        def answered(first: _Row, resp: BatchResponse) -> None:
            generated = (request_of[first.pos].body or {}).get(pk)
            if resp.ok:
                found[key_of[first.pos]] = resp.entity_id or str(generated)
            elif resp.error_code == DUPLICATE_RECORD and generated:
                duplicate.append((first, str(generated).lower()))
            else:
                failed(first, *_error_of(resp))

        self._run_batch(creating, answered, failed)
        if duplicate:
            self._landed(duplicate, request_of, pk, found, key_of, failed)

    def _landed(
        self,
        duplicate: list[tuple[_Row, str]],
        request_of: Mapping[int, BatchRequest],
        pk: str,
        found: dict[str, str],
        key_of: Mapping[int, str],
        failed: Callable[..., None],
    ) -> None:
        """Creates refused as DuplicateRecord: those whose generated id exists were ours (an
        earlier send of the call landed); the others fail with the refusal."""
        entity_set = request_of[duplicate[0][0].pos].url
        ids = [row_id for _, row_id in duplicate]
        exists: set[str] = set()
        try:
            for chunk in _chunks(ids, self.id_chunk):
                flt = " or ".join(eq(pk, uuid.UUID(i)) for i in chunk)
                exists |= {str(r[pk]).lower() for r in self.hook.query(entity_set, select=[pk], filter=flt)}
        except Exception as exc:
            if fails_the_task(exc):
                raise
            message, code = _exception_error(exc)
            for first, _ in duplicate:
                failed(first, f"reading back a create refused as a duplicate: {message}", code)
            return
        for first, row_id in duplicate:
            if row_id in exists:
                found[key_of[first.pos]] = row_id
            else:
                failed(first, "A record with matching key values already exists.", DUPLICATE_RECORD)

    def _nested_body(self, values: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
        """An account or contact row from canonical values (missing values left out)."""
        body: dict[str, Any] = {}
        for name, column in columns.items():
            value = self.column_value(self.mapping.fields[name], values.get(name))
            if value is not None:
                body[column] = value
        return body

    def _find_accounts(self, wanted: Mapping[str, str]) -> dict[str, str]:
        """Existing accounts for match keys. Candidates are the accounts whose name starts with
        the name's first word (so a different spacing or case still finds them); they are
        compared on the match key. Active accounts win, then the oldest."""
        prefixes = sorted({name.split()[0] for name in wanted.values() if name.split()})
        select = [self.account_pk, ACCOUNT_NAME, "statecode", "createdon"]
        if self._account_postal:
            select.append(ACCOUNT_POSTAL_CODE)
        candidates: dict[str, list[dict[str, Any]]] = {}
        for chunk in _chunks(prefixes, self.id_chunk):
            flt = " or ".join(f"startswith({ACCOUNT_NAME},{quote(prefix)})" for prefix in chunk)
            for row in self.hook.query(self.account_set, select=select, filter=flt):
                postal = row.get(ACCOUNT_POSTAL_CODE) if self._account_postal else None
                key = match_key(row.get(ACCOUNT_NAME), postal)
                if key in wanted:
                    candidates.setdefault(key, []).append(row)
        return {key: str(_preferred(rows)[self.account_pk]).lower() for key, rows in candidates.items()}

    def _ensure_contacts(self, rows: list[_Row], ctx: RunContext, outcomes: _Outcomes) -> None:
        """Match each row's contact by e-mail (case-insensitive), or create it under the row's account."""
        if self._contact_email is None:
            return
        need: dict[str, list[_Row]] = {}
        for row in rows:
            email = _email_key(row.values.get(self._contact_email))
            if email:
                need.setdefault(email, []).append(row)
        if not need:
            return
        select = [self.contact_pk, CONTACT_EMAIL, "statecode", "createdon"]
        candidates: dict[str, list[dict[str, Any]]] = {}
        for chunk in _chunks(list(need), self.id_chunk):
            flt = " or ".join(eq(CONTACT_EMAIL, email) for email in chunk)
            for row in self.hook.query(self.contact_set, select=select, filter=flt):
                email = _email_key(row.get(CONTACT_EMAIL))
                if email in need:
                    candidates.setdefault(email, []).append(row)
        found = {email: str(_preferred(rows)[self.contact_pk]).lower() for email, rows in candidates.items()}
        creating: list[tuple[_Row, BatchRequest]] = []
        email_of: dict[int, str] = {}
        for email, group in need.items():
            if email in found:
                continue
            first = group[0]
            try:
                body = self._nested_body(first.values, self.contact_fields)
            except ValueError as exc:
                for row in group:
                    outcomes.fail(row, f"contact '{email}': {exc}")
                continue
            body.setdefault(CONTACT_EMAIL, email)
            if not body.get(CONTACT_LAST_NAME):  # required: fall back to the e-mail's local part
                body[CONTACT_LAST_NAME] = (email.partition("@")[0] or email)[:LAST_NAME_MAX]
            if first.account_id:
                body[f"{CONTACT_ACCOUNT_LOOKUP}@odata.bind"] = DynamicsHook.bind(self.account_set, first.account_id)
            body[self.contact_pk] = str(uuid.uuid4())
            creating.append((first, BatchRequest("POST", self.contact_set, body)))
            email_of[first.pos] = email

        self._create_grouped(
            creating, email_of, need, found, self.contact_pk, lambda email: f"contact '{email}'", outcomes
        )
        for email, group in need.items():
            for row in group:
                row.contact_id = found.get(email)

    def _by_referral(self, rows: Sequence[_Row], on_error: Callable[..., None]) -> dict[str, dict[str, Any]]:
        """Opportunities holding the rows' referral ids, keyed by the folded id (the key is
        case-insensitive in Dataverse)."""
        found = self._read_chunked(
            rows,
            lambda r: str(r.referral_id),
            lambda v: eq(self.link_field, v),
            [self.opportunity_pk, self.link_field, self.audit_field, "statecode"],
            on_error,
        )
        return {str(r[self.link_field]).casefold(): r for r in found if r.get(self.link_field)}

    def _upsert_opportunities(self, rows: list[_Row], ctx: RunContext, outcomes: _Outcomes) -> None:
        synced = self.sync_status_values["Synced"]
        requests: list[tuple[_Row, BatchRequest]] = []
        for row in rows:
            if outcomes.failed(row):
                continue
            referral_id = str(row.referral_id)
            try:
                body = self._opportunity_columns(row.values, clear_missing=False)
            except ValueError as exc:
                outcomes.fail(row, str(exc))
                continue
            except Exception as exc:  # e.g. the currency table could not be read
                outcomes.fail(row, *_exception_error(exc))
                continue
            if row.account_id:
                body[f"{ACCOUNT_LOOKUP}@odata.bind"] = DynamicsHook.bind(self.account_set, row.account_id)
            if row.contact_id:
                body[f"{CONTACT_LOOKUP}@odata.bind"] = DynamicsHook.bind(self.contact_set, row.contact_id)
            body[self.link_url_field] = ctx.referral_link(referral_id)
            body[self.sync_status_field] = synced
            body[self.audit_field] = audit_line(ctx, "pc_to_crm", row.values)
            url = with_query(
                DynamicsHook.alternate_key(self.opportunity_set, **{self.link_field: referral_id}),
                {"$select": self.opportunity_pk},
            )
            requests.append((row, BatchRequest("PATCH", url, body, headers={"Prefer": "return=representation"})))

        read_back: list[_Row] = []

        def answered(row: _Row, resp: BatchResponse) -> None:
            if not resp.ok:
                outcomes.fail(row, *_error_of(resp))
                return
            body = resp.body if isinstance(resp.body, dict) else {}
            crm_id = body.get(self.opportunity_pk) or resp.entity_id or row.crm_id
            row.crm_id = str(crm_id).lower() if crm_id else None
            row.etag = body.get("@odata.etag")
            if row.crm_id is None:
                read_back.append(row)

        self._run_batch(requests, answered, outcomes.fail)
        if read_back:  # a 204 without a row id in OData-EntityId: read the id back by the alternate key
            again = self._by_referral(read_back, outcomes.fail)
            for row in read_back:
                found = again.get(str(row.referral_id).casefold())
                if found:
                    row.crm_id = str(found[self.opportunity_pk]).lower()
                else:
                    outcomes.fail(row, "the opportunity was written but could not be read back by its referral id")

    def _close(self, row: _Row, ctx: RunContext, outcomes: _Outcomes) -> None:
        """WinOpportunity (Status 3, Won) or LoseOpportunity (Status 4, Canceled) after the write."""
        won = row.close == WON
        action = "WinOpportunity" if won else "LoseOpportunity"
        about = f"referral {row.referral_id}, " if row.referral_id else ""
        subject = f"{'Won' if won else 'Lost'} in Partner Center ({about}run {ctx.run_id})"[:CLOSE_SUBJECT_MAX]
        try:
            if won:
                self.hook.win_opportunity(str(row.crm_id), subject, status=3)
            else:
                self.hook.lose_opportunity(str(row.crm_id), subject, status=4)
        except Exception as exc:
            message, code = _exception_error(exc)
            outcomes.fail(row, f"the opportunity was saved, but {action} failed: {message}", code)
            return
        row.etag = None  # the action changed the row's version

    # -- update -------------------------------------------------------------------------------------
    def version(self, record: Mapping[str, Any]) -> str | None:
        """The ``@odata.etag`` an opportunity was extracted with (the ``If-Match`` of its update)."""
        etag = record.get("@odata.etag")
        return None if missing(etag) or not str(etag) else str(etag)

    def _update_request(
        self, row: _Row, ctx: RunContext, old: Mapping[str, Any] | None, etag: str | None
    ) -> BatchRequest | tuple[str, str | None]:
        """The conditional PATCH of ``row.values`` with the audit line prepended to ``old``'s
        audit, or (message, code) when a value cannot be written."""
        try:
            body = self._opportunity_columns(row.values, clear_missing=True)
        except ValueError as exc:
            return str(exc), None
        except Exception as exc:  # e.g. the currency table could not be read
            return _exception_error(exc)
        body[self.sync_status_field] = self.sync_status_values["Synced"]
        body[self.audit_field] = prepend_audit(
            old.get(self.audit_field) if old else None, audit_line(ctx, "pc_to_crm", row.values)
        )
        return self._patch(row, body, etag)

    def _remerge_and_retry(self, changed: list[Pending], ctx: RunContext) -> None:
        """The records that answered 412: read them again, keep the planned fields the CRM
        still holds as expected (the others are deferred), and PATCH those once more with the
        new ETag, all in one more ``$batch`` run. ``row.current`` becomes the re-read record."""
        outcomes = _OUTCOMES
        log.info("dynamics365 update: %d opportunities changed since they were read; re-merging", len(changed))
        try:
            records = self.extract(crm_ids=[str(r.crm_id) for r in changed])
            normalized = crm_frame(records, self.mapping, self.opportunity_pk)
        except Exception as exc:
            if fails_the_task(exc):
                raise
            message, code = _exception_error(exc)
            for row in changed:
                outcomes.fail(row, f"re-reading after 412: {message}", code)
            return
        raw = {str(r.get(self.opportunity_pk)).lower(): r for r in records}
        held = {str(rec["crm_id"]).lower(): rec for rec in normalized.frame.to_dict("records")}
        problems: dict[str, str] = {}
        for err in normalized.errors.to_dict("records"):
            problems.setdefault(str(err["key"]).lower(), f"{err['field']}: {err['message']}")

        retry: list[tuple[_Row, BatchRequest]] = []
        for row in changed:
            crm_id = str(row.crm_id)
            record, now = raw.get(crm_id), held.get(crm_id)
            if record is None:
                outcomes.fail(row, "re-reading after 412: the opportunity no longer exists")
                continue
            if now is None:
                outcomes.fail(row, f"re-reading after 412: {problems.get(crm_id, 'the opportunity cannot be read')}")
                continue
            expected = row.expected
            keep = {k: v for k, v in row.values.items() if k in expected and _unchanged(now.get(k), expected[k])}
            row.defer([k for k in row.values if k not in keep])
            row.close = self._stage_action(keep.get(self.stage_field.name)) if self.stage_field else None
            if row.close is None and row.action in ("win", "lose"):
                row.action = "update"
            row.current = record
            if row.deferred:
                log.info("dynamics365 update: %s changed during the run; deferred: %s", crm_id, row.deferred)
            if not keep:
                continue  # nothing left to write: the deferred fields are planned again next run
            etag = self.version(record)
            if etag is None:
                outcomes.fail(row, "re-reading after 412: the opportunity came back without an ETag")
                continue
            request = self._update_request(row, ctx, record, etag)
            if isinstance(request, BatchRequest):
                retry.append((row, request))
            else:
                outcomes.fail(row, *request)

        def answered(row: _Row, resp: BatchResponse) -> None:
            if resp.ok:
                row.etag = resp.body.get("@odata.etag") if isinstance(resp.body, dict) else None
            elif _version_conflict(resp):
                message, code = _error_of(resp)
                outcomes.fail(row, f"the opportunity changed again after it was re-read (412 twice): {message}", code)
            else:
                outcomes.fail(row, *_error_of(resp))

        self._run_batch(retry, answered, outcomes.fail)

    def _patch(self, row: _Row, body: dict[str, Any], etag: str | None = None) -> BatchRequest:
        """An update-only PATCH answering the new ETag: ``If-Match`` is the row's ETag as read
        (412 when it changed since), or ``*`` without one (404 rather than a new row)."""
        url = with_query(DynamicsHook.row(self.opportunity_set, str(row.crm_id)), {"$select": self.opportunity_pk})
        return BatchRequest("PATCH", url, body, headers={"If-Match": etag or "*", "Prefer": "return=representation"})

    def _audits(
        self, rows: Sequence[_Row], on_error: Callable[..., None], links: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The audit trail of each row's opportunity (and into ``links``, the referral id it holds)."""
        current = self._read_chunked(
            rows,
            lambda r: str(r.crm_id),
            lambda v: eq(self.opportunity_pk, uuid.UUID(v)),
            [self.opportunity_pk, self.audit_field, *([self.link_field] if links is not None else [])],
            on_error,
        )
        if links is not None:
            links.update({str(r[self.opportunity_pk]).lower(): r.get(self.link_field) for r in current})
        return {str(r[self.opportunity_pk]).lower(): r.get(self.audit_field) for r in current}

    # -- mark and links ---------------------------------------------------------------------------
    def mark(self, crm_ids: list[str], status: str, ctx: RunContext, *, error: str | None = None) -> None:
        """Set the sync status (``Synced``/``Pending``/``Error``) and, with ``error``, prepend an
        audit line holding it, in one ``$batch``. Failures are logged, never raised."""
        if status not in self.sync_status_values:
            raise ValueError(f"sync status must be one of {', '.join(self.sync_status_values)}, not {status!r}")
        ids = list(dict.fromkeys(str(i).strip().lower() for i in crm_ids if not missing(i)))
        bad = [i for i in ids if not _is_guid(i)]
        if bad:
            log.warning("dynamics365 mark: not opportunity ids (GUIDs), skipped: %s", bad[:10])
        rows = [Pending(n, i, None, i, {}, "update") for n, i in enumerate(ids) if _is_guid(i)]
        if ctx.dry_run or not rows:
            return
        outcomes = _OUTCOMES
        try:
            audits = self._audits(rows, outcomes.fail) if error else {}
            requests = []
            for row in rows:
                if outcomes.failed(row):
                    continue
                body: dict[str, Any] = {self.sync_status_field: self.sync_status_values[status]}
                if error:
                    line = audit_line(ctx, "error", {"sync_status": status, "error": error})
                    body[self.audit_field] = prepend_audit(audits.get(str(row.crm_id)), line)
                url = DynamicsHook.row(self.opportunity_set, str(row.crm_id))
                requests.append((row, BatchRequest("PATCH", url, body, headers={"If-Match": "*"})))

            def answered(row: _Row, resp: BatchResponse) -> None:
                if not resp.ok:
                    outcomes.fail(row, *_error_of(resp))

            self._run_batch(requests, answered, outcomes.fail)
        except Exception as exc:
            for row in rows:
                outcomes.fail(row, *_exception_error(exc))
        problems = [f"{r.key}: {r.error_code or ''} {r.error}" for r in outcomes.finish(rows) if not r.ok]
        if problems:
            log.warning("dynamics365 mark %s: %d of %d failed: %s", status, len(problems), len(rows), problems[:10])

    def write_links(self, links: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """Store the referral id and link, sync status Synced and an audit line on the
        opportunities that referrals were just created for (key = crm_id, action ``update``)."""
        outcomes = _OUTCOMES
        every: list[Pending] = []
        rows: list[Pending] = []
        for pos, item in enumerate(links.to_dict("records")):
            crm_id, referral_id = _text(item.get("crm_id")), _text(item.get("referral_id"))
            values = {self.link_field: referral_id}
            if referral_id:
                values[self.link_url_field] = ctx.referral_link(referral_id)
            row = Pending(pos, crm_id or "", referral_id, crm_id.lower() if crm_id else None, values, "update")
            row.written = dict(values)
            every.append(row)
            if not _is_guid(crm_id):
                outcomes.fail(row, f"crm_id: {crm_id!r} is not a Dataverse row id (GUID)")
            elif not referral_id:
                outcomes.fail(row, "referral_id: missing")
            else:
                rows.append(row)
        if ctx.dry_run or not rows:
            return outcomes.finish(every)
        try:
            held: dict[str, Any] = {}
            audits = self._audits(rows, outcomes.fail, held)
            requests: list[tuple[_Row, BatchRequest]] = []
            for row in rows:
                if outcomes.failed(row):
                    continue
                if str(held.get(str(row.crm_id)) or "").casefold() == str(row.referral_id).casefold():
                    row.adopted = True  # an earlier try of the task wrote it already: no second audit line
                    continue
                line = audit_line(ctx, "crm_to_pc", {"referral_id": row.referral_id})
                body = {
                    **row.values,
                    self.sync_status_field: self.sync_status_values["Synced"],
                    self.audit_field: prepend_audit(audits.get(str(row.crm_id)), line),
                }
                requests.append((row, self._patch(row, body)))

            self._run_batch(requests, _etag_or_failure(outcomes), outcomes.fail)
        except Exception as exc:
            if fails_the_task(exc):
                raise
            for row in rows:
                outcomes.fail(row, *_exception_error(exc))
        return outcomes.finish(every)


def _preferred(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of several matching accounts or contacts: active ones first, then the oldest."""
    return min(rows, key=lambda r: (r.get("statecode") or 0, str(r.get("createdon") or "")))
