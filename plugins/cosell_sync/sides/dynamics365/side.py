"""The Dynamics 365 side: the mapping resolved to this org's choices, and the create/update
steps of :class:`cosell_sync.sides.crm.CrmSide` (upserts on the referral id, conditional
updates re-merged after a 412, won and lost as actions), marks and links.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, SyncMapping
from cosell_sync.engine.normalize import crm_frame
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.batch import MAX_BATCH_REQUESTS, BatchRequest, BatchResponse
from cosell_sync.hooks.dynamics365 import LOST, WON, DynamicsHook, primary_key
from cosell_sync.hooks.odata import eq, with_query
from cosell_sync.sides.base import (
    RunContext,
    WriteResult,
    audit_line,
    fails_the_task,
    missing,
    prepend_audit,
    same_value,
)
from cosell_sync.sides.crm import CrmSide, Pending
from cosell_sync.sides.dynamics365.batch import (
    OUTCOMES,
    DataverseBatches,
    Outcomes,
    etag_or_failure,
    exception_error,
    response_error,
    version_conflict,
)
from cosell_sync.sides.dynamics365.choices import choice_options, resolve_mapping, sync_statuses
from cosell_sync.sides.dynamics365.extract import DynamicsReads
from cosell_sync.sides.dynamics365.lookups import DynamicsLookups
from cosell_sync.sides.dynamics365.values import (
    ACCOUNT,
    ACCOUNT_LOOKUP,
    ACCOUNT_NAME,
    ACCOUNT_POSTAL_CODE,
    CONTACT,
    CONTACT_EMAIL,
    CONTACT_LOOKUP,
    CURRENCY,
    CURRENCY_CODE,
    ID_CHUNK,
    DynamicsValues,
    RowError,
    cell_text,
    is_guid,
)

log = logging.getLogger(__name__)


CLOSE_SUBJECT_MAX = 200  # opportunityclose.subject length


def _unchanged(held: Any, expected: Any) -> bool:
    """Whether a planned field may still be written after a re-read: the CRM holds what the
    plan expected, or holds "no opinion" (KEEP: an open opportunity's stage, a blank ``keep``
    field), which the merge reads as its last synced value, so a new plan would write the same."""
    return (isinstance(held, str) and held == KEEP) or same_value(held, expected)


class DynamicsSide(DynamicsReads, DynamicsValues, DataverseBatches, DynamicsLookups, CrmSide):
    """:class:`~cosell_sync.sides.base.CrmSide` for Dynamics 365 (Dataverse Web API), on the
    shared create/update sequence of :class:`cosell_sync.sides.crm.CrmSide`."""

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

    def upsert_opportunities(self, rows: list[Pending], ctx: RunContext) -> None:
        self._upsert_opportunities([r for r in rows if not r.adopted], ctx, OUTCOMES)

    def after_create(self, rows: list[Pending], ctx: RunContext) -> None:
        """Won and lost, with WinOpportunity/LoseOpportunity (not again on an adopted opportunity
        an earlier try closed already)."""
        for row in rows:
            if row.ok and row.close is not None and (row.current or {}).get("statecode") != row.close:
                self._close(row, ctx, OUTCOMES)

    def prepare_update(self, row: Pending) -> None:
        if not is_guid(row.crm_id):
            raise RowError(f"crm_id: {row.crm_id!r} is not a Dataverse row id (GUID)")
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
            OUTCOMES.fail,
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
            elif version_conflict(resp):
                changed.append(row)
            else:
                row.fail(*response_error(resp))

        self._run_batch(requests, answered, OUTCOMES.fail)
        if changed:
            self._remerge_and_retry(changed, ctx)

    def after_update(self, rows: list[Pending], ctx: RunContext) -> None:
        """Won and lost, with WinOpportunity/LoseOpportunity (not again when already so)."""
        for row in rows:
            if row.ok and row.close is not None and (row.current or {}).get("statecode") != row.close:
                self._close(row, ctx, OUTCOMES)

    def _by_referral(self, rows: Sequence[Pending], on_error: Callable[..., None]) -> dict[str, dict[str, Any]]:
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

    def _upsert_opportunities(self, rows: list[Pending], ctx: RunContext, outcomes: Outcomes) -> None:
        synced = self.sync_status_values["Synced"]
        requests: list[tuple[Pending, BatchRequest]] = []
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
                outcomes.fail(row, *exception_error(exc))
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

        read_back: list[Pending] = []

        def answered(row: Pending, resp: BatchResponse) -> None:
            if not resp.ok:
                outcomes.fail(row, *response_error(resp))
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

    def _close(self, row: Pending, ctx: RunContext, outcomes: Outcomes) -> None:
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
            message, code = exception_error(exc)
            outcomes.fail(row, f"the opportunity was saved, but {action} failed: {message}", code)
            return
        row.etag = None  # the action changed the row's version

    def version(self, record: Mapping[str, Any]) -> str | None:
        """The ``@odata.etag`` an opportunity was extracted with (the ``If-Match`` of its update)."""
        etag = record.get("@odata.etag")
        return None if missing(etag) or not str(etag) else str(etag)

    def _update_request(
        self, row: Pending, ctx: RunContext, old: Mapping[str, Any] | None, etag: str | None
    ) -> BatchRequest | tuple[str, str | None]:
        """The conditional PATCH of ``row.values`` with the audit line prepended to ``old``'s
        audit, or (message, code) when a value cannot be written."""
        try:
            body = self._opportunity_columns(row.values, clear_missing=True)
        except ValueError as exc:
            return str(exc), None
        except Exception as exc:  # e.g. the currency table could not be read
            return exception_error(exc)
        body[self.sync_status_field] = self.sync_status_values["Synced"]
        body[self.audit_field] = prepend_audit(
            old.get(self.audit_field) if old else None, audit_line(ctx, "pc_to_crm", row.values)
        )
        return self._patch(row, body, etag)

    def _remerge_and_retry(self, changed: list[Pending], ctx: RunContext) -> None:
        """The records that answered 412: read them again, keep the planned fields the CRM
        still holds as expected (the others are deferred), and PATCH those once more with the
        new ETag, all in one more ``$batch`` run. ``row.current`` becomes the re-read record."""
        outcomes = OUTCOMES
        log.info("dynamics365 update: %d opportunities changed since they were read; re-merging", len(changed))
        try:
            records = self.extract(crm_ids=[str(r.crm_id) for r in changed])
            normalized = crm_frame(records, self.mapping, self.opportunity_pk)
        except Exception as exc:
            if fails_the_task(exc):
                raise
            message, code = exception_error(exc)
            for row in changed:
                outcomes.fail(row, f"re-reading after 412: {message}", code)
            return
        raw = {str(r.get(self.opportunity_pk)).lower(): r for r in records}
        held = {str(rec["crm_id"]).lower(): rec for rec in normalized.frame.to_dict("records")}
        problems: dict[str, str] = {}
        for err in normalized.errors.to_dict("records"):
            problems.setdefault(str(err["key"]).lower(), f"{err['field']}: {err['message']}")

        retry: list[tuple[Pending, BatchRequest]] = []
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

        def answered(row: Pending, resp: BatchResponse) -> None:
            if resp.ok:
                row.etag = resp.body.get("@odata.etag") if isinstance(resp.body, dict) else None
            elif version_conflict(resp):
                message, code = response_error(resp)
                outcomes.fail(row, f"the opportunity changed again after it was re-read (412 twice): {message}", code)
            else:
                outcomes.fail(row, *response_error(resp))

        self._run_batch(retry, answered, outcomes.fail)

    def _audits(
        self, rows: Sequence[Pending], on_error: Callable[..., None], links: dict[str, Any] | None = None
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

    def mark(self, crm_ids: list[str], status: str, ctx: RunContext, *, error: str | None = None) -> None:
        """Set the sync status (``Synced``/``Pending``/``Error``) and, with ``error``, prepend an
        audit line holding it, in one ``$batch``. Failures are logged, never raised."""
        if status not in self.sync_status_values:
            raise ValueError(f"sync status must be one of {', '.join(self.sync_status_values)}, not {status!r}")
        ids = list(dict.fromkeys(str(i).strip().lower() for i in crm_ids if not missing(i)))
        bad = [i for i in ids if not is_guid(i)]
        if bad:
            log.warning("dynamics365 mark: not opportunity ids (GUIDs), skipped: %s", bad[:10])
        rows = [Pending(n, i, None, i, {}, "update") for n, i in enumerate(ids) if is_guid(i)]
        if ctx.dry_run or not rows:
            return
        outcomes = OUTCOMES
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

            def answered(row: Pending, resp: BatchResponse) -> None:
                if not resp.ok:
                    outcomes.fail(row, *response_error(resp))

            self._run_batch(requests, answered, outcomes.fail)
        except Exception as exc:
            for row in rows:
                outcomes.fail(row, *exception_error(exc))
        problems = [f"{r.key}: {r.error_code or ''} {r.error}" for r in outcomes.finish(rows) if not r.ok]
        if problems:
            log.warning("dynamics365 mark %s: %d of %d failed: %s", status, len(problems), len(rows), problems[:10])

    def write_links(self, links: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """Store the referral id and link, sync status Synced and an audit line on the
        opportunities that referrals were just created for (key = crm_id, action ``update``)."""
        outcomes = OUTCOMES
        every: list[Pending] = []
        rows: list[Pending] = []
        for pos, item in enumerate(links.to_dict("records")):
            crm_id, referral_id = cell_text(item.get("crm_id")), cell_text(item.get("referral_id"))
            values = {self.link_field: referral_id}
            if referral_id:
                values[self.link_url_field] = ctx.referral_link(referral_id)
            row = Pending(pos, crm_id or "", referral_id, crm_id.lower() if crm_id else None, values, "update")
            row.written = dict(values)
            every.append(row)
            if not is_guid(crm_id):
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
            requests: list[tuple[Pending, BatchRequest]] = []
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

            self._run_batch(requests, etag_or_failure(outcomes), outcomes.fail)
        except Exception as exc:
            if fails_the_task(exc):
                raise
            for row in rows:
                outcomes.fail(row, *exception_error(exc))
        return outcomes.finish(every)
