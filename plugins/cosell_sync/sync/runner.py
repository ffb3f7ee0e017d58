"""One sync run, step by step: extract -> plan -> load -> commit -> report.

Each step reads and writes its frames as Parquet under the run's staging folder, so the
steps can run as separate Airflow tasks (on separate workers) and nothing large goes
through XCom. ``staging`` is any path-like object with ``/`` and ``open`` — an Airflow
``ObjectStoragePath`` (local folder by default, ``s3://`` etc. in production) or a
``pathlib.Path`` in tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import KEEP, SyncMapping
from cosell_sync.engine.normalize import (
    ERROR_COLUMNS,
    compile_path,
    concat_errors,
    crm_frame,
    incomplete_creates,
    referrals_frame,
)
from cosell_sync.engine.plan import Plan, plan, with_base_dicts
from cosell_sync.hooks.clock import ServerClock, server_clock
from cosell_sync.state import StateStore
from cosell_sync.sync import lease
from cosell_sync.sync.base import CrmSide, RunContext, WriteResult, plain, results_frame
from cosell_sync.sync.partner_center import PartnerCenterSide

OVERLAP = timedelta(minutes=5)
CRM_ID_FIELD = {"salesforce": "Id", "dynamics365": "opportunityid"}
JSON_COLUMNS = {"base", "fields", "expected", "old", "new", "pc_value", "crm_value", "chosen", "value", "deferred"}
AUDITED_SKIPS = {"terminal_referral", "invalid_transition", "linked_elsewhere"}


@dataclass
class SyncJob:
    """Everything a step needs to know about the run."""

    crm: str
    dag_id: str
    run_id: str
    mapping: SyncMapping
    staging: Any
    since_pc: datetime | None = None  # None: everything (the initial load or a full resync)
    since_crm: datetime | None = None
    until: datetime | None = None
    referral_ids: list[str] | None = None
    directions: tuple[str, ...] = ("pc_to_crm", "crm_to_pc")
    dry_run: bool = False
    backfill: bool = False
    lease_epoch: int | None = None  # the CRM lease this run holds (cosell_sync.sync.lease); None: none
    lease_ttl: timedelta = lease.LEASE_TTL

    @property
    def folder(self) -> Any:
        return self.staging / self.dag_id / re.sub(r"[^A-Za-z0-9_.-]", "_", self.run_id)

    @property
    def ctx(self) -> RunContext:
        return RunContext(dag_id=self.dag_id, run_id=self.run_id, dry_run=self.dry_run)


# -- staging ------------------------------------------------------------------------------------
def write_frame(job: SyncJob, name: str, frame: pd.DataFrame) -> None:
    out = frame.copy()
    for column in out.columns:
        # Text and mixed columns travel as JSON text, so values keep their types (and None).
        if column in JSON_COLUMNS or out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = [json.dumps(plain(v), default=str) for v in out[column]]
    folder = job.folder
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.parquet").open("wb") as fh:
        out.to_parquet(fh, index=False)


def read_frame(job: SyncJob, name: str) -> pd.DataFrame:
    with (job.folder / f"{name}.parquet").open("rb") as fh:
        frame = pd.read_parquet(fh)
    for column in frame.columns:
        if pd.api.types.is_string_dtype(frame[column]) or frame[column].dtype == object:
            frame[column] = pd.Series(_json_cells(frame[column].tolist()), index=frame.index, dtype=object)
    return frame


def _json_cells(cells: list[Any]) -> list[Any]:
    """Each cell's JSON text decoded (anything else is None): the whole column in one parse,
    one cell at a time only if some cell is not valid JSON (then that cell fails, named)."""
    texts = [c if isinstance(c, str) else "null" for c in cells]
    try:
        decoded = json.loads("[" + ",".join(texts) + "]")
        if len(decoded) == len(cells):
            return decoded
    except ValueError:
        pass
    return [json.loads(c) if isinstance(c, str) else None for c in cells]


def write_json(job: SyncJob, name: str, payload: Any) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, default=str)  # one write: json.dump's many small ones are slow on object storage
    with (job.folder / f"{name}.json").open("w") as fh:
        fh.write(text)


def read_json(job: SyncJob, name: str) -> Any:
    with (job.folder / f"{name}.json").open("r") as fh:
        return json.load(fh)


# -- extract ------------------------------------------------------------------------------------
def window(store: StateStore, dag_id: str, *, full_resync: bool = False) -> tuple[datetime | None, datetime | None]:
    """Where each side's incremental read starts: its committed watermark (the server's time
    when the last window read began, see :func:`_mark`) minus an overlap (a write in flight
    at the watermark, or stamped by a server whose clock lags, is read again, and the merge
    makes that harmless). No watermark yet, or a full resync: everything."""
    if full_resync:
        return None, None
    marks = [store.get_watermark(dag_id, side) for side in ("partner_center", "crm")]
    pc_mark, crm_mark = (m - OVERLAP if m else None for m in marks)
    return pc_mark, crm_mark


def window_job(crm: str, store: StateStore, staging: Any, run_id: str, **fields: Any) -> SyncJob:
    """The job of a scheduled or manual run of ``cosell_sync_<crm>`` in this process: its window
    starts at the committed watermarks, as ``prepare`` reads them; ``fields`` override any
    field (``mapping``, a backfill's interval ...)."""
    from cosell_sync.engine.mapping import load_mapping

    dag_id = f"cosell_sync_{crm}"
    since_pc, since_crm = window(store, dag_id)
    fields = {"since_pc": since_pc, "since_crm": since_crm} | fields
    mapping = fields.pop("mapping", None) or load_mapping(crm)
    return SyncJob(crm=crm, dag_id=dag_id, run_id=run_id, mapping=mapping, staging=staging, **fields)


def initial_load_done(store: StateStore, dag_id: str) -> bool:
    """Has a window sync (scheduled or manual, not a dry run) of ``dag_id`` ever committed?"""
    return any(store.get_watermark(dag_id, side) is not None for side in ("full_sync", "partner_center", "crm"))


# -- the dead letter -------------------------------------------------------------------------------
# One key scheme: (system, record id, direction). The system is the sync's CRM (the table's
# ``crm`` column); the record id is that of the record the direction starts from, the one a
# retry re-reads: the referral id for ``pc_to_crm`` (CRM creates and updates, the referral's
# externalReferenceId stamp, a referral with a bad value), the CRM id for ``crm_to_pc``
# (referral creates and updates, the CRM's referral-id stamp, an opportunity with a bad value).
# Rows written by older versions (a failed Partner Center update keyed by its referral id, and
# so on) are read through their payload's ids, so they are retried and cleared the same way.
SOURCE_ID = {"pc_to_crm": "referral_id", "crm_to_pc": "crm_id"}


def dead_letter_key(direction: str, referral_id: Any, crm_id: Any, fallback: Any = None) -> str:
    """The record id a failure in ``direction`` is filed under."""
    chosen = referral_id if direction == "pc_to_crm" else crm_id
    return str(chosen if not _blank(chosen) else fallback)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value) == ""


