"""Report: what a run did, counted from its per-record results, and in words for its note."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cosell_sync import crms
from cosell_sync.engine.plan import Plan

# What a write did: the report's counts per target (asked_microsoft: co-sell requests POSTed).
WRITE_KINDS = ("created", "updated", "linked", "asked_microsoft")


def write_counts(results: pd.DataFrame, stamps: pd.DataFrame) -> dict[str, int]:
    """The records a load actually wrote, from its per-record results: created, updated, linked."""
    asked = results["asked_microsoft"].map(lambda v: v is True) if "asked_microsoft" in results else None
    return {
        "created": _written_count(results, ("create",)),
        "updated": _written_count(results, ("update", "win", "lose")),
        "linked": _written_count(stamps, ("link", "update")) if len(stamps) else 0,
        "asked_microsoft": int(asked.sum()) if asked is not None else 0,  # co-sell requests POSTed
    }


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
        out = write_counts(results, stamps)
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
    crm_label = crms.label(crm, "CRM")
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
