"""The base of every CRM side: :class:`CrmSide`, what a CRM provides to the pipeline (extract,
create, update, version, mark, write_links), and the write sequence each one runs, once:
a CRM overrides small, named steps (``read_opportunities`` for the extract, and these).

**Create** (a new opportunity per referral): :meth:`CrmSide.prepare_create` (convert and
check the row's values) -> :meth:`~CrmSide.find_existing` (an opportunity that already
holds the referral id, made by an earlier try of this task or a run that died before its
commit, is *adopted*: never written over, never duplicated) -> ``ensure_accounts`` (match by
name + postal code, or create) -> ``ensure_contacts`` (match by e-mail, or create) ->
``upsert_opportunities`` (keyed by the referral id, carrying the link, the sync status and
the audit) -> ``after_create`` (the primary contact role, won/lost actions ...).

**Update** (the planned fields of linked opportunities): :meth:`CrmSide.prepare_update`
-> ``read_current`` (the audit trail to prepend to, and the version check: a record changed
since extract is re-merged or deferred) -> ``write_updates`` -> ``after_update``.

Every step gets the rows still pending and fails rows, never the run: a record the CRM
rejects fails alone. An exception out of a step fails the step's rows, unless it is not about
records (authentication, configuration, a bug): then the task fails (:func:`fails_the_task`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, SyncMapping
from cosell_sync.engine.normalize import crm_frame
from cosell_sync.sides.base import Action, RunContext, WriteResult, fails_the_task, missing, plain, same_value

log = logging.getLogger(__name__)

NEW_ID = "(new)"  # a preview's id of an account or contact that would be created
CHANGED_DURING_RUN = "changed_during_run"  # error code of a record deferred because it changed since extract


@dataclass
class Pending:
    """One record being written to the CRM, and what is known about it so far."""

    pos: int
    key: str  # what the result is keyed by: the referral id (creates, updates) or the CRM id
    referral_id: str | None
    crm_id: str | None
    values: dict[str, Any]  # canonical field -> value to write
    action: Action = "create"
    expected: dict[str, Any] = field(default_factory=dict)  # update: what the CRM held when planned
    version: str | None = None  # update: the record's version at extract (ETag, SystemModstamp)
    written: dict[str, Any] = field(default_factory=dict)  # canonical values the result reports
    account_id: str | None = None
    contact_id: str | None = None
    adopted: bool = False  # create: the opportunity existed already (an earlier try made it)
    created: bool | None = None  # create: True when this run's upsert inserted it
    current: dict[str, Any] | None = None  # the record as read just before the write
    close: Any = None  # a won/lost action to carry out after the write (Dynamics)
    etag: str | None = None
    deferred: list[str] = field(default_factory=list)
    deferred_code: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # the CRM's own record to send
    error: tuple[str, str | None] | None = None
    done: bool = False  # nothing more to do (deferred whole, nothing to write)

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, message: str, code: str | None = None) -> None:
        """The first failure sticks."""
        if self.error is None:
            self.error = (message, code)

    def defer(self, names: Sequence[str], code: str = CHANGED_DURING_RUN) -> None:
        """Leave ``names`` unwritten: the CRM changed them since they were read."""
        self.deferred = sorted(set(self.deferred) | set(names))
        self.values = {k: v for k, v in self.values.items() if k not in names}
        self.written = {k: v for k, v in self.written.items() if k not in names}
        self.deferred_code = code
        if not self.values:
            self.done = True

    def result(self) -> WriteResult:
        message, code = self.error or (None, None)
        return WriteResult(
            key=self.key,
            action=self.action,
            ok=self.ok,
            referral_id=self.referral_id,
            crm_id=self.crm_id,
            fields=dict(self.written) if self.ok else {},
            error=message,
            error_code=code if not self.ok else (self.deferred_code if self.deferred else None),
            etag=self.etag if self.ok else None,
            deferred=list(self.deferred) if self.ok else [],
            adopted=self.adopted,
        )


def describe(exc: BaseException, limit: int = 2000) -> tuple[str, str | None]:
    """(message, code) of an exception that failed some records; never a credential (our errors
    carry the service's message and a URL path only)."""
    message = str(exc) or type(exc).__name__
    message = message if len(message) <= limit else message[: limit - 3] + "..."
    code = getattr(exc, "code", None)
    return message, str(code) if code else type(exc).__name__


def text(value: Any) -> str | None:
    """A frame cell as stripped text, None when missing or empty."""
    return None if missing(value) else (str(value).strip() or None)


Step = Callable[[list[Pending], RunContext], None]


@dataclass(frozen=True)
class Selection:
    """Which opportunities an extract reads: those modified in ``(since, until]``, or with
    ``crm_ids`` and/or ``referral_ids``, those (an empty list names none)."""

    since: datetime | None = None
    until: datetime | None = None
    crm_ids: list[str] | None = None
    referral_ids: list[str] | None = None


class CrmSide:
    """What a CRM provides to the pipeline, and the create and update it runs as a fixed
    sequence of overridable steps (as the Singer SDK's streams and sinks do)."""

    crm: str
    mapping: SyncMapping
    id_field: str  # the opportunity's id in an extracted record
    # A preview's (``cosell-sync preview``): not None, the accounts and contacts ``ensure_accounts``
    # and ``ensure_contacts`` would create are appended here ({"object", "key", "values"}) instead of
    # being created, and the rows get a ``NEW_ID`` placeholder; matching (the reads) runs as usual.
    previewed: list[dict[str, Any]] | None = None

    # -- extract --------------------------------------------------------------------------------
    def extract(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        crm_ids: list[str] | None = None,
        referral_ids: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Opportunities as nested records whose paths match the mapping's ``crm`` paths (the
        account and primary contact nested under the names the mapping uses): those modified
        in ``(since, until]`` (every one when neither is given), or, with ``crm_ids`` and/or
        ``referral_ids``, those (the union when both are given; an empty list names none)."""
        return self.read_opportunities(Selection(since, until, crm_ids, referral_ids))

    # -- the sequences ------------------------------------------------------------------------
    def create(self, creates: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """New opportunities from ``creates`` (``referral_id`` + canonical values); one result per
        row, keyed by referral id, whose ``fields`` are the canonical values the opportunity holds
        (those the CRM required and we filled in included)."""
        rows = self.pending_creates(creates, ctx)
        if not ctx.dry_run:
            self.run_steps(
                rows,
                ctx,
                (self.find_existing, self.ensure_accounts, self.ensure_contacts, self.upsert_opportunities),
                "create",
            )
            self.run_steps(rows, ctx, (self.after_create,), "create", include_done=True)
        return self.finish(rows, "create")

    def pending_creates(self, creates: pd.DataFrame, ctx: RunContext) -> list[Pending]:
        """The rows of :meth:`create`, prepared (:meth:`prepare_create`: each one's ``payload``,
        the opportunity's own fields, and ``written``), before any call to the CRM."""
        rows: list[Pending] = []
        names = [n for n in self.mapping.fields if n in creates.columns]
        for pos, item in enumerate(creates.to_dict("records") if len(creates) else []):
            referral_id = text(item.get("referral_id"))
            values = {n: plain(item[n]) for n in names if not missing(item[n]) and plain(item[n]) != KEEP}
            row = Pending(pos, referral_id or "", referral_id, None, values, "create")
            rows.append(row)
            if referral_id is None:
                row.fail("referral_id: missing", "MISSING_REFERRAL_ID")
                continue
            try:
                self.prepare_create(row, ctx)
            except ValueError as exc:
                row.fail(f"referral {referral_id}: {exc}", "INVALID_VALUE")
        return rows

    def update(
        self, updates: pd.DataFrame, ctx: RunContext, versions: Mapping[str, str] | None = None
    ) -> list[WriteResult]:
        """``updates``: ``crm_id``, ``referral_id``, ``fields`` (canonical field -> value) and
        ``expected`` (what the CRM held when planned); ``versions``: CRM id -> its version at
        extract. Only the opportunity's own fields are written (accounts and contacts are
        shared between deals), with the sync status and a new audit line. A record changed
        since extract is re-merged or deferred (:meth:`read_current`, :meth:`write_updates`):
        the fields not written are listed in its result's ``deferred``."""
        rows = self.pending_updates(updates, versions)
        if not ctx.dry_run:
            self.run_steps(rows, ctx, (self.read_current, self.write_updates), "update")
            self.run_steps(rows, ctx, (self.after_update,), "update")
        return self.finish(rows, "update")

    def pending_updates(self, updates: pd.DataFrame, versions: Mapping[str, str] | None = None) -> list[Pending]:
        """The rows of :meth:`update`, prepared (:meth:`prepare_update`), before any call to the CRM."""
        known = {self.id_key(k): str(v) for k, v in (versions or {}).items() if not missing(v) and str(v)}
        rows: list[Pending] = []
        for pos, item in enumerate(updates.to_dict("records") if len(updates) else []):
            referral_id, crm_id = text(item.get("referral_id")), text(item.get("crm_id"))
            fields = item.get("fields") if isinstance(item.get("fields"), Mapping) else {}
            expected = item.get("expected") if isinstance(item.get("expected"), Mapping) else {}
            row = Pending(pos, referral_id or crm_id or "", referral_id, crm_id, {}, "update", dict(expected))
            rows.append(row)
            if crm_id is None:
                row.fail("the row has no CRM id", "MISSING_ARGUMENT")
                continue
            row.version = known.get(self.id_key(crm_id))
            unknown = sorted(set(fields) - set(self.mapping.fields))
            if unknown:
                row.fail(f"{unknown[0]}: not a field of the mapping {self.mapping.source}", "INVALID_FIELD")
                continue
            row.values = {k: plain(v) for k, v in fields.items() if k in self.opportunity_level()}
            try:
                self.prepare_update(row)
            except ValueError as exc:
                row.fail(f"opportunity {crm_id}: {exc}", "INVALID_VALUE")
                continue
            if not row.values:
                row.done = True  # nothing on the opportunity itself: no write
        return rows

    def run_steps(
        self, rows: list[Pending], ctx: RunContext, steps: Sequence[Step], what: str, *, include_done: bool = False
    ) -> None:
        """Each step on the rows still pending; an exception fails the step's rows (or the task,
        when it is not about records)."""
        for step in steps:
            pending = [r for r in rows if r.ok and (include_done or not r.done)]
            if not pending:
                return
            try:
                step(pending, ctx)
            except Exception as exc:
                if fails_the_task(exc):
                    raise
                message, code = describe(exc)
                log.warning(
                    "%s %s: %s failed for %d record(s): %s", self.crm, what, step.__name__, len(pending), message
                )
                for row in pending:
                    row.fail(message, code)

    def finish(self, rows: list[Pending], what: str) -> list[WriteResult]:
        out = [row.result() for row in rows]
        log.info(
            "%s %s: %d ok, %d failed, %d deferred",
            self.crm,
            what,
            sum(r.ok for r in out),
            sum(not r.ok for r in out),
            sum(bool(r.deferred) for r in out),
        )
        return out

    # -- shared steps ---------------------------------------------------------------------------
    def find_existing(self, rows: list[Pending], ctx: RunContext) -> None:
        """Opportunities that already hold the rows' referral ids (an earlier try of this task, or
        a run that died before its commit, created them): adopted, never written over, so a
        seller's edit made since is kept. Their result reports what they hold, with the row's
        values over it: the next run merges from there."""
        records = self.extract(referral_ids=[str(r.referral_id) for r in rows])
        link = self.mapping.records["link_field"]
        held = crm_frame(records, self.mapping, self.id_field).frame
        canonical = {str(rec["crm_id"]): rec for rec in held.to_dict("records")}
        by_referral: dict[str, dict[str, Any]] = {}
        for record in sorted(records, key=lambda r: str(r.get(self.id_field))):
            ref = record.get(link)
            if not missing(ref) and str(ref):
                by_referral.setdefault(str(ref).casefold(), record)
        for row in rows:
            record = by_referral.get(str(row.referral_id).casefold())
            if record is None:
                continue
            row.adopted, row.created, row.current = True, False, record
            row.crm_id = self.normal_id(record.get(self.id_field))
            now = canonical.get(str(record.get(self.id_field))) or {}
            row.written = self.adopted_values(row, now)
            log.info(
                "%s create: referral %s has opportunity %s already: adopted", self.crm, row.referral_id, row.crm_id
            )

    @staticmethod
    def adopted_values(row: Pending, now: Mapping[str, Any]) -> dict[str, Any]:
        """What an adopted opportunity's result reports (the new link's base). A value the CRM
        required and the earlier try filled in: what it holds now. A value it holds as this
        row has it: that value. A value it holds differently (a seller's edit since, or a plan
        that moved): no base (None), so the next run reads both sides as changed and settles
        the field by its authority, as an audited conflict, instead of guessing who changed it."""
        filled_in = [k for k in row.written if k not in row.values]
        out = {k: plain(now.get(k)) for k in filled_in if plain(now.get(k)) not in (None, KEEP)}
        for name, value in row.values.items():
            held = plain(now.get(name))
            out[name] = value if held == KEEP or same_value(held, value) else None
        return out

    # -- what each CRM provides ----------------------------------------------------------------------
    def read_opportunities(self, which: Selection) -> list[dict[str, Any]]:  # pragma: no cover - each CRM
        """The opportunities :meth:`extract` names, nested as it says."""
        raise NotImplementedError

    def version(self, record: Mapping[str, Any]) -> str | None:  # pragma: no cover - each CRM implements it
        """The version of an extracted opportunity that a conditional write checks
        (Dataverse: its ``@odata.etag``; Salesforce: its ``SystemModstamp``)."""
        raise NotImplementedError

    def mark(self, crm_ids: list[str], status: str, ctx: RunContext, *, error: str | None = None) -> None:
        """Set the sync-status field (``Synced``/``Error``), and on error the audit field."""
        raise NotImplementedError  # pragma: no cover - each CRM implements it

    def write_links(self, links: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """``links``: ``crm_id``, ``referral_id``: store the referral id and link on opportunities
        that Partner Center referrals were just created for."""
        raise NotImplementedError  # pragma: no cover - each CRM implements it

    def opportunity_level(self) -> set[str]:
        """Canonical fields stored on the opportunity itself (the ones an update writes)."""
        raise NotImplementedError

    def id_key(self, crm_id: Any) -> str:
        """How CRM ids compare (Salesforce: the case-sensitive 15-character form; Dataverse: GUID text)."""
        return str(crm_id)

    def normal_id(self, crm_id: Any) -> str | None:
        return None if missing(crm_id) else str(crm_id)

    def prepare_create(self, row: Pending, ctx: RunContext) -> None:
        """Convert and check ``row.values`` (ValueError names the field); set ``row.written``."""
        row.written = dict(row.values)

    def prepare_update(self, row: Pending) -> None:
        """Convert and check ``row.values`` for an update (ValueError names the field)."""
        row.written = dict(row.values)

    def ensure_accounts(self, rows: list[Pending], ctx: RunContext) -> None:
        """Set ``row.account_id``: matched by name + postal code, or created."""

    def ensure_contacts(self, rows: list[Pending], ctx: RunContext) -> None:
        """Set ``row.contact_id``: matched by e-mail, or created."""

    def upsert_opportunities(self, rows: list[Pending], ctx: RunContext) -> None:
        """Write the new opportunities (adopted ones are left alone); set ``row.crm_id``."""
        raise NotImplementedError

    def after_create(self, rows: list[Pending], ctx: RunContext) -> None:
        """Anything after the opportunities exist (contact roles, won/lost actions)."""

    def read_current(self, rows: list[Pending], ctx: RunContext) -> None:
        """Read what the write needs (the audit trail) and check versions: defer what changed."""

    def write_updates(self, rows: list[Pending], ctx: RunContext) -> None:
        raise NotImplementedError

    def after_update(self, rows: list[Pending], ctx: RunContext) -> None:
        """Anything after the updates (won/lost actions)."""


__all__ = ["CHANGED_DURING_RUN", "CrmSide", "Pending", "Selection", "describe", "text"]