def _dead_rows(store: StateStore, job: SyncJob) -> list[dict[str, Any]]:
    """The CRM's dead-letter rows, each with the record id it is about under the one key scheme
    (``key``; a row of an older version may be filed under another id) and the ids it names."""
    frame = store.dead_letter(job.crm)
    rows = []
    for r in frame.itertuples():
        payload = r.payload if isinstance(r.payload, dict) else {}
        ids = {name: None if _blank(payload.get(name)) else str(payload.get(name)) for name in SOURCE_ID.values()}
        if ids[SOURCE_ID[r.direction]] is None:
            ids[SOURCE_ID[r.direction]] = str(r.record_key)
        rows.append(
            {
                "direction": r.direction,
                "record_key": str(r.record_key),
                "key": ids[SOURCE_ID[r.direction]],
                "exhausted": bool(r.exhausted),
                **ids,
            }
        )
    return rows


def _retry_ids(store: StateStore, job: SyncJob, system: str) -> list[str]:
    """Ids on ``system`` (``partner_center`` or ``crm``) to re-read for the dead letter's
    retryable rows: each row's record and its linked counterpart, so the merge sees both sides."""
    rows = [r for r in _dead_rows(store, job) if not r["exhausted"] and r["direction"] in job.directions]
    if not rows:
        return []
    refs = {r["referral_id"] for r in rows if r["referral_id"]}
    cids = {r["crm_id"] for r in rows if r["crm_id"]}
    links = store.get_links(job.crm, referral_ids=sorted(refs), crm_ids=sorted(cids))
    if system == "partner_center":
        return sorted(refs | {str(v) for v in links["referral_id"]})
    return sorted(cids | {str(v) for v in links["crm_id"]})


def _newest(stamps: Any) -> str | None:
    """The newest of the timestamps read in a run's window: where its watermark may move to
    (records read by id, outside the window, never move it)."""
    parsed = pd.to_datetime(pd.Series([s for s in stamps if not _blank(s)], dtype=object), utc=True, errors="coerce")
    newest = parsed.max() if len(parsed) else None
    return None if newest is None or pd.isna(newest) else newest.isoformat()


def _mark(clock: ServerClock, stamps: Any, until: datetime | None) -> str | None:
    """Where a window read may move its side's watermark: the server's time when the read's
    first page was answered (its ``Date`` header, to the second, rounded down). Every record
    changed after that (by anyone: a person, Microsoft, or this run's own writes) is stamped
    later, so the next run's window (this mark minus :data:`OVERLAP`) reads it; a change
    stamped earlier but not yet visible to the read (a commit in flight) is read again through
    the overlap. A quiet side's window so moves forward, instead of re-reading the last burst
    of changes on every run. No ``Date`` seen (a server or proxy without one): the newest
    change the read saw, as before. Never past ``until``, the end of a bounded window."""
    if clock.earliest is None:
        return _newest(stamps)
    mark = clock.earliest
    if until is not None:
        mark = min(mark, until.astimezone(UTC) if until.tzinfo else until.replace(tzinfo=UTC))
    return mark.isoformat()


def _is_flagged(value: Any) -> bool:
    return value is True or value == "true" or value == 1


def extract_partner_center(job: SyncJob, side: PartnerCenterSide, store: StateStore) -> dict[str, int]:
    """Referrals changed in the window (or named), plus those the dead letter retries (and the
    referrals linked to the opportunities it retries)."""
    retry: list[str] = []
    if job.referral_ids is not None:
        docs = side.extract(referral_ids=job.referral_ids)
    else:
        with server_clock() as clock:
            docs = side.extract(since=job.since_pc, until=job.until)
        write_json(job, "pc_mark", {"mark": _mark(clock, (d.get("updatedDateTime") for d in docs), job.until)})
        seen = {str(d.get("id")) for d in docs}
        retry = [k for k in _retry_ids(store, job, "partner_center") if k not in seen]
        docs += side.extract(referral_ids=retry) if retry else []
    result = referrals_frame(docs, job.mapping)
    write_frame(job, "pc", result.frame)
    write_frame(job, "pc_errors", result.errors)
    write_frame(job, "pc_create_errors", result.create_errors)
    write_json(job, "pc_docs", {str(d.get("id")): d for d in docs if d.get("id")})
    bad = set(result.errors["key"]) if len(result.errors) else set()
    # A bad referral that would never sync (Closed and unlinked) is skipped, not failed.
    never = [
        str(d.get("id"))
        for d in docs
        if str(d.get("id")) in bad and d.get("status") == "Closed" and _blank(d.get("externalReferenceId"))
    ]
    found = {str(d.get("id")) for d in docs}
    write_json(job, "pc_dead_letter", {"never_sync": never, "gone": [k for k in retry if k not in found]})
    return {"referrals": len(docs), "bad": len(bad)}


def extract_crm(job: SyncJob, side: CrmSide, store: StateStore) -> dict[str, int]:
    """Opportunities changed in the window (or linked to the named referrals), plus those the
    dead letter retries (and the opportunities linked to the referrals it retries)."""
    id_field = CRM_ID_FIELD[job.crm]
    retry: list[str] = []
    if job.referral_ids is not None:
        records = side.extract(referral_ids=job.referral_ids)
    else:
        with server_clock() as clock:
            records = side.extract(since=job.since_crm, until=job.until)
        modified = compile_path(job.mapping.records["modified_field"])
        write_json(job, "crm_mark", {"mark": _mark(clock, (modified(r) for r in records), job.until)})
        seen = {str(r.get(id_field)) for r in records}
        retry = [k for k in _retry_ids(store, job, "crm") if k not in seen]
        records += [r for r in side.extract(crm_ids=retry) if str(r.get(id_field)) not in seen] if retry else []
    result = crm_frame(records, side.mapping, id_field)  # the side's: choices in this org's values
    write_frame(job, "crm", result.frame)
    write_frame(job, "crm_errors", result.errors)
    write_frame(job, "crm_create_errors", result.create_errors)
    # Each opportunity's version as read (ETag, SystemModstamp): updates are conditional on it.
    versions = {str(r.get(id_field)): side.version(r) for r in records if r.get(id_field)}
    write_json(job, "crm_versions", {k: v for k, v in versions.items() if v})
    bad = set(result.errors["key"]) if len(result.errors) else set()
    # A bad opportunity that would never sync (unflagged and unlinked) is skipped, not failed.
    flag_field, link_field = job.mapping.records["sync_flag_field"], job.mapping.records["link_field"]
    never = [
        str(r.get(id_field))
        for r in records
        if str(r.get(id_field)) in bad and not _is_flagged(r.get(flag_field)) and _blank(r.get(link_field))
    ]
    found = {str(r.get(id_field)).casefold() for r in records}
    gone = [k for k in retry if k.casefold() not in found]
    write_json(job, "crm_dead_letter", {"never_sync": never, "gone": gone})
    return {"opportunities": len(records), "bad": len(bad)}


