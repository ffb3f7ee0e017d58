"""``cosell-sync preview``: what one opportunity or referral would become on the other side,
writing nothing.

It runs the sync's own steps, restricted to the one record: the pipeline's extract (the record,
and its linked counterpart) -> normalize -> plan (against the links' bases in the state DB,
read only) into a staging folder of its own that is deleted afterwards; then the sides'
own preparation of each write, without sending it: the CRM side's prepared rows (Salesforce:
the Opportunity's values as they would be sent), the Partner Center side's new referral
document or JSON-Patch operations. No lease is taken, nothing is committed, no API write is
made (the sides' write steps are skipped, as in a dry run).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pandas as pd

from cosell_sync import crms
from cosell_sync.sides.base import missing, plain
from cosell_sync.sides.crm import NEW_ID

MATCH_RULES = {"account": "by name + postal code, case- and space-insensitive", "contact": "by e-mail"}


def _plain(value: Any) -> Any:
    """A frame cell as JSON: None for NaN/NA, ISO text for dates."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if not isinstance(value, str) and missing(value):
        return None
    value = plain(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")] if len(frame) else []


def _crm_fields(side: Any, row: Any) -> dict[str, Any]:
    """The opportunity's own fields as the CRM side prepared them (Salesforce: its payload, as
    sent), else the mapping's CRM names of the canonical values it would write."""
    if row.payload:
        return {k: _plain(v) for k, v in row.payload.items()}
    return {side.mapping.fields[k].crm: _plain(v) for k, v in row.written.items() if k in side.opportunity_level()}


def _related(side: Any, row: Any) -> dict[str, Any]:
    """The account and contact a new opportunity gets: the one matched (its id), or the values it
    would be created with (as the side recorded them instead of creating it)."""
    out: dict[str, Any] = {}
    names = [n for n in side.mapping.fields if n not in side.opportunity_level()]
    for kind, held in (("account", row.account_id), ("contact", row.contact_id)):
        prefixes = (f"{side.mapping.records[kind]}.".lower(), f"{kind}.")
        fields = {
            side.mapping.fields[n].crm: _plain(row.values[n])
            for n in names
            if side.mapping.fields[n].crm.lower().startswith(prefixes) and _plain(row.values.get(n)) is not None
        }
        if not fields and held is None:
            continue
        if held == NEW_ID:
            out[kind] = {"action": "create", "rule": MATCH_RULES[kind], "values": fields}
        else:
            out[kind] = {"action": "match", "rule": MATCH_RULES[kind], "id": held, "values": fields}
    return out


def build_preview(job: Any, store: Any, pc_side: Any, crm_side: Any) -> dict[str, Any]:
    """Extract and plan ``job`` (a dry run of named records), then every write it would make,
    prepared by the sides and not sent."""
    from cosell_sync.pipeline import extract_crm, extract_partner_center, load_plan, plan_run, read_frame, read_json
    from cosell_sync.pipeline.load import crm_link_stamps, referral_stamps

    extract_partner_center(job, pc_side, store)
    extract_crm(job, crm_side, store)
    plan_run(job, store, pc_side, crm_side)
    the_plan = load_plan(job)
    docs = read_json(job, "pc_docs")
    ctx = job.ctx
    out: dict[str, Any] = {"crm": job.crm, "writes": [], "skips": [], "errors": [], "conflicts": []}
    creates = crm_side.pending_creates(the_plan.crm_creates, ctx)
    crm_side.previewed = []  # the accounts and contacts are matched (read), those to create only recorded
    matching = (crm_side.find_existing, crm_side.ensure_accounts, crm_side.ensure_contacts)
    crm_side.run_steps(creates, ctx, matching, "create")
    for row in creates:
        out["writes"].append(
            {
                "target": crm_side.crm,
                "action": "create",
                "referral_id": row.referral_id,
                "fields": _crm_fields(crm_side, row),
                "link": {crm_side.mapping.records["link_field"]: row.referral_id},
                **_related(crm_side, row),
                "adopted": row.adopted,
                "error": row.error[0] if row.error else None,
            }
        )
    versions = read_json(job, "crm_versions")
    for row in crm_side.pending_updates(the_plan.updates("crm"), versions):
        out["writes"].append(
            {
                "target": crm_side.crm,
                "action": row.action,
                "referral_id": row.referral_id,
                "crm_id": row.crm_id,
                "fields": _crm_fields(crm_side, row),
                "error": row.error[0] if row.error else None,
            }
        )
    for item in _records(the_plan.pc_creates):
        out["writes"].append(
            {
                "target": "partner_center",
                "action": "create",
                "crm_id": item["crm_id"],
                "referral": _plain(pc_side.referral_document(item)),
            }
        )
    for item in _records(the_plan.updates("partner_center")):
        current = docs.get(str(item["referral_id"])) or {}
        out["writes"].append(
            {
                "target": "partner_center",
                "action": "update",
                "referral_id": item["referral_id"],
                "crm_id": item["crm_id"],
                "patch": _plain(pc_side.operations(current, item["fields"])),
            }
        )
    for stamp in _records(crm_link_stamps(job, the_plan, set())):
        out["writes"].append({"target": crm_side.crm, "action": "link", **stamp})
    for stamp in _records(referral_stamps(job, the_plan, docs)):
        out["writes"].append({"target": "partner_center", "action": "link", **stamp})
    out["skips"] = [s for s in _records(the_plan.skips) if s.get("reason") not in ("no_change", "echo")]
    out["unchanged"] = int(the_plan.skips["reason"].isin(["no_change", "echo"]).sum()) if len(the_plan.skips) else 0
    out["conflicts"] = _records(the_plan.conflicts)
    for name in ("pc_errors", "crm_errors", "plan_errors"):
        try:
            out["errors"] += _records(read_frame(job, name))
        except FileNotFoundError:
            continue
    out["found"] = {"referrals": len(read_frame(job, "pc")), "opportunities": len(read_frame(job, "crm"))}
    return out


def preview_record(crm: str, *, referral_id: str | None = None, opportunity_id: str | None = None) -> dict[str, Any]:
    """The preview of one record through the sides a DAG run builds (its mapping and connections)."""
    from airflow.sdk import ObjectStoragePath

    from cosell_sync.cli.checks import mapping_of
    from cosell_sync.dag_factory import check_mapping, sync_sides
    from cosell_sync.pipeline import SyncJob
    from cosell_sync.state import SCHEMA_VERSION, StateStore

    mapping = mapping_of(crm)
    choices = check_mapping(crm, mapping)  # the run's own start: the org's choice values
    pc_side, crm_side = sync_sides(crm, mapping, choices or None)
    folder = Path(tempfile.mkdtemp(prefix="cosell-preview-"))
    store = StateStore.from_airflow()
    try:
        if store.schema_version() != SCHEMA_VERSION:
            raise click.ClickException(
                "the state DB is not migrated (its links are the bases a preview plans against): "
                "run `cosell-sync check --migrate-state`"
            )
        job = SyncJob(
            crm=crm,
            dag_id=f"cosell_sync_{crm}",
            run_id=f"preview__{datetime.now(UTC):%Y%m%dT%H%M%S}",
            mapping=mapping,
            staging=ObjectStoragePath(f"file://{folder}"),
            referral_ids=[referral_id] if referral_id else None,
            crm_ids=[opportunity_id] if opportunity_id else None,
            dry_run=True,
        )
        doc = build_preview(job, store, pc_side, crm_side)
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
    named = doc["found"]["referrals"] + len(doc["errors"]) if referral_id else doc["found"]["opportunities"]
    if not named and not doc["errors"]:
        where = "Partner Center has no referral" if referral_id else f"{crms.label(crm)} has no opportunity"
        raise click.ClickException(f"{where} {referral_id or opportunity_id} (or the connection cannot read it)")
    return doc


def render(doc: dict[str, Any], what: str) -> list[str]:
    """The preview in words, one block per write."""
    label = crms.label(doc["crm"])
    found = doc["found"]
    lines = [f"Preview of {what} ({found['referrals']} referral(s), {found['opportunities']} opportunity(ies) read)"]
    lines.append("Nothing was written.")
    for write in doc["writes"]:
        target = "Partner Center" if write["target"] == "partner_center" else label
        ids = ", ".join(f"{k} {write[k]}" for k in ("referral_id", "crm_id") if write.get(k))
        lines += ["", f"{write['action'].upper()} in {target}" + (f" ({ids})" if ids else "")]
        body = write.get("fields") or write.get("referral") or write.get("patch")
        if body is not None:
            lines += ["  " + line for line in json.dumps(body, indent=2, ensure_ascii=False, default=str).splitlines()]
        for kind in ("account", "contact"):
            if write.get(kind):
                related = write[kind]
                if related["action"] == "match":
                    lines.append(f"  {kind}: matches the existing {related['id']} ({related['rule']})")
                else:
                    shown = json.dumps(related["values"], ensure_ascii=False)
                    lines.append(f"  {kind}: none matches ({related['rule']}): created with {shown}")
        if write.get("adopted"):
            lines.append("  an opportunity already holds this referral id: it is adopted (linked), not written")
        if write.get("error"):
            lines.append(f"  would fail: {write['error']}")
    if not doc["writes"]:
        lines += ["", "No write: the record is in step, or skipped (below)."]
    from cosell_sync.pipeline import describe_skip

    for skip in doc["skips"]:
        ids = skip.get("referral_id") or skip.get("crm_id")
        detail = f" ({skip['field']}: {skip['detail']})" if skip.get("field") else ""
        reason = describe_skip(f"{skip['side']}.{skip['reason']}", 1)
        lines.append(f"SKIP {ids}: {reason}{detail}")
    for error in doc["errors"]:
        lines.append(f"ERROR {error}")
    for conflict in doc["conflicts"]:
        lines.append(f"CONFLICT {conflict['field']}: {conflict['winner']} wins ({conflict['chosen']})")
    return lines


@click.command()
@click.option("--crm", type=click.Choice(list(crms.NAMES)), required=True, help="The CRM of the sync to preview.")
@click.option("--opportunity", "opportunity_id", default=None, help="An opportunity id: what Partner Center gets.")
@click.option("--referral", "referral_id", default=None, help="A referral id: what the CRM gets.")
@click.option("--json", "as_json", is_flag=True, help="Print the preview as JSON.")
def preview(crm: str, opportunity_id: str | None, referral_id: str | None, as_json: bool) -> None:
    """Show what one opportunity or referral would become on the other side; writes nothing."""
    if bool(opportunity_id) == bool(referral_id):
        raise click.UsageError("give exactly one of --opportunity ID or --referral ID")
    from airflow.sdk.exceptions import AirflowNotFoundException

    from cosell_sync.errors import CosellError

    try:
        doc = preview_record(crm, referral_id=referral_id, opportunity_id=opportunity_id)
    except (CosellError, ValueError, AirflowNotFoundException) as exc:  # our errors never carry a secret
        raise click.ClickException(f"{exc} (run `cosell-sync check --crm {crm}`)") from None
    if as_json:
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
        return
    what = f"referral {referral_id}" if referral_id else f"opportunity {opportunity_id}"
    for line in render(doc, what):
        click.echo(line)
