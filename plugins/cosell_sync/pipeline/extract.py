"""Extract: each side's changed records (and those the dead letter retries), staged as frames.

:func:`extract_partner_center` and :func:`extract_crm` read their window (or the named
records), normalize them (:mod:`cosell_sync.engine.normalize`) and stage the frames, the
bad values, each record's version and where the side's watermark may move.
:func:`fetch_counterparts` then reads by id the other side of every pair the run touched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from cosell_sync import crms
from cosell_sync.engine.normalize import ERROR_COLUMNS, compile_path, concat_errors, crm_frame, referrals_frame
from cosell_sync.hooks.clock import ServerClock, server_clock
from cosell_sync.pipeline.job import SyncJob
from cosell_sync.pipeline.staging import blank, optional_frame, read_frame, read_json, write_frame, write_json
from cosell_sync.sides.crm import CrmSide
from cosell_sync.sides.partner_center import PartnerCenterSide
from cosell_sync.state import StateStore

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
    return str(chosen if not blank(chosen) else fallback)


def dead_rows(store: StateStore, job: SyncJob) -> list[dict[str, Any]]:
    """The CRM's dead-letter rows, each with the record id it is about under the one key scheme
    (``key``; a row of an older version may be filed under another id) and the ids it names."""
    frame = store.dead_letter(job.crm)
    rows = []
    for r in frame.itertuples():
        payload = r.payload if isinstance(r.payload, dict) else {}
        ids = {name: None if blank(payload.get(name)) else str(payload.get(name)) for name in SOURCE_ID.values()}
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


def dead_letter_notes(job: SyncJob, system: str) -> dict[str, list[str]]:
    try:
        notes = read_json(job, f"{system}_dead_letter")
    except FileNotFoundError:  # staged by an older version
        notes = {}
    return {
        "never_sync": [str(k) for k in notes.get("never_sync") or []],
        "gone": [str(k) for k in notes.get("gone") or []],
    }


def _retry_ids(store: StateStore, job: SyncJob, system: str) -> list[str]:
    """Ids on ``system`` (``partner_center`` or ``crm``) to re-read for the dead letter's
    retryable rows: each row's record and its linked counterpart, so the merge sees both sides."""
    rows = [r for r in dead_rows(store, job) if not r["exhausted"] and r["direction"] in job.directions]
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
    parsed = pd.to_datetime(pd.Series([s for s in stamps if not blank(s)], dtype=object), utc=True, errors="coerce")
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


def _read(
    job: SyncJob, side: PartnerCenterSide | CrmSide, since: datetime | None, stamp: Callable[[Any], Any], prefix: str
) -> list[dict[str, Any]]:
    """The records an event run names (by referral id), or those changed in the run's window;
    a window read stages where the side's watermark may move (``<prefix>_mark``, see :func:`_mark`,
    ``stamp``: a record's change time)."""
    if job.named:
        if isinstance(side, PartnerCenterSide):
            return side.extract(referral_ids=job.referral_ids or [])
        return side.extract(referral_ids=job.referral_ids or [], crm_ids=job.crm_ids)
    with server_clock() as clock:
        records = side.extract(since=since, until=job.until)
    write_json(job, f"{prefix}_mark", {"mark": _mark(clock, (stamp(r) for r in records), job.until)})
    return records


def _stage(job: SyncJob, prefix: str, result: Any) -> None:
    """A side's normalized frame, its bad values and its creates' missing required values."""
    write_frame(job, prefix, result.frame)
    write_frame(job, f"{prefix}_errors", result.errors)
    write_frame(job, f"{prefix}_create_errors", result.create_errors)


def extract_partner_center(job: SyncJob, side: PartnerCenterSide, store: StateStore) -> dict[str, int]:
    """Referrals changed in the window (or named), plus those the dead letter retries (and the
    referrals linked to the opportunities it retries)."""
    retry: list[str] = []
    docs = _read(job, side, job.since_pc, lambda d: d.get("updatedDateTime"), "pc")
    if not job.named:
        seen = {str(d.get("id")) for d in docs}
        retry = [k for k in _retry_ids(store, job, "partner_center") if k not in seen]
        docs += side.extract(referral_ids=retry) if retry else []
    result = referrals_frame(docs, job.mapping)
    _stage(job, "pc", result)
    write_json(job, "pc_docs", {str(d.get("id")): d for d in docs if d.get("id")})
    bad = set(result.errors["key"]) if len(result.errors) else set()
    # A bad referral that would never sync (Closed and unlinked) is skipped, not failed.
    never = [
        str(d.get("id"))
        for d in docs
        if str(d.get("id")) in bad and d.get("status") == "Closed" and blank(d.get("externalReferenceId"))
    ]
    found = {str(d.get("id")) for d in docs}
    write_json(job, "pc_dead_letter", {"never_sync": never, "gone": [k for k in retry if k not in found]})
    return {"referrals": len(docs), "bad": len(bad)}


def extract_crm(job: SyncJob, side: CrmSide, store: StateStore) -> dict[str, int]:
    """Opportunities changed in the window (or linked to the named referrals), plus those the
    dead letter retries (and the opportunities linked to the referrals it retries)."""
    id_field = crms.get(job.crm).id_field
    retry: list[str] = []
    records = _read(job, side, job.since_crm, compile_path(job.mapping.records["modified_field"]), "crm")
    if not job.named:
        seen = {str(r.get(id_field)) for r in records}
        retry = [k for k in _retry_ids(store, job, "crm") if k not in seen]
        records += [r for r in side.extract(crm_ids=retry) if str(r.get(id_field)) not in seen] if retry else []
    result = crm_frame(records, side.mapping, id_field)  # the side's: choices in this org's values
    _stage(job, "crm", result)
    # Each opportunity's version as read (ETag, SystemModstamp): updates are conditional on it.
    versions = {str(r.get(id_field)): side.version(r) for r in records if r.get(id_field)}
    write_json(job, "crm_versions", {k: v for k, v in versions.items() if v})
    bad = set(result.errors["key"]) if len(result.errors) else set()
    # A bad opportunity that would never sync (unflagged and unlinked) is skipped, not failed.
    flag_field, link_field = job.mapping.records["sync_flag_field"], job.mapping.records["link_field"]
    never = [
        str(r.get(id_field))
        for r in records
        if str(r.get(id_field)) in bad and not _is_flagged(r.get(flag_field)) and blank(r.get(link_field))
    ]
    found = {str(r.get(id_field)).casefold() for r in records}
    gone = [k for k in retry if k.casefold() not in found]
    write_json(job, "crm_dead_letter", {"never_sync": never, "gone": gone})
    return {"opportunities": len(records), "bad": len(bad)}


def fetch_counterparts(job: SyncJob, pc_side: PartnerCenterSide, crm_side: CrmSide, store: StateStore) -> dict:
    """Both sides of every pair this run read: a linked pair (or one named by a record's link
    field) whose other side was not read (outside the window, or an event run) has it read by
    id now, so the merge sees its current values, not the base. Staged with the extracts."""
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    pc_errors = optional_frame(job, "pc_errors", ERROR_COLUMNS)
    crm_errors = optional_frame(job, "crm_errors", ERROR_COLUMNS)
    have_pc = {str(k).casefold() for k in [*pc["referral_id"], *pc_errors["key"]]}
    have_crm = {str(k).casefold() for k in [*crm["crm_id"], *crm_errors["key"]]}
    named_crm = [str(v) for v in pc["crm_ref"] if not blank(v)]
    named_pc = [str(v) for v in crm["referral_ref"] if not blank(v)]
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
        id_field = crms.get(job.crm).id_field
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