# -- plan -----------------------------------------------------------------------------------------
PLAN_PARTS = (
    "crm_creates",
    "pc_creates",
    "changes",
    "conflicts",
    "skips",
    "new_base",
    "recovered_links",
)


def fetch_counterparts(job: SyncJob, pc_side: PartnerCenterSide, crm_side: CrmSide, store: StateStore) -> dict:
    """Both sides of every pair this run read: a linked pair (or one named by a record's link
    field) whose other side was not read (outside the window, or an event run) has it read by
    id now, so the merge sees its current values, not the base. Staged with the extracts."""
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    pc_errors = _optional(job, "pc_errors", ERROR_COLUMNS)
    crm_errors = _optional(job, "crm_errors", ERROR_COLUMNS)
    have_pc = {str(k).casefold() for k in [*pc["referral_id"], *pc_errors["key"]]}
    have_crm = {str(k).casefold() for k in [*crm["crm_id"], *crm_errors["key"]]}
    named_crm = [str(v) for v in pc["crm_ref"] if not _blank(v)]
    named_pc = [str(v) for v in crm["referral_ref"] if not _blank(v)]
    links = store.get_links(job.crm, referral_ids=list(pc["referral_id"]), crm_ids=list(crm["crm_id"]))
    want_crm = [
        str(c) for r, c in zip(links["referral_id"], links["crm_id"], strict=True) if str(r).casefold() in have_pc
    ]
    want_pc = [
        str(r) for r, c in zip(links["referral_id"], links["crm_id"], strict=True) if str(c).casefold() in have_crm
    ]
    need_crm = list(dict.fromkeys(c for c in [*want_crm, *named_crm] if c.casefold() not in have_crm))
    need_pc = list(dict.fromkeys(r for r in [*want_pc, *named_pc] if r.casefold() not in have_pc))
    if need_pc:
        docs = pc_side.extract(referral_ids=need_pc)
        more = referrals_frame(docs, job.mapping)
        write_frame(job, "pc", _appended(pc, more.frame))
        write_frame(job, "pc_errors", concat_errors([pc_errors, more.errors]))
        staged = read_json(job, "pc_docs")
        write_json(job, "pc_docs", staged | {str(d.get("id")): d for d in docs if d.get("id")})
    if need_crm:
        id_field = CRM_ID_FIELD[job.crm]
        records = crm_side.extract(crm_ids=need_crm)
        more = crm_frame(records, crm_side.mapping, id_field)
        write_frame(job, "crm", _appended(crm, more.frame))
        write_frame(job, "crm_errors", concat_errors([crm_errors, more.errors]))
        try:
            versions = read_json(job, "crm_versions")
        except FileNotFoundError:
            versions = {}
        for record in records:
            version = crm_side.version(record)
            if version and record.get(id_field):
                versions[str(record.get(id_field))] = version
        write_json(job, "crm_versions", versions)
    return {"referrals": len(need_pc), "opportunities": len(need_crm)}


def _appended(frame: pd.DataFrame, more: pd.DataFrame) -> pd.DataFrame:
    key = "referral_id" if "referral_id" in more.columns else "crm_id"
    if len(frame) and len(more):
        more = more[~more[key].map(lambda k: str(k).casefold()).isin({str(k).casefold() for k in frame[key]})]
    if not len(more):
        return frame
    return pd.concat([frame, more], ignore_index=True) if len(frame) else more


def plan_run(job: SyncJob, store: StateStore, pc_side: PartnerCenterSide, crm_side: CrmSide) -> dict[str, Any]:
    """Fetch the missing side of the run's pairs (:func:`fetch_counterparts`), then plan."""
    fetch_counterparts(job, pc_side, crm_side, store)
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    for frame, column in ((pc, "updated_at"), (crm, "modified_at")):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    ids = list(pc["referral_id"]) + [r for r in crm["referral_ref"] if r]
    # The bases as one column per field (decoded from the state DB in one pass, not a dict per link).
    links = store.get_links(job.crm, referral_ids=ids, crm_ids=list(crm["crm_id"]), columnar=True)
    result = plan(pc, crm, links, job.mapping, directions=job.directions)
    # A planned create lacking a ``required:`` field is an error for its record, not a create
    # (staged apart from the extracts' errors, so a retried plan step does not add them twice).
    blocked_all = []
    for part, key, staged in (("crm_creates", "referral_id", "pc"), ("pc_creates", "crm_id", "crm")):
        lacking = _optional(job, f"{staged}_create_errors", ERROR_COLUMNS)
        kept, blocked = incomplete_creates(getattr(result, part), key, lacking)
        if len(blocked):
            setattr(result, part, kept)
            blocked_all.append(blocked)
    write_frame(job, "plan_errors", concat_errors(blocked_all))
    result.skips = _never_sync_skips(job, store, pc, crm, result.skips)
    for part in PLAN_PARTS:
        write_frame(job, f"plan_{part}", getattr(result, part))
    summary = result.summary()
    write_json(job, "plan_summary", summary)
    return summary


def _dead_letter_notes(job: SyncJob, system: str) -> dict[str, list[str]]:
    try:
        notes = read_json(job, f"{system}_dead_letter")
    except FileNotFoundError:  # staged by an older version
        notes = {}
    return {
        "never_sync": [str(k) for k in notes.get("never_sync") or []],
        "gone": [str(k) for k in notes.get("gone") or []],
    }


