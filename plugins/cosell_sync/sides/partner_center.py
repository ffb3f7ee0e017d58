"""The Partner Center side of a sync: extract referrals, create referrals from CRM
opportunities, and update referrals with JSON Patch.

Partner Center has no batch API, so writes run on a small thread pool (bounded
concurrency). Every update carries ``If-Match`` with the ETag the referral was read
with; on 412 the referral is read again, the planned change is re-merged against what
it holds now (a field someone else changed meanwhile is left for the next run), and
the write is retried once.

Creates are idempotent across Airflow task retries, cleared tasks and runs that died
before their commit: before any ``POST``, the referrals already holding the opportunities'
ids in ``externalReferenceId`` are looked up (one list query per
:data:`LOOKUP_CHUNK` ids), and a referral found is adopted (linked) instead of created
again. Every failure about one record (a lookup, a create, a 412 re-read, a 404, a
rejected value) is that record's failed :class:`WriteResult`, bound for the dead letter;
only authentication and configuration errors (and bugs) fail the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, SyncMapping
from cosell_sync.engine.normalize import compile_path, referrals_frame, side_value
from cosell_sync.errors import (
    ApiError,
    ConfigurationError,
    CosellError,
    NotFoundError,
    PreconditionFailedError,
    ValidationError,
)
from cosell_sync.hooks.odata import datetime_literal, quote
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.hooks.pool import map_on_threads
from cosell_sync.sides.base import RunContext, WriteResult, fails_the_task
from cosell_sync.sides.solutions import with_solution_details

log = logging.getLogger(__name__)

# Partner Center writes run on this many threads: it has no batch API and documents no number of
# requests in flight, so concurrency is bounded (``[cosell] partner_center_max_workers``, at most
# MAX_WORKERS_CAP, the connections the hooks keep per host: hooks/pool.py) and a 429 backs off
# (the hook's Retrier waits Retry-After).
MAX_WORKERS = 32
MAX_WORKERS_CAP = 64
# Ids per "$filter=x eq a or x eq b ..." lookup: the filter travels in the URL. /work/shared/API-NOTES.md
# ("Partner Center Referrals API") documents no URL or query length limit; 20 GUID clauses are ~1.4 KB
# encoded, 50 would be ~3.4 KB, above IIS's default maxQueryString (2,048 bytes): kept at 20.
LOOKUP_CHUNK = 20
# Co-sell with Microsoft is two referrals in one engagement: the partner's Shared referral (target
# its SolutionProfile), then one targeting Microsoft's business profile location "msft"
# (API-NOTES, "Related values"; Microsoft Learn, "Create a referral", "Create a shared referral").
MICROSOFT = {"type": "BusinessProfileLocation", "id": "msft"}
NO_HELP = (None, "", "Unknown")  # "How can Microsoft help?" not answered
# What the request to Microsoft carries over from the partner's referral.
REQUEST_KEYS = ("name", "qualification", "customerProfile", "consent", "details", "inviteContext", "team")


# Mapping paths under this key are read from the referral's engagement, not the referral itself:
# ``_engagement.microsoft`` is Microsoft's side of a co-sell engagement (status, substatus, team).
ENGAGEMENT = "_engagement."


def max_workers_setting() -> int:
    """``[cosell] partner_center_max_workers``: threads writing to Partner Center (default
    :data:`MAX_WORKERS`, 1 to :data:`MAX_WORKERS_CAP`); outside Airflow, the default."""
    try:
        from airflow.sdk import conf
    except ImportError:  # pragma: no cover - Airflow is a dependency
        return MAX_WORKERS
    raw = str(conf.get("cosell", "partner_center_max_workers", fallback=str(MAX_WORKERS))).strip()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS_CAP:
        raise ConfigurationError(
            f"[cosell] partner_center_max_workers must be a whole number from 1 to {MAX_WORKERS_CAP}, got {raw!r}"
        )
    return value


def microsoft_side(doc: Mapping[str, Any]) -> bool:
    """The engagement's request to Microsoft (or Microsoft's own referral): part of a co-sell
    engagement, never a deal of its own to sync with the CRM."""
    targets = doc.get("target") or []
    to_microsoft = any(
        isinstance(t, Mapping) and t.get("type") == MICROSOFT["type"] and t.get("id") == MICROSOFT["id"]
        for t in targets
    )
    return to_microsoft or doc.get("organizationId") == MICROSOFT["id"]


def _microsoft_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a referral's ``_engagement.microsoft`` holds of Microsoft's side of its engagement."""
    return {k: doc.get(k) for k in ("id", "status", "substatus", "team", "updatedDateTime")}


