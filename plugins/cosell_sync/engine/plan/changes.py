"""Step 4 of the planner: what one field's decision writes and reports, as frames: the changes
(one row per field to write), the conflicts, and the writes the rules blocked (skips). Only the
values written or reported become Python objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import FieldMapping
from cosell_sync.engine.plan.decide import Decision
from cosell_sync.engine.plan.pairing import Pairs
from cosell_sync.engine.plan.result import CHANGE_COLUMNS, CRM, PC, empty_frame
from cosell_sync.engine.plan.versions import B, C, P, Versions


def blocked_skips(fm: FieldMapping, v: Versions, pairs: Pairs, d: Decision) -> list[pd.DataFrame]:
    """The CRM's writes to Partner Center that the rules blocked: to a Closed referral
    (``terminal_referral``) or an invalid stage transition (``invalid_transition``)."""
    out = []
    for mask, reason in ((d.blocked_terminal, "terminal_referral"), (d.blocked_transition, "invalid_transition")):
        if mask.any():
            rows = np.flatnonzero(mask)
            detail = (
                "stage "
                + v.values(P, rows).astype(str).astype(object)
                + " -> "
                + v.values(C, rows).astype(str).astype(object)
                if fm.name == "stage"
                else "the referral is Closed"
            )
            out.append(
                pd.DataFrame(
                    {
                        "side": CRM,
                        "referral_id": pairs.referral_ids[rows],
                        "crm_id": pairs.crm_ids[rows],
                        "reason": reason,
                        "field": fm.name,
                        "detail": detail,
                    }
                )
            )
    return out


@dataclass
class Writes:
    """One field's writes to one side: the pairs at ``rows``, their values there now (``old``) and
    to write (``new``), and which of them settle a conflict."""

    target: str
    field: str
    rows: np.ndarray
    old: np.ndarray
    new: np.ndarray
    conflict: np.ndarray


def field_changes(fm: FieldMapping, v: Versions, pairs: Pairs, d: Decision) -> list[Writes]:
    """The writes of field ``fm``: to the CRM, then to Partner Center (:func:`change_frame` makes
    them rows)."""
    out = []
    for mask, target, old, new in ((d.to_crm, CRM, C, P), (d.to_pc, PC, P, C)):
        if mask.any():
            rows = np.flatnonzero(mask)
            out.append(Writes(target, fm.name, rows, v.values(old, rows), v.values(new, rows), d.conflict[rows]))
    return out


def change_frame(writes: list[Writes], pairs: Pairs) -> pd.DataFrame:
    """The changes (``CHANGE_COLUMNS``), one row per field to write, in the order of ``writes``:
    built once for every field, so each column is one array and the ids are taken once."""
    if not writes:
        return empty_frame(CHANGE_COLUMNS)
    counts = [len(w.rows) for w in writes]
    rows = np.concatenate([w.rows for w in writes])
    # a write is for the target's side unless it settles a conflict
    cause = np.repeat(np.array([PC if w.target == CRM else CRM for w in writes], dtype=object), counts)
    frame = pd.DataFrame(
        dtype=object,
        data={
            "target": np.repeat(np.array([w.target for w in writes], dtype=object), counts),
            "field": np.repeat(np.array([w.field for w in writes], dtype=object), counts),
            "old": np.concatenate([w.old for w in writes]),
            "new": np.concatenate([w.new for w in writes]),
            "reason": np.where(np.concatenate([w.conflict for w in writes]), "conflict", cause),
        },
    )
    frame.insert(0, "referral_id", pairs.referral_ids[rows])  # ids keep their (Arrow) type
    frame.insert(1, "crm_id", pairs.crm_ids[rows])
    return frame


def field_conflicts(fm: FieldMapping, v: Versions, pairs: Pairs, d: Decision) -> pd.DataFrame | None:
    """The conflicts of field ``fm`` (``CONFLICT_COLUMNS``), with the winner and its value."""
    if not d.conflict.any():
        return None
    rows = np.flatnonzero(d.conflict)
    pc_value, crm_value = v.values(P, rows), v.values(C, rows)
    return pd.DataFrame(
        dtype=object,
        data={
            "referral_id": pairs.referral_ids[rows],
            "crm_id": pairs.crm_ids[rows],
            "field": fm.name,
            "base": v.values(B, rows),
            "pc_value": pc_value,
            "crm_value": crm_value,
            "winner": np.where(d.pc_wins[rows], PC, CRM),
            "chosen": np.where(d.pc_wins[rows], pc_value, crm_value),
        },
    )