def _never_sync_skips(
    job: SyncJob, store: StateStore, pc: pd.DataFrame, crm: pd.DataFrame, skips: pd.DataFrame
) -> pd.DataFrame:
    """Records with a bad value that would never sync, as skips (the plan never saw them): an
    unflagged opportunity and a Closed referral, when nothing links them (no link in the state
    DB, no record of this run naming them)."""
    lone_crm = _dead_letter_notes(job, "crm")["never_sync"]
    lone_pc = _dead_letter_notes(job, "pc")["never_sync"]
    if not lone_crm and not lone_pc:
        return skips
    links = store.get_links(job.crm, referral_ids=lone_pc, crm_ids=lone_crm)
    linked_crm = {str(v).casefold() for v in links["crm_id"]} | {str(v).casefold() for v in pc["crm_ref"] if v}
    linked_pc = {str(v).casefold() for v in links["referral_id"]} | {
        str(v).casefold() for v in crm["referral_ref"] if v
    }
    rows = [
        {"side": "crm", "referral_id": None, "crm_id": k, "reason": "not_flagged", "field": None, "detail": None}
        for k in lone_crm
        if k.casefold() not in linked_crm
    ] + [
        {
            "side": "partner_center",
            "referral_id": k,
            "crm_id": None,
            "reason": "closed_unlinked",
            "field": None,
            "detail": None,
        }
        for k in lone_pc
        if k.casefold() not in linked_pc
    ]
    if not rows:
        return skips
    extra = pd.DataFrame(rows, columns=list(skips.columns), dtype=object)
    return pd.concat([skips, extra], ignore_index=True) if len(skips) else extra


def load_plan(job: SyncJob) -> Plan:
    parts = {part: read_frame(job, f"plan_{part}") for part in PLAN_PARTS}
    return Plan(**parts)


# -- load -------------------------------------------------------------------------------------------
def load_crm(job: SyncJob, side: CrmSide) -> dict[str, int]:
    """Creates and updates in the CRM; one result per record, staged for the commit."""
    the_plan = load_plan(job)
    results: list[WriteResult] = []
    if len(the_plan.crm_creates):
        results += side.create(the_plan.crm_creates, job.ctx)
    updates = the_plan.updates("crm")
    if len(updates):
        try:
            versions = read_json(job, "crm_versions")
        except FileNotFoundError:  # extracted by an older version: unconditional
            versions = {}
        results += side.update(updates, job.ctx, versions)
    write_frame(job, "crm_results", results_frame(results))
    if not job.dry_run:
        _count_writes(job, {"crm": _write_counts(results_frame(results), pd.DataFrame())})
    return {"ok": sum(r.ok for r in results), "failed": sum(not r.ok for r in results)}


WRITES_LEDGER = "writes"
# What a write did: the report's counts per target (asked_microsoft: co-sell requests POSTed).
WRITE_KINDS = ("created", "updated", "linked", "asked_microsoft")


def _write_counts(results: pd.DataFrame, stamps: pd.DataFrame) -> dict[str, int]:
    """The records a load actually wrote, from its per-record results: created, updated, linked."""
    asked = results["asked_microsoft"].map(lambda v: v is True) if "asked_microsoft" in results else None
    return {
        "created": _written_count(results, ("create",)),
        "updated": _written_count(results, ("update", "win", "lose")),
        "linked": _written_count(stamps, ("link", "update")) if len(stamps) else 0,
        "asked_microsoft": int(asked.sum()) if asked is not None else 0,  # co-sell requests POSTed
    }


def _ledger_writes(job: SyncJob) -> dict[str, dict[str, int]] | None:
    """The run's ledger of writes per target, with totals (None: no load step finished)."""
    try:
        ledger = read_json(job, WRITES_LEDGER)
    except FileNotFoundError:
        return None
    out = {}
    for target in ("partner_center", "crm"):
        numbers = {k: int(ledger.get(target, {}).get(k, 0)) for k in WRITE_KINDS}
        out[target] = numbers | {"total": sum(numbers.values())}
    return out


def _count_writes(job: SyncJob, counts: dict[str, dict[str, int]]) -> None:
    """Add one try's writes to the run's ledger: every try of a load step that finished counts
    (a retried or cleared task adds what it wrote again, usually nothing: it adopts)."""
    try:
        ledger = read_json(job, WRITES_LEDGER)
    except FileNotFoundError:
        ledger = {}
    for target, numbers in counts.items():
        held = ledger.setdefault(target, {})
        for key, value in numbers.items():
            held[key] = int(held.get(key, 0)) + int(value)
    write_json(job, WRITES_LEDGER, ledger)


def load_partner_center(job: SyncJob, side: PartnerCenterSide, crm_side: CrmSide) -> dict[str, int]:
    """Creates and updates in Partner Center; new referral ids are written back to the CRM."""
    the_plan = load_plan(job)
    docs = read_json(job, "pc_docs")
    results: list[WriteResult] = []
    created: list[WriteResult] = []
    if len(the_plan.pc_creates):
        # Idempotent across retries: a referral an earlier try created is found and adopted.
        created = side.create(the_plan.pc_creates, job.ctx)
        results += created
    # The new links go to the CRM first, before the updates, so the CRM holds each new referral's
    # id as early as possible; links the CRM lacks (recovered from the records) go with them.
    new_links = pd.DataFrame(
        [{"crm_id": r.crm_id, "referral_id": r.referral_id} for r in created if r.ok and r.referral_id],
        columns=["crm_id", "referral_id"],
        dtype=object,
    )
    new_links = pd.concat([new_links, crm_link_stamps(job, the_plan, set(new_links["crm_id"]))], ignore_index=True)
    link_results = crm_side.write_links(new_links, job.ctx) if len(new_links) else []
    updates = the_plan.updates("partner_center")
    if len(updates):
        results += side.update(updates, job.ctx, docs)
    stamps = referral_stamps(job, the_plan, docs)
    stamp_results = side.write_links(stamps, job.ctx, docs) if len(stamps) else []
    write_frame(job, "pc_results", results_frame(results))
    write_frame(job, "link_results", results_frame(link_results))
    write_frame(job, "pc_link_results", results_frame(stamp_results))
    if not job.dry_run:
        _count_writes(
            job,
            {
                "partner_center": _write_counts(results_frame(results), results_frame(stamp_results)),
                "crm": _write_counts(pd.DataFrame(), results_frame(link_results)),
            },
        )
    done = results + stamp_results
    return {"ok": sum(r.ok for r in done), "failed": sum(not r.ok for r in done)}


