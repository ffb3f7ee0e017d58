"""The planner's steps in order: :func:`plan`."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import SyncMapping
from cosell_sync.engine.plan.changes import Writes, blocked_skips, change_frame, field_changes, field_conflicts
from cosell_sync.engine.plan.creates import creates
from cosell_sync.engine.plan.decide import decide
from cosell_sync.engine.plan.new_base import idle_skips, new_base, settle
from cosell_sync.engine.plan.pairing import pair
from cosell_sync.engine.plan.result import (
    CHANGE_COLUMNS,
    CONFLICT_COLUMNS,
    DIRECTIONS,
    SKIP_COLUMNS,
    Plan,
    empty_frame,
)
from cosell_sync.engine.plan.versions import versions


def plan(
    pc: pd.DataFrame,
    crm: pd.DataFrame,
    links: pd.DataFrame,
    mapping: SyncMapping,
    *,
    directions: Collection[str] = DIRECTIONS,
) -> Plan:
    """Plan one run.

    ``pc``: canonical referral rows (``referral_id``, ``crm_ref``, ``status``, ``updated_at``, ...);
    ``crm``: canonical CRM rows (``crm_id``, ``referral_ref``, ``sync_flag``, ``closed``,
    ``modified_at``, ...); ``links``: ``referral_id``, ``crm_id``, ``base`` (dict), ``synced_at``.
    Rows of a linked pair may come from one side only: the other side is then taken to be
    unchanged since the last sync.
    """
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown direction(s): {sorted(unknown)}")
    fields = list(mapping.fields)
    synced = mapping.synced_fields()
    allow_to_crm = "pc_to_crm" in directions
    allow_to_pc = "crm_to_pc" in directions
    if not len(links):
        links = empty_frame(["referral_id", "crm_id", "base", "synced_at"])

    # 1. pairing: known links, plus links recovered from the records themselves
    pairs = pair(pc, crm, links, synced)

    # 2-5. field by field: versions -> decision -> changes, conflicts, blocked writes -> settled values.
    # Each field's three versions are compared as whole columns; only the values a run writes
    # or reports become Python objects.
    skips: list[pd.DataFrame] = []
    changes: list[Writes] = []
    conflicts: list[pd.DataFrame] = []
    moved = ~pairs.has_base
    touched = np.zeros(pairs.n, dtype=bool)
    settled_values: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # field -> (pairs, values) not the base's
    for fm in synced:
        v = versions(
            pairs.link_base.get(fm.name),
            pairs.link_pos,
            pc.get(fm.name),
            pairs.pc_pos,
            crm.get(fm.name),
            pairs.crm_pos,
            pairs.has_base,
        )
        d = decide(fm, v, pairs, allow_to_crm, allow_to_pc)
        if allow_to_pc:
            skips.extend(blocked_skips(fm, v, pairs, d))
        touched |= d.to_crm | d.to_pc
        changes.extend(field_changes(fm, v, pairs, d))
        if (found := field_conflicts(fm, v, pairs, d)) is not None:
            conflicts.append(found)
        rows, values, field_moved = settle(v, d, pairs.n)
        moved |= field_moved
        settled_values[fm.name] = (rows, values)
        del v, d

    changes_planned = change_frame(changes, pairs)
    conflict_frame = pd.concat(conflicts, ignore_index=True) if conflicts else empty_frame(CONFLICT_COLUMNS)
    if (idle := idle_skips(pairs, touched)) is not None:
        skips.append(idle)
    base_frame = new_base(pairs, settled_values, moved)

    # 6. records with no link: creates, or skips with their reason
    crm_creates, pc_creates, lone_skips = creates(pc, crm, pairs, fields, allow_to_crm, allow_to_pc)
    skips.extend(lone_skips)

    skip_frame = pd.concat(skips, ignore_index=True) if skips else empty_frame(SKIP_COLUMNS)
    return Plan(
        crm_creates=crm_creates,
        pc_creates=pc_creates,
        changes=in_order(changes_planned, CHANGE_COLUMNS),
        conflicts=in_order(conflict_frame, CONFLICT_COLUMNS),
        skips=in_order(skip_frame, SKIP_COLUMNS),
        new_base=base_frame,
        recovered_links=pairs.recovered.reset_index(drop=True),
    )


def in_order(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame[columns]``, without copying every column when they are in that order already."""
    return frame if list(frame.columns) == columns else frame[columns]