def wants_microsoft(doc: Mapping[str, Any]) -> bool:
    """A Shared referral asking for Microsoft's help (and not a private deal): co-sell."""
    help_code = (doc.get("inviteContext") or {}).get("assistanceRequestCode")
    consent = (doc.get("consent") or {}).get("consentToShareReferralWithMicrosoftSellers")
    return doc.get("type") == "Shared" and help_code not in NO_HELP and consent is not False


def _failed(result: WriteResult, exc: CosellError, prefix: str = "") -> WriteResult:
    """``result`` as this record's failure (the task fails instead when ``exc`` is not about the record)."""
    if fails_the_task(exc):
        raise exc
    result.ok, result.error = False, f"{prefix}{exc}"
    result.error_code = getattr(exc, "code", None) or type(exc).__name__
    return result


def _pointer(path: str) -> list[str]:
    """``customerProfile.team[0].email`` -> ["customerProfile", "team", "email"] (indexes dropped)."""
    return [part.split("[")[0] for part in path.split(".")]


def _value_for_referral(fm: FieldMapping, canonical: Any, held: Any = None) -> Any:
    value = side_value(fm, "referral", canonical, held)
    if value is None:
        return None
    if fm.type == "date":
        return f"{value}T00:00:00Z"
    if fm.type == "decimal":
        return float(value)
    if fm.type == "id_list":
        return [{"id": item} for item in str(value).split(";") if item]
    return value


def referral_assignments(fm: FieldMapping, canonical: Any, held: Any = None) -> list[tuple[list[str], Any]]:
    """(JSON path parts, value) pairs that set one canonical field on a referral that holds
    ``held`` (its side value, e.g. ``New/Pending``) now: a loss on a New referral is written
    as Closed/Declined, on an Active one as Closed/Lost (the mapping's ``write_from``)."""
    value = _value_for_referral(fm, canonical, held)
    if "/" in fm.referral:  # a composite such as status/substatus
        parts = fm.referral.split("/")
        values = str(value).split("/") if value is not None else [None] * len(parts)
        return [(_pointer(p), v) for p, v in zip(parts, values, strict=True)]
    if fm.type == "id_list":  # details.requirements.solutions[].id: the whole list is replaced
        return [(_pointer(fm.referral)[:-1] if fm.referral.endswith("[].id") else _pointer(fm.referral), value or [])]
    return [(_pointer(fm.referral), value)]


def _set(doc: dict[str, Any], path: list[str], value: Any) -> None:
    cur = doc
    for key in path[:-1]:
        nxt = cur.get(key)
        if not isinstance(nxt, dict):
            nxt = cur[key] = {}
        cur = nxt
    cur[path[-1]] = value