def referral_stamps(job: SyncJob, the_plan: Plan, docs: dict[str, Any]) -> pd.DataFrame:
    """Open referrals whose ``externalReferenceId`` must be set to their opportunity's id: those
    the CRM just got an opportunity for, and linked ones read this run that do not hold it
    (a stamp that failed or was lost in an earlier run)."""
    wanted: dict[str, str] = {}
    crm_results = _optional(job, "crm_results", list(results_frame([]).columns))
    for r in crm_results.itertuples():
        if r.action == "create" and r.ok and r.referral_id and r.crm_id:
            wanted[str(r.referral_id)] = str(r.crm_id)
    pc = read_frame(job, "pc")
    linked = dict(run_pairs(the_plan))
    if len(pc) and linked:
        for rid, held in zip(pc["referral_id"], pc["crm_ref"], strict=True):
            if rid in linked and str(held or "").casefold() != str(linked[rid]).casefold():
                wanted.setdefault(str(rid), str(linked[rid]))
    rows = [
        {"referral_id": rid, "crm_id": crm_id}
        for rid, crm_id in wanted.items()
        if (docs.get(rid) or {}).get("status") in ("New", "Active")  # a Closed referral is terminal
    ]
    return pd.DataFrame(rows, columns=["referral_id", "crm_id"], dtype=object)


def run_pairs(the_plan: Plan) -> list[tuple[str, str]]:
    """(referral id, CRM id) of every linked pair this run planned, changed or not (a stamp
    that failed in an earlier run is retried on a pair whose values have not moved)."""
    pairs: dict[str, str] = {}
    frames = [the_plan.new_base, the_plan.changes, the_plan.conflicts, the_plan.skips, the_plan.recovered_links]
    for frame in frames:
        if len(frame) and {"referral_id", "crm_id"} <= set(frame.columns):
            for rid, crm_id in zip(frame["referral_id"], frame["crm_id"], strict=True):
                if not _blank(rid) and not _blank(crm_id):
                    pairs.setdefault(str(rid), str(crm_id))
    return list(pairs.items())


def crm_link_stamps(job: SyncJob, the_plan: Plan, skip: set[str]) -> pd.DataFrame:
    """Open opportunities whose referral-id field must be set: linked pairs of this run (a link
    recovered from a referral's ``externalReferenceId``, e.g. one created by a run that died
    before it linked it, or a stamp that failed in an earlier run) whose opportunity, read
    this run, does not hold the referral id."""
    crm = read_frame(job, "crm")
    rows = []
    linked = {crm_id: rid for rid, crm_id in run_pairs(the_plan)}
    if len(crm) and linked:
        for crm_id, held, closed in zip(crm["crm_id"], crm["referral_ref"], crm["closed"], strict=True):
            rid = linked.get(crm_id)
            if rid and crm_id not in skip and not closed and str(held or "").casefold() != str(rid).casefold():
                rows.append({"crm_id": str(crm_id), "referral_id": str(rid)})
    return pd.DataFrame(rows, columns=["crm_id", "referral_id"], dtype=object)


def sync(job: SyncJob, pc_side: PartnerCenterSide, crm_side: CrmSide, store: StateStore) -> dict[str, Any]:
    """Every step in one process, in the DAG's order: for event-driven runs of a few
    referrals, where one task beats seven task start-ups. Returns the committed report.

    The CRM's lease is taken first unless the job already holds it (LeaseHeldError while
    another run holds it) and released by the commit; if a step fails it is released too,
    since a new try of ``sync`` reads everything again."""
    if job.lease_epoch is None:
        lease.acquire(job, store)
    try:
        with lease.kept(job, store):
            extract_partner_center(job, pc_side, store)
            extract_crm(job, crm_side, store)
            plan_run(job, store, pc_side, crm_side)
            load_crm(job, crm_side)
            load_partner_center(job, pc_side, crm_side)
            return commit(job, store)
    except BaseException:
        if job.lease_epoch is not None:
            lease.release(job, store)
        raise


# -- commit -------------------------------------------------------------------------------------------
def _optional(job: SyncJob, name: str, columns: list[str]) -> pd.DataFrame:
    try:
        return read_frame(job, name)
    except FileNotFoundError:
        return pd.DataFrame(columns=columns)


def commit(job: SyncJob, store: StateStore) -> dict[str, Any]:
    """Links, audit, dead letter, the run summary and watermarks, in one transaction; returns the report."""
    the_plan = load_plan(job)
    result_cols = list(results_frame([]).columns)
    crm_results = _optional(job, "crm_results", result_cols)
    pc_results = _optional(job, "pc_results", result_cols)
    link_results = _optional(job, "link_results", result_cols)
    stamp_results = _optional(job, "pc_link_results", result_cols)
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    errors = concat_errors([_optional(job, name, ERROR_COLUMNS) for name in ("pc_errors", "crm_errors", "plan_errors")])
    errors = _without_never_sync(errors, the_plan.skips)

    # Links: created pairs, plus linked pairs whose agreed values moved. The base moves only
    # where the targets confirmed it: a pair with a failed write keeps its old base, and a
    # field a target did not write (deferred: it changed there since it was read) keeps its
    # old value in the base, so the next run plans it again against what the target holds.
    results = pd.concat([crm_results, pc_results], ignore_index=True)
    failed_pairs = {_pair(r.referral_id, r.crm_id) for r in results.itertuples() if not r.ok}
    deferred: dict[tuple[str, str], set[str]] = {}
    for r in results.itertuples():
        if r.ok and isinstance(getattr(r, "deferred", None), list) and r.deferred:
            deferred.setdefault(_pair(r.referral_id, r.crm_id), set()).update(r.deferred)
    base = with_base_dicts(the_plan.new_base)  # columnar links plan a columnar new base
    landed = np.array(
        [_pair(r, c) not in failed_pairs for r, c in zip(base["referral_id"], base["crm_id"], strict=True)], dtype=bool
    )
    ok_base = base.loc[landed] if len(base) else pd.DataFrame(columns=["referral_id", "crm_id", "base"])
    if deferred and len(ok_base):
        ok_base = _keep_deferred(job, store, ok_base, deferred)
    fields = list(job.mapping.fields)
    pc_rows = pc.set_index("referral_id") if len(pc) else pd.DataFrame(columns=fields)
    crm_rows = crm.set_index("crm_id") if len(crm) else pd.DataFrame(columns=fields)
    created_links = []
    for r in crm_results.itertuples():
        if r.action == "create" and r.ok and r.crm_id and r.referral_id in pc_rows.index:
            # The base is what the new opportunity holds (r.fields: a value the CRM filled in,
            # such as Salesforce's required CloseDate, included), over the referral's values.
            base_values = _values(pc_rows.loc[r.referral_id], fields) | _written(r.fields, fields)
            created_links.append({"referral_id": r.referral_id, "crm_id": r.crm_id, "base": base_values})
    for r in pc_results.itertuples():
        if r.action == "create" and r.ok and r.referral_id and r.crm_id in crm_rows.index:
            # The base is what the new referral holds (r.fields), over the CRM row's values.
            base_values = _values(crm_rows.loc[r.crm_id], fields) | _written(r.fields, fields)
            created_links.append({"referral_id": r.referral_id, "crm_id": r.crm_id, "base": base_values})
    links = pd.concat([ok_base[["referral_id", "crm_id", "base"]], pd.DataFrame(created_links)], ignore_index=True)

    audit = _audit_rows(job, the_plan, crm_results, pc_results)
    failures = {
        "pc_to_crm": _failures(crm_results, "pc_to_crm")
        + _failures(stamp_results, "pc_to_crm")
        + _error_failures(errors, "referral"),
        "crm_to_pc": _failures(pc_results, "crm_to_pc")
        + _failures(link_results, "crm_to_pc")
        + _error_failures(errors, "crm"),
    }
    cleared = _cleared(job, store, pc, crm, failures)
    # Each side's watermark moves to the server's time when its window read began (records read
    # by id, outside the window, never move it; without a Date header: the newest change the
    # window read, and a side whose window read nothing keeps its own). It never moves back.
    watermarks = {side: mark for side in MARK_FILES if (mark := _window_mark(job, side)) is not None}
    watermarks["full_sync"] = datetime.now(UTC)  # moved with the others: only by window runs
    report = build_report(the_plan, crm_results, pc_results, errors, (stamp_results, link_results))
    ledger = _ledger_writes(job)
    if ledger is not None:  # the writes of every finished try of the load steps, not only the last one's
        report["writes"] = ledger
    report["pc_to_crm"]["failed"] += int((~stamp_results["ok"].astype(bool)).sum()) if len(stamp_results) else 0
    if job.dry_run:  # the plan is reported (and becomes the run's note); no sync state is touched
        report = report | {"dry_run": True}
        store.record_run(dag_id=job.dag_id, run_id=job.run_id, crm=job.crm, summary=report)
        return report
    store.commit_run(
        dag_id=job.dag_id,
        run_id=job.run_id,
        crm=job.crm,
        links=links if len(links) else None,
        audit=audit,
        watermarks=watermarks,
        cleared_failures=cleared,
        failures={direction: items for direction, items in failures.items() if items},
        summary=report,
        move_watermarks=not job.backfill and job.referral_ids is None,
        lease_epoch=job.lease_epoch,  # still ours, checked in the commit's transaction
    )
    if job.lease_epoch is not None:
        lease.release(job, store)  # the base is committed: the next run may read it
    return report


