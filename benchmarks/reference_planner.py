"""A plain Python, record-by-record three-way merge: the baseline the vectorized planner is
timed against, and an oracle the tests compare it with on random data.

It implements the same merge rules as :func:`cosell_sync.engine.plan.plan` for linked
pairs (one-side change, agreement, conflict by authority, terminal referral, stage
transitions) and the create rules for unlinked records.
"""

from __future__ import annotations

import math
from typing import Any

from cosell_sync.engine.mapping import KEEP, SyncMapping
from cosell_sync.engine.plan import OPEN_REFERRAL, STAGE_TRANSITIONS


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a: Any, b: Any) -> bool:
    return (_missing(a) and _missing(b)) or a == b


def reference_plan(
    pc: list[dict[str, Any]], crm: list[dict[str, Any]], links: list[dict[str, Any]], mapping: SyncMapping
) -> dict[str, Any]:
    """Returns {"changes": set of (referral_id, crm_id, target, field, new), "crm_creates": set,
    "pc_creates": set, "conflicts": set of (referral_id, field, winner)}."""
    pc_by = {r["referral_id"]: r for r in pc}
    crm_by = {r["crm_id"]: r for r in crm}
    changes: set[tuple[Any, ...]] = set()
    conflicts: set[tuple[Any, ...]] = set()
    linked_refs, linked_crm = set(), set()
    for link in links:
        rid, cid = link["referral_id"], link["crm_id"]
        # a link's base: a dict, or (columnar links) its base.<field> keys
        base = (link["base"] or {}) if "base" in link else {k[5:]: v for k, v in link.items() if k.startswith("base.")}
        linked_refs.add(rid)
        linked_crm.add(cid)
        p_row, c_row = pc_by.get(rid), crm_by.get(cid)
        if p_row is None and c_row is None:
            continue
        pc_closed = p_row["status"] == "Closed" if p_row is not None else base.get("stage") in ("won", "lost")
        stage_now = p_row["stage"] if p_row is not None else base.get("stage")
        pc_newer = (
            p_row is not None
            and c_row is not None
            and p_row["updated_at"] is not None
            and c_row["modified_at"] is not None
            and p_row["updated_at"] > c_row["modified_at"]
        )
        for fm in mapping.synced_fields():
            b = base.get(fm.name)
            p = p_row[fm.name] if p_row is not None else b
            c = c_row[fm.name] if c_row is not None else b
            p = b if p == KEEP else p
            c = b if c == KEEP else c
            pc_changed = not _same(p, b)
            crm_changed = not _same(c, b)
            if fm.direction == "pc_to_crm":
                crm_changed = False
            if fm.direction == "crm_to_pc":
                pc_changed = False
            agree = _same(p, c)
            if fm.direction == "pc_to_crm" or fm.authority == "partner_center":
                pc_wins = True
            elif fm.direction == "crm_to_pc" or fm.authority == "crm":
                pc_wins = False
            else:
                pc_wins = pc_newer
            conflict = pc_changed and crm_changed and not agree
            to_crm = (pc_changed and not crm_changed and not agree) or (conflict and pc_wins)
            to_pc = (crm_changed and not pc_changed and not agree) or (conflict and not pc_wins)
            if fm.direction == "crm_to_pc":
                to_crm = False
            if fm.direction == "pc_to_crm":
                to_pc = False
            if to_pc and pc_closed:
                to_pc = False
            if to_pc and fm.name == "stage" and c not in STAGE_TRANSITIONS.get(str(stage_now), set()):
                to_pc = False
            if conflict:
                conflicts.add((rid, fm.name, "partner_center" if pc_wins else "crm"))
            if to_crm:
                changes.add((rid, cid, "crm", fm.name, p))
            if to_pc:
                changes.add((rid, cid, "partner_center", fm.name, c))
    crm_creates = {
        r["referral_id"]
        for r in pc
        if r["referral_id"] not in linked_refs and _missing(r["crm_ref"]) and r["status"] in OPEN_REFERRAL
    }
    pc_creates = {
        r["crm_id"]
        for r in crm
        if r["crm_id"] not in linked_crm and _missing(r["referral_ref"]) and r["sync_flag"] and not r["closed"]
    }
    return {"changes": changes, "crm_creates": crm_creates, "pc_creates": pc_creates, "conflicts": conflicts}