def patch_operations(current: Mapping[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """One JSON Patch operation setting ``path`` to ``value`` on ``current``: ``replace`` when the
    member exists, otherwise ``add`` at the first missing level (with the rest nested in)."""
    cur: Any = current
    for depth, key in enumerate(path):
        if not isinstance(cur, Mapping) or key not in cur or (cur.get(key) is None and depth < len(path) - 1):
            nested: Any = value
            for inner in reversed(path[depth + 1 :]):
                nested = {inner: nested}
            return {"op": "add", "path": "/" + "/".join(path[: depth + 1]), "value": nested}
        cur = cur[key]
    return {"op": "replace", "path": "/" + "/".join(path), "value": value}


class PartnerCenterSide:
    """Extract and load for Partner Center, through :class:`PartnerCenterHook`."""

    def __init__(self, hook: PartnerCenterHook, mapping: SyncMapping, *, max_workers: int | None = None) -> None:
        self.hook = hook
        self.mapping = mapping
        self.max_workers = max_workers if max_workers is not None else max_workers_setting()
        self.duplicates: dict[str, list[str]] = {}

    def _parallel(self, items: Sequence[Any], work: Callable[[Any], WriteResult]) -> list[WriteResult]:
        if not items:
            return []
        return map_on_threads(work, items, self.max_workers)

    # -- extract ------------------------------------------------------------------------------
    def extract(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        referral_ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Referrals updated in (since, until], or the named ones, or all (the initial load)."""
        if referral_ids is not None:
            ids = list(dict.fromkeys(referral_ids))
            found = map_on_threads(self._get_or_none, ids, self.max_workers)
            return self.with_engagements([doc for doc in found if doc is not None and not microsoft_side(doc)])
        clauses = []
        if since is not None:
            clauses.append(f"updatedDateTime gt {datetime_literal(since)}")
        if until is not None:
            clauses.append(f"updatedDateTime le {datetime_literal(until)}")
        docs = list(self.hook.list_referrals(filter=" and ".join(clauses) or None, orderby="updatedDateTime asc"))
        # Microsoft's side of an engagement is a referral of its own, listed with the partner's
        # (the list is what a referral's links.relatedReferrals filters by engagementId): when it
        # changes, its updatedDateTime moves, not the partner referral's. The engagements it
        # changed in are read, so their partner referrals are synced with the new values.
        sides = [d for d in docs if microsoft_side(d)]
        moved = {str(d["engagementId"]) for d in sides if d.get("engagementId")}
        partner = [doc for doc in docs if not microsoft_side(doc)]
        if since is None and until is None:
            # A full read lists every referral, Microsoft's sides and all their partner referrals
            # included: the engagements are in the list, no query needed.
            return self.with_engagements(partner, known=sides, complete=True)
        return self.with_engagements(partner, changed=moved, known=sides)

    def with_engagements(
        self,
        docs: list[dict[str, Any]],
        changed: set[str] | None = None,
        *,
        known: Sequence[Mapping[str, Any]] = (),
        complete: bool = False,
    ) -> list[dict[str, Any]]:
        """The referrals, each Shared one holding its engagement's Microsoft side under
        ``_engagement.microsoft`` (status, substatus, team) when the mapping reads it.
        ``known``: Microsoft-side referrals read already (with ``docs``, in the same list): their
        engagements are not queried again. Every other Shared engagement is read with one list
        query per :data:`LOOKUP_CHUNK` engagements. ``changed``: engagements whose Microsoft side
        changed: their partner referrals not among ``docs`` are added (from the same queries).
        ``complete``: ``docs`` and ``known`` are every referral there is (a full read): no query."""
        if not any(fm.referral.startswith(ENGAGEMENT) for fm in self.mapping.fields.values()):
            return docs
        shared = {str(d["engagementId"]) for d in docs if d.get("type") == "Shared" and d.get("engagementId")}
        have = {str(d.get("id")) for d in docs}
        microsoft: dict[str, dict[str, Any]] = {}
        for side in known:  # in list order (updatedDateTime asc): the latest one of an engagement wins
            if side.get("engagementId"):
                microsoft[str(side["engagementId"])] = _microsoft_summary(side)
        added: dict[str, dict[str, Any]] = {}
        changed = set(changed or ()) if not complete else set()
        ids = [] if complete else sorted((shared - set(microsoft)) | changed)
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[start : start + LOOKUP_CHUNK]
            flt = " or ".join(f"engagementId eq {quote(e)}" for e in chunk)
            for other in self.hook.list_referrals(filter=flt):
                if microsoft_side(other) and other.get("engagementId"):
                    microsoft[str(other["engagementId"])] = _microsoft_summary(other)
                elif other.get("id") and str(other["id"]) not in have and str(other.get("engagementId")) in changed:
                    added.setdefault(str(other["id"]), other)
        if added:
            log.info("%d referral(s) whose engagement Microsoft changed, read with it", len(added))
        docs = [*docs, *added.values()]
        for doc in docs:
            found = microsoft.get(str(doc.get("engagementId")))
            if found is not None:
                doc["_engagement"] = {"microsoft": found}
        return docs

    def _get_or_none(self, referral_id: str) -> dict[str, Any] | None:
        try:
            return self.hook.get_referral(referral_id)
        except NotFoundError:
            return None

    # -- create -----------------------------------------------------------------------------------
    def referral_document(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A new outgoing referral for a CRM opportunity (canonical row with ``crm_id``)."""
        doc: dict[str, Any] = {"externalReferenceId": str(row["crm_id"]), "qualification": "SalesQualified"}
        for fm in self.mapping.fields.values():
            if row.get(fm.name) is None or fm.referral.startswith(ENGAGEMENT):
                continue
            for path, value in referral_assignments(fm, row[fm.name]):
                value = with_solution_details(path, value)  # solutions: configured details, or id alone
                if value is None:
                    continue
                if "team" in path and path[-1] != "team":  # customerProfile.team[0].x -> the first member
                    team = doc.setdefault("customerProfile", {}).setdefault("team", [{}])
                    team[0][path[-1]] = value
                else:
                    _set(doc, path, value)
        if not doc.get("status"):
            doc["status"], doc["substatus"] = "New", "Pending"
        help_code = row.get("help_code")
        solutions = [s for s in str(row.get("solutions") or "").split(";") if s]
        # Co-sell with Microsoft is asked for by setting "How can Microsoft help?"; a private deal
        # (not shared with Microsoft sellers: the mapping's share_with_microsoft) never is.
        private = (doc.get("consent") or {}).get("consentToShareReferralWithMicrosoftSellers") is False
        if help_code not in NO_HELP and help_code != KEEP and solutions and not private:
            doc["type"] = "Shared"
            doc["target"] = [{"type": "SolutionProfile", "id": solutions[0]}]
        else:
            doc["type"] = "Independent"
        return doc

    def _canonical(self, docs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """What referrals hold, through the mapping, in one pass: key -> canonical fields
        (a document that does not parse is left out)."""
        if not docs:
            return {}
        frame = referrals_frame([{**doc, "id": key} for key, doc in docs.items()], self.mapping).frame
        names = [n for n in frame.columns if n in self.mapping.fields]
        return {
            str(k): dict(zip(names, v, strict=True))
            for k, v in zip(frame["referral_id"], frame[names].itertuples(index=False), strict=True)
        }

    def existing_referrals(self, crm_ids: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, ApiError]]:
        """The referrals already created for these CRM ids (``externalReferenceId``), and the
        ids whose lookup failed, with its error. Of several referrals for one id, the oldest is
        returned; the others are listed in :attr:`duplicates` (CRM id -> their referral ids)."""
        found: dict[str, dict[str, Any]] = {}
        self.duplicates: dict[str, list[str]] = {}
        failed: dict[str, ApiError] = {}
        ids = list(dict.fromkeys(str(c) for c in crm_ids if c))

        def find(chunk: list[str]) -> list[dict[str, Any]]:
            try:
                return self.hook.find_by_external_references(chunk)
            except ValidationError:
                if len(chunk) == 1:
                    raise
                # A service that refuses "or" in $filter: one query per id instead.
                return [d for one in chunk for d in self.hook.find_by_external_references([one])]

        def lookup(chunk: list[str]) -> list[dict[str, Any]] | ApiError:
            try:
                docs = find(chunk)
            except ApiError as exc:  # handed back: the caller fails the chunk's records, or the task
                return exc
            return [d for d in docs if not microsoft_side(d)]

        # The lookups are independent: sent concurrently (each one a 50 ms round trip or more, a
        # hundred of them before a large first sync's creates), their answers taken in chunk order.
        chunks = [ids[start : start + LOOKUP_CHUNK] for start in range(0, len(ids), LOOKUP_CHUNK)]
        for chunk, answer in zip(chunks, map_on_threads(lookup, chunks, self.max_workers), strict=True):
            if isinstance(answer, ApiError):
                if fails_the_task(answer):
                    raise answer
                failed.update(dict.fromkeys(chunk, answer))
                continue
            for doc in sorted(answer, key=lambda d: (str(d.get("createdDateTime") or ""), str(d.get("id")))):
                ext = str(doc.get("externalReferenceId") or "")
                if ext in chunk and doc.get("id"):
                    kept = found.setdefault(ext, doc)
                    if kept is not doc and str(doc["id"]) not in self.duplicates.get(ext, []):
                        self.duplicates.setdefault(ext, []).append(str(doc["id"]))
        return found, failed

    def create(self, creates: pd.DataFrame, ctx: RunContext) -> list[WriteResult]:
        """One referral per row (a CRM opportunity, ``crm_id`` + canonical values), unless one
        already holds the opportunity's id in ``externalReferenceId`` (created by an earlier try
        of this task, or by a run that never committed): that one is adopted, not created again."""
        rows = creates.astype(object).where(creates.notna(), None).to_dict("records")
        existing: dict[str, dict[str, Any]] = {}
        unknown: dict[str, ApiError] = {}
        if rows and not ctx.dry_run:
            existing, unknown = self.existing_referrals([str(r["crm_id"]) for r in rows])
            if existing:
                log.info("%d of %d referral(s) to create exist already: adopted", len(existing), len(rows))

        # What each new referral will hold, read back through the mapping (the link's first base),
        # and what each adopted one holds: one pass each, not one frame per row.
        docs = {str(r["crm_id"]): self.referral_document(r) for r in rows}
        planned = self._canonical(docs)
        held = self._canonical(existing)

        def work(row: dict[str, Any]) -> WriteResult:
            crm_id = str(row["crm_id"])
            doc = docs[crm_id]
            fields = planned.get(crm_id) or {k: v for k, v in row.items() if k in self.mapping.fields and v is not None}
            result = WriteResult(crm_id, "create", True, crm_id=crm_id, fields=fields)
            if ctx.dry_run:
                return result
            if crm_id in unknown:  # never POST blind: a referral may exist already
                return _failed(result, unknown[crm_id], "looking up an existing referral: ")
            found = existing.get(crm_id)
            fresh = found is None  # POSTed by this call: its engagement is new, Microsoft not asked in it
            if found is None:
                try:
                    found = self.hook.create_referral(doc)
                except CosellError as exc:
                    return _failed(result, exc)
            else:
                result.fields = held.get(crm_id) or fields
                result.adopted = True
                result.duplicates = list(self.duplicates.get(crm_id, []))
                if result.duplicates:
                    log.warning(
                        "opportunity %s has %d more referral(s): %s", crm_id, len(result.duplicates), result.duplicates
                    )
            result.referral_id, result.etag = str(found["id"]), found.get("eTag")
            if wants_microsoft(found):
                try:
                    request, result.asked_microsoft = self.engage_microsoft(found, fresh=fresh)
                except CosellError as exc:
                    # The referral exists: the next run adopts it (externalReferenceId) and asks again.
                    return _failed(result, exc, "asking Microsoft to co-sell: ")
                # The link's first base holds Microsoft's side as it is now (requested), so the next
                # run writes it to the CRM only once Microsoft acts.
                # (read through the mapping in one pass after the pool: see below)
                source = doc if not result.adopted else existing[crm_id]
                engaged[crm_id] = {**source, "_engagement": {"microsoft": _microsoft_summary(request)}}
            return result

        engaged: dict[str, dict[str, Any]] = {}  # crm id -> the referral as seen with its engagement
        results = self._parallel(rows, work)
        if engaged:
            values = self._engagement_fields(engaged)
            for result in results:
                if result.crm_id in values:
                    result.fields = {**result.fields, **values[result.crm_id]}
        return results

    # -- co-sell with Microsoft ---------------------------------------------------------------------
    def _engagement_fields(self, docs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Key -> the canonical values of the mapping's engagement fields (``_engagement.`` paths)
        of referral documents carrying their ``_engagement``, read in one pass."""
        names = [fm.name for fm in self.mapping.fields.values() if fm.referral.startswith(ENGAGEMENT)]
        if not names:
            return {}
        canonical = self._canonical(docs)
        return {key: {name: (canonical.get(key) or {}).get(name) for name in names} for key in docs}

    def engage_microsoft(self, referral: Mapping[str, Any], *, fresh: bool = False) -> tuple[Mapping[str, Any], bool]:
        """The second step of co-selling: a referral targeting Microsoft in the referral's engagement,
        unless the engagement has one already (an earlier try, run or person asked). Returns it,
        and whether this call created it. ``fresh``: the referral was just created by this very
        call (not adopted), so its engagement is new and holds nothing else: the engagement is not
        read before asking. A lost answer to the request is still looked up before any retry."""
        engagement_id = str(referral.get("engagementId") or "")
        if not engagement_id:
            raise ValidationError("Partner Center", f"referral {referral.get('id')} has no engagementId")

        def asked() -> Mapping[str, Any] | None:
            return next((d for d in self.hook.engagement_referrals(engagement_id) if microsoft_side(d)), None)

        found = None if fresh else asked()
        if found is not None:
            return found, False
        request: dict[str, Any] = {k: referral[k] for k in REQUEST_KEYS if referral.get(k) is not None}
        request.update(engagementId=engagement_id, type="Shared", status="New", substatus="Pending")
        request["target"] = [dict(MICROSOFT)]
        created = self.hook.create_referral(request, landed=asked)
        log.info("referral %s: Microsoft asked to co-sell (engagement %s)", referral.get("id"), engagement_id)
        return created, True

    # -- update -------------------------------------------------------------------------------------
    def operations(self, current: Mapping[str, Any], fields: Mapping[str, Any]) -> list[dict[str, Any]]:
        ops = []
        for name, canonical in fields.items():
            fm = self.mapping.fields[name]
            if fm.referral.startswith(ENGAGEMENT):  # read from the engagement, never written
                continue
            held = compile_path(fm.referral)(current)
            for path, value in referral_assignments(fm, canonical, held):
                # solutions: those that stay keep every detail the referral holds
                ops.append(patch_operations(current, path, with_solution_details(path, value, current)))
        consent = (current.get("consent") or {}).get("consentToShareReferralWithMicrosoftSellers")
        private = fields.get("share_with_microsoft", consent) is False  # a private deal never co-sells
        if self.asks_for_help(fields) and current.get("type") != "Shared" and not private:
            # Help asked for on a partner-led referral: it becomes Shared, with its solution as the
            # target, as a new co-sell referral is created (then Microsoft is asked, after the write).
            solutions = [s for s in str(fields.get("solutions") or "").split(";") if s]
            held = (current.get("details") or {}).get("requirements", {}).get("solutions") or []
            solutions += [str(s.get("id")) for s in held if isinstance(s, Mapping) and s.get("id")]
            if solutions:
                ops.append(patch_operations(current, ["type"], "Shared"))
                ops.append(patch_operations(current, ["target"], [{"type": "SolutionProfile", "id": solutions[0]}]))
        return ops

    @staticmethod
    def asks_for_help(fields: Mapping[str, Any]) -> bool:
        """Whether an update sets "How can Microsoft help?" to an answer."""
        return "help_code" in fields and fields["help_code"] not in (*NO_HELP, KEEP)

    def update(
        self, updates: pd.DataFrame, ctx: RunContext, current: Mapping[str, Mapping[str, Any]]
    ) -> list[WriteResult]:
        """``updates``: ``referral_id``, ``crm_id``, ``fields``, ``expected`` (Plan.updates).
        ``current``: the referral documents as extracted (for their ETags and shape)."""
        rows = updates.to_dict("records")

        def work(row: dict[str, Any]) -> WriteResult:
            rid, fields = str(row["referral_id"]), dict(row["fields"])
            result = WriteResult(rid, "update", True, referral_id=rid, crm_id=row.get("crm_id"), fields=fields)
            try:
                doc = current.get(rid) or self._get_or_none(rid)
            except CosellError as exc:
                return _failed(result, exc, "reading the referral: ")
            if doc is None:
                result.ok, result.error, result.error_code = False, f"referral {rid} no longer exists", "itemNotFound"
                return result
            if ctx.dry_run:
                return result
            for attempt in (1, 2):
                try:
                    answer = self.hook.patch_referral(rid, self.operations(doc, fields), etag=doc.get("eTag"))
                    result.etag = (answer or {}).get("eTag")
                    result.fields = fields
                    if self.asks_for_help(fields):  # help asked for (again): Microsoft too, once
                        now = answer if answer and answer.get("engagementId") else self.hook.get_referral(rid)
                        if wants_microsoft(now):
                            result.asked_microsoft = self.engage_microsoft(now)[1]
                    return result
                except PreconditionFailedError as exc:
                    if attempt == 2:
                        return _failed(result, exc)
                except CosellError as exc:
                    return _failed(result, exc)
                # 412: re-read and re-merge, keeping only fields Partner Center still holds as planned.
                try:
                    doc = self.hook.get_referral(rid)
                except CosellError as exc:
                    return _failed(result, exc, "re-reading after 412: ")
                kept = self._remerge(doc, fields, dict(row.get("expected") or {}))
                # Fields Partner Center changed meanwhile are not written: they keep their base
                # and the next run merges them against the new value (a conflict, if both moved).
                result.deferred = sorted(set(result.deferred) | (set(fields) - set(kept)))
                fields = kept
                if not fields:
                    result.fields = {}
                    return result
            return result  # pragma: no cover - the loop always returns

        return self._parallel(rows, work)

    def write_links(
        self, links: pd.DataFrame, ctx: RunContext, current: Mapping[str, Mapping[str, Any]]
    ) -> list[WriteResult]:
        """``links``: ``referral_id``, ``crm_id``: store the CRM id in each referral's
        ``externalReferenceId`` (JSON Patch with ``If-Match``; on 412 re-read and retry once).
        One result per row, keyed by the referral id."""
        rows = links.to_dict("records") if len(links) else []

        def work(row: dict[str, Any]) -> WriteResult:
            rid, crm_id = str(row["referral_id"]), str(row["crm_id"])
            result = WriteResult(rid, "link", True, referral_id=rid, crm_id=crm_id)
            if ctx.dry_run:
                return result
            try:
                doc = current.get(rid) or self.hook.get_referral(rid)
                for attempt in (1, 2):
                    if attempt == 2 and str(doc.get("externalReferenceId") or "").casefold() == crm_id.casefold():
                        result.etag = doc.get("eTag")  # an earlier try of this task wrote it already
                        result.adopted = True
                        return result
                    try:
                        op = patch_operations(doc, ["externalReferenceId"], crm_id)
                        # 204 and the new ETag: the stamp needs no document back
                        answer = self.hook.patch_referral(rid, [op], etag=doc.get("eTag"), return_representation=False)
                        result.etag = (answer or {}).get("eTag")
                        return result
                    except PreconditionFailedError:
                        if attempt == 2:
                            raise
                        doc = self.hook.get_referral(rid)  # changed since it was read: take the new ETag
            except CosellError as exc:
                return _failed(result, exc, "externalReferenceId: ")
            return result

        return self._parallel(rows, work)

    def _remerge(self, doc: Mapping[str, Any], fields: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
        """Drop fields whose Partner Center value moved since planning (the next run merges them);
        all of them when the referral was closed meanwhile (Closed is terminal)."""
        if doc.get("status") == "Closed":
            return {}
        now = referrals_frame([doc], self.mapping).frame
        if now.empty:
            return fields
        held = now.iloc[0]
        # "No opinion" (KEEP) is read as the last synced value: a new plan would write the same.
        return {k: v for k, v in fields.items() if k not in expected or held.get(k) in (expected[k], KEEP)}

    def current_by_id(self, docs: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        return {str(d["id"]): d for d in docs if d.get("id")}