MARK_FILES = {"partner_center": "pc_mark", "crm": "crm_mark"}


def _window_mark(job: SyncJob, side: str) -> datetime | None:
    """The newest change the run's window read on ``side`` (None: nothing, or not staged)."""
    try:
        mark = read_json(job, MARK_FILES[side]).get("mark")
    except FileNotFoundError:
        return None
    return None if not mark else pd.Timestamp(mark).to_pydatetime()


def _pair(referral_id: Any, crm_id: Any) -> tuple[str, str]:
    """A pair's key in results and plans (Dataverse ids compare case-insensitively)."""
    return str(referral_id), str(crm_id).casefold()


def _written(values: Any, fields: list[str]) -> dict[str, Any]:
    """The canonical values a create reported as written (no-opinion markers left out)."""
    if not isinstance(values, dict):
        return {}
    return {k: plain(v) for k, v in values.items() if k in fields and v != KEEP}


def _keep_deferred(
    job: SyncJob, store: StateStore, new_base: pd.DataFrame, deferred: dict[tuple[str, str], set[str]]
) -> pd.DataFrame:
    """``new_base`` with each deferred field set back to the base it had before this run."""
    before = store.get_links(job.crm, referral_ids=[r for r, _ in deferred])
    old = {_pair(r, c): b for r, c, b in zip(before["referral_id"], before["crm_id"], before["base"], strict=True)}
    out = new_base.copy()
    bases = []
    for rid, cid, record in zip(out["referral_id"], out["crm_id"], out["base"], strict=True):
        names = deferred.get(_pair(rid, cid))
        if names:
            prior = old.get(_pair(rid, cid))
            record = dict(record) | {f: (prior or {}).get(f) for f in names}
        bases.append(record)
    out["base"] = bases
    return out


def _values(row: pd.Series, fields: list[str]) -> dict[str, Any]:
    """Canonical values for a link's base; "no opinion" (KEEP) is stored as nothing."""
    return {f: None if row.get(f) == KEEP else plain(row.get(f)) for f in fields}


def _without_never_sync(errors: pd.DataFrame, skips: pd.DataFrame) -> pd.DataFrame:
    """Bad values of records skipped as never syncing are no failures (see _never_sync_skips)."""
    if not len(errors) or not len(skips):
        return errors
    crm = skips[(skips["side"] == "crm") & (skips["reason"] == "not_flagged")]["crm_id"]
    ref = skips[(skips["side"] == "partner_center") & (skips["reason"] == "closed_unlinked")]["referral_id"]
    never = {("crm", str(k)) for k in crm} | {("referral", str(k)) for k in ref}
    keep = [(side, str(key)) not in never for side, key in zip(errors["side"], errors["key"], strict=True)]
    return errors.loc[keep].reset_index(drop=True)


def _cleared(
    job: SyncJob, store: StateStore, pc: pd.DataFrame, crm: pd.DataFrame, failures: dict[str, list[dict[str, Any]]]
) -> dict[str, list[str]]:
    """Dead-letter rows to clear, per direction (of the directions this run synced): those of a
    record this run read that did not fail again (it synced, became valid, is in step, or is no
    longer eligible: unflagged, Closed and unlinked, terminal...), and those of a record a retry
    no longer finds (deleted)."""
    done: dict[str, set[str]] = {}
    notes = {"pc_to_crm": _dead_letter_notes(job, "pc"), "crm_to_pc": _dead_letter_notes(job, "crm")}
    for direction, frame, column in (("pc_to_crm", pc, "referral_id"), ("crm_to_pc", crm, "crm_id")):
        if direction not in job.directions:
            continue
        read = {str(k).casefold() for k in frame[column]} if len(frame) else set()
        read |= {k.casefold() for k in notes[direction]["never_sync"] + notes[direction]["gone"]}
        failed = {str(f["record_key"]).casefold() for f in failures[direction]}
        done[direction] = read - failed
    cleared: dict[str, list[str]] = {direction: [] for direction in done}
    if not any(done.values()):
        return cleared
    for row in _dead_rows(store, job):
        if row["direction"] in done and row["key"].casefold() in done[row["direction"]]:
            cleared[row["direction"]].append(row["record_key"])
    return cleared


