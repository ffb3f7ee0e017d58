"""Commit: the run's record step: links, audit, dead letter, run summary and watermarks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import KEEP
from cosell_sync.engine.normalize import ERROR_COLUMNS, concat_errors
from cosell_sync.engine.plan import Plan, with_base_dicts
from cosell_sync.pipeline import lease
from cosell_sync.pipeline.extract import dead_letter_key, dead_letter_notes, dead_rows
from cosell_sync.pipeline.job import SyncJob
from cosell_sync.pipeline.load import WRITES_LEDGER
from cosell_sync.pipeline.plan import load_plan
from cosell_sync.pipeline.report import WRITE_KINDS, build_report
from cosell_sync.pipeline.staging import optional_frame, read_frame, read_json
from cosell_sync.sides.base import plain, results_frame
from cosell_sync.state import StateStore

AUDITED_SKIPS = {"terminal_referral", "invalid_transition", "linked_elsewhere"}


def commit(job: SyncJob, store: StateStore) -> dict[str, Any]:
    """Links, audit, dead letter, the run summary and watermarks, in one transaction; returns the report."""
    the_plan = load_plan(job)
    result_cols = list(results_frame([]).columns)
    crm_results = optional_frame(job, "crm_results", result_cols)
    pc_results = optional_frame(job, "pc_results", result_cols)
    link_results = optional_frame(job, "link_results", result_cols)
    stamp_results = optional_frame(job, "pc_link_results", result_cols)
    pc, crm = read_frame(job, "pc"), read_frame(job, "crm")
    errors = concat_errors(
        [optional_frame(job, name, ERROR_COLUMNS) for name in ("pc_errors", "crm_errors", "plan_errors")]
    )
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
    crm_created = [r for r in crm_results.itertuples() if r.action == "create" and r.ok and r.crm_id]
    pc_created = [r for r in pc_results.itertuples() if r.action == "create" and r.ok and r.referral_id]
    pc_values = _values_by_key(pc_rows, fields, {r.referral_id for r in crm_created})
    crm_values = _values_by_key(crm_rows, fields, {r.crm_id for r in pc_created})
    for r in crm_created:
        if r.referral_id in pc_values:
            # The base is what the new opportunity holds (r.fields: a value the CRM filled in,
            # such as Salesforce's required CloseDate, included), over the referral's values.
            base_values = pc_values[r.referral_id] | _written(r.fields, fields)
            created_links.append({"referral_id": r.referral_id, "crm_id": r.crm_id, "base": base_values})
    for r in pc_created:
        if r.crm_id in crm_values:
            # The base is what the new referral holds (r.fields), over the CRM row's values.
            base_values = crm_values[r.crm_id] | _written(r.fields, fields)
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
        move_watermarks=not job.backfill and not job.named,
        lease_epoch=job.lease_epoch,  # still ours, checked in the commit's transaction
    )
    if job.lease_epoch is not None:
        lease.release(job, store)  # the base is committed: the next run may read it
    return report


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


def _values_by_key(rows: pd.DataFrame, fields: list[str], keys: set[Any]) -> dict[Any, dict[str, Any]]:
    """Canonical values for a link's base, of the rows (indexed by their id) with these ids, in
    one pass (a ``.loc`` per row was a fifth of the commit); "no opinion" (KEEP) is stored as
    nothing, a field the rows lack as None."""
    wanted = rows[rows.index.isin(list(keys))] if keys else rows.iloc[:0]
    wanted = wanted[~wanted.index.duplicated()]
    columns = [f for f in fields if f in wanted.columns]
    out: dict[Any, dict[str, Any]] = {}
    for key, cells in zip(wanted.index, wanted[columns].itertuples(index=False, name=None), strict=True):
        values: dict[str, Any] = dict.fromkeys(fields)
        for name, value in zip(columns, cells, strict=True):
            values[name] = None if value == KEEP else plain(value)
        out[key] = values
    return out


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
    notes = {"pc_to_crm": dead_letter_notes(job, "pc"), "crm_to_pc": dead_letter_notes(job, "crm")}
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
    for row in dead_rows(store, job):
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