def _failures(results: pd.DataFrame, direction: str) -> list[dict[str, Any]]:
    return [
        {
            "record_key": dead_letter_key(direction, r.referral_id, r.crm_id, r.key),
            "payload": {"action": r.action, "fields": r.fields, "referral_id": r.referral_id, "crm_id": r.crm_id},
            "error": r.error or "failed",
            "error_code": r.error_code,
        }
        for r in results.itertuples()
        if not r.ok
    ]


def _error_failures(errors: pd.DataFrame, side: str) -> list[dict[str, Any]]:
    rows = errors[errors["side"] == side]
    return [
        {
            "record_key": str(key),
            "payload": {"side": side},
            "error": "; ".join(f"{r.field}: {r.message} (got {r.value})" for r in group.itertuples()),
            "error_code": "invalidInput",
        }
        for key, group in rows.groupby("key")
    ]


def _audit_rows(job: SyncJob, the_plan: Plan, crm_results: pd.DataFrame, pc_results: pd.DataFrame) -> list[dict]:
    rows: list[dict[str, Any]] = []
    # Each planned change is audited from its target's result: written (update, or the won/lost
    # action that carried a stage), deferred (the target changed since it was read), or not at
    # all when the write failed (the failure row below says so).
    written: dict[tuple[str, str, str], Any] = {}
    for results, target in ((crm_results, "crm"), (pc_results, "partner_center")):
        for r in results.itertuples():
            if r.action in ("update", "win", "lose"):
                written[(target, *_pair(r.referral_id, r.crm_id))] = r
    for c in the_plan.changes.itertuples():
        direction = "pc_to_crm" if c.target == "crm" else "crm_to_pc"
        r = written.get((c.target, *_pair(c.referral_id, c.crm_id)))
        if r is None or not r.ok:
            continue
        if isinstance(r.fields, dict) and c.field in r.fields:
            action, detail = ("update" if r.action == "update" else r.action), c.reason
        elif isinstance(getattr(r, "deferred", None), list) and c.field in r.deferred:
            action, detail = "deferred", f"{r.error_code or 'changed_during_run'}: {c.target} changed since it was read"
        else:
            continue
        rows.append(
            {
                "direction": direction,
                "referral_id": c.referral_id,
                "crm_id": c.crm_id,
                "action": action,
                "field": c.field,
                "old_value": c.old,
                "new_value": c.new,
                "detail": detail,
            }
        )
    for c in the_plan.conflicts.itertuples():
        rows.append(
            {
                "direction": "pc_to_crm" if c.winner == "partner_center" else "crm_to_pc",
                "referral_id": c.referral_id,
                "crm_id": c.crm_id,
                "action": "conflict",
                "field": c.field,
                "old_value": c.base,
                "new_value": c.chosen,
                "detail": f"partner_center={c.pc_value!r} crm={c.crm_value!r}; {c.winner} wins",
            }
        )
    for s in the_plan.skips.itertuples():
        if s.reason in AUDITED_SKIPS:
            rows.append(
                {
                    "direction": "crm_to_pc" if s.side == "crm" else "pc_to_crm",
                    "referral_id": s.referral_id,
                    "crm_id": s.crm_id,
                    "action": "skip",
                    "field": s.field,
                    "old_value": None,
                    "new_value": None,
                    "detail": f"{s.reason}: {s.detail or ''}".strip(": "),
                }
            )
    for results, direction in ((crm_results, "pc_to_crm"), (pc_results, "crm_to_pc")):
        for r in results.itertuples():
            if r.action == "create" and r.ok:
                rows.append(
                    {
                        "direction": direction,
                        "referral_id": r.referral_id,
                        "crm_id": r.crm_id,
                        "action": "create",
                        "field": None,
                        "old_value": None,
                        "new_value": r.fields,
                        "detail": None,
                    }
                )
            dups = getattr(r, "duplicates", None)
            if r.ok and isinstance(dups, list) and dups:
                rows.append(
                    {
                        "direction": direction,
                        "referral_id": r.referral_id,
                        "crm_id": r.crm_id,
                        "action": "skip",
                        "field": None,
                        "old_value": None,
                        "new_value": dups,
                        "detail": f"duplicates: {len(dups)} more referral(s) for this opportunity; the oldest linked",
                    }
                )
            if not r.ok:
                rows.append(
                    {
                        "direction": direction,
                        "referral_id": r.referral_id,
                        "crm_id": r.crm_id,
                        "action": "fail",
                        "field": None,
                        "old_value": None,
                        "new_value": r.fields,
                        "detail": r.error,
                    }
                )
    return rows


def _flag(results: pd.DataFrame, column: str) -> pd.Series:
    """A boolean column of staged results (False where absent: staged by an older version)."""
    if column not in results.columns:
        return pd.Series(False, index=results.index, dtype=bool)
    return results[column].map(lambda v: v is True).astype(bool)


def _written_count(results: pd.DataFrame, actions: tuple[str, ...]) -> int:
    """Records of ``results`` (with ``actions``) that a write of this run changed: ok, not found
    done already (adopted), and with something written (an update whose fields were all
    deferred, or that had nothing on the record itself, wrote nothing)."""
    if not len(results):
        return 0
    ok = results["ok"].astype(bool) & ~_flag(results, "adopted") & results["action"].isin(actions)
    if "create" not in actions and "link" not in actions:
        ok &= results["fields"].map(lambda f: not isinstance(f, dict) or bool(f)).astype(bool)
    return int(ok.sum())


def build_report(
    the_plan: Plan,
    crm_results: pd.DataFrame,
    pc_results: pd.DataFrame,
    errors: pd.DataFrame,
    links: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> dict:
    """Per direction: created (recovered: of those, the ones an earlier try or a run that died
    before its commit had made, found and adopted), updated, conflicts, failed, deferred and
    duplicates found; unchanged; skips; and ``writes``: the records each target was actually
    written, from the per-record results (``links``: the link stamps written to Partner Center
    and to the CRM)."""

    def counts(results: pd.DataFrame, winner: str) -> dict[str, int]:
        ok = results[results["ok"].astype(bool)] if len(results) else results
        creates = ok[ok["action"] == "create"] if len(ok) else ok
        return {
            "created": len(creates),
            "recovered": int(_flag(creates, "adopted").sum()) if len(creates) else 0,
            "updated": int(ok["action"].isin(["update", "win", "lose"]).sum()) if len(ok) else 0,
            "conflicts": int((the_plan.conflicts["winner"] == winner).sum()),
            "failed": int((~results["ok"].astype(bool)).sum()) if len(results) else 0,
            "deferred": sum(1 for d in ok.get("deferred", []) if isinstance(d, list) and d) if len(ok) else 0,
            "duplicates": sum(len(d) for d in ok.get("duplicates", []) if isinstance(d, list)) if len(ok) else 0,
        }

    pc_stamps, crm_stamps = links if links is not None else (pd.DataFrame(), pd.DataFrame())

    def writes(results: pd.DataFrame, stamps: pd.DataFrame) -> dict[str, int]:
        out = _write_counts(results, stamps)
        return out | {"total": sum(out.values())}

    bad_pc = errors[errors["side"] == "referral"]["key"].nunique() if len(errors) else 0
    bad_crm = errors[errors["side"] == "crm"]["key"].nunique() if len(errors) else 0
    pc_to_crm = counts(crm_results, "partner_center")
    crm_to_pc = counts(pc_results, "crm")
    pc_to_crm["failed"] += int(bad_pc)
    crm_to_pc["failed"] += int(bad_crm)
    unchanged = int(the_plan.skips["reason"].isin(["no_change", "echo"]).sum())
    skipped = the_plan.skips[~the_plan.skips["reason"].isin(["no_change", "echo"])]
    keys = skipped["side"].astype(str) + "." + skipped["reason"].astype(str)
    return {
        "pc_to_crm": pc_to_crm,
        "crm_to_pc": crm_to_pc,
        "unchanged": unchanged,
        "skipped": {str(k): int(v) for k, v in keys.value_counts().sort_index().items()},
        "writes": {"partner_center": writes(pc_results, pc_stamps), "crm": writes(crm_results, crm_stamps)},
    }


CRM_LABELS = {"dynamics365": "Dynamics 365", "salesforce": "Salesforce"}
#: What each skip means, in words a user reads in the run's note: ``side.reason`` -> (one, many).
SKIP_REASONS = {
    "partner_center.closed_unlinked": (
        "closed referral that was never linked: a Closed referral is not imported",
        "closed referrals that were never linked: a Closed referral is not imported",
    ),
    "partner_center.linked_elsewhere": (
        "referral whose externalReferenceId names a record this sync has no link for (another CRM, or deleted)",
        "referrals whose externalReferenceId names a record this sync has no link for (another CRM, or deleted)",
    ),
    "crm.not_flagged": (
        'opportunity not flagged "Sync with Partner Center": only flagged ones are shared',
        'opportunities not flagged "Sync with Partner Center": only flagged ones are shared',
    ),
    "crm.closed_unlinked": (
        "flagged opportunity already closed (won or lost): only open ones are shared",
        "flagged opportunities already closed (won or lost): only open ones are shared",
    ),
    "crm.linked_elsewhere": (
        "opportunity holding a referral id this sync has no link for",
        "opportunities holding a referral id this sync has no link for",
    ),
    "pair.terminal_referral": (
        "change not written to a Closed referral (Closed is final in Partner Center)",
        "changes not written to a Closed referral (Closed is final in Partner Center)",
    ),
    "pair.invalid_transition": (
        "change Partner Center would refuse (a status it cannot move to)",
        "changes Partner Center would refuse (a status it cannot move to)",
    ),
}


def describe_skip(key: str, count: int = 2) -> str:
    """A skip key of a report (``side.reason``; older reports: ``reason``) in plain words,
    for ``count`` records."""
    forms = SKIP_REASONS.get(key) or next(
        (text for known, text in SKIP_REASONS.items() if known.split(".", 1)[1] == key), None
    )
    if forms is None:
        return key.replace("_", " ")
    return forms[0] if count == 1 else forms[1]


def format_report(dag_id: str, report: dict[str, Any], crm: str | None = None) -> str:
    """The run's report as Markdown: a heading, a small table per direction, the skips in
    plain words. It is the DAG run's note (the grid view renders it) and the task's log."""
    crm_label = CRM_LABELS.get(crm or "", "CRM")
    total = {k: sum(report[d][k] for d in ("pc_to_crm", "crm_to_pc")) for k in ("created", "updated", "failed")}
    if report.get("dry_run"):
        plan = f"{total['created']} to create, {total['updated']} to update"
        outcome = f"dry run: the plan only, nothing was written ({plan})"
    else:
        outcome = f"{total['created']} created, {total['updated']} updated, {total['failed']} failed"
    title = f"**{dag_id}** · {outcome}"  # the first line is what the run's header shows
    lines = [
        title,
        "",
        "| | created | updated | conflicts | failed |",
        "|---|--:|--:|--:|--:|",
    ]
    for direction, label in (
        ("pc_to_crm", f"Partner Center → {crm_label}"),
        ("crm_to_pc", f"{crm_label} → Partner Center"),
    ):
        c = report[direction]
        lines.append(f"| {label} | {c['created']} | {c['updated']} | {c['conflicts']} | {c['failed']} |")
    unchanged = report["unchanged"]
    lines += ["", f"Unchanged: {unchanged} linked deal{'' if unchanged == 1 else 's'}."]
    written = report.get("writes")
    if written and not report.get("dry_run"):
        parts = []
        for target, label in (("partner_center", "Partner Center"), ("crm", crm_label)):
            w = written[target]
            detail = ", ".join(f"{w[k]} {k.replace('_', ' ')}" for k in WRITE_KINDS if w[k])
            parts.append(f"{label} {w['total']}" + (f" ({detail})" if detail else ""))
        lines += ["", "Records written: " + " · ".join(parts) + "."]
    recovered = sum(report[d].get("recovered", 0) for d in ("pc_to_crm", "crm_to_pc"))
    if recovered:
        lines.append(
            f"Recovered: {recovered} record{'' if recovered == 1 else 's'} an earlier try (or a run that "
            "stopped before its commit) had created: found and linked, not created again."
        )
    duplicates = sum(report[d].get("duplicates", 0) for d in ("pc_to_crm", "crm_to_pc"))
    if duplicates:
        lines.append(
            f"Duplicates found: {duplicates} more referral{'' if duplicates == 1 else 's'} for opportunities "
            "that have one already (made before; the oldest is kept)."
        )
    deferred = sum(report[d].get("deferred", 0) for d in ("pc_to_crm", "crm_to_pc"))
    if deferred:
        lines += [
            f"Deferred: {deferred} deal{'' if deferred == 1 else 's'} changed while this run was writing; "
            "the next run merges the new values."
        ]
    skipped = report.get("skipped") or {}
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {count} {describe_skip(key, count)}" for key, count in sorted(skipped.items())]
    return "\n".join(lines)
