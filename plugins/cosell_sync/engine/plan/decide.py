"""Step 3 of the planner: per field, the three-way merge against the base and the rules on top
of it, as boolean masks over the pairs. Nothing here builds a frame or a Python value per pair
except the stage transitions it checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import FieldMapping
from cosell_sync.engine.plan.pairing import Pairs
from cosell_sync.engine.plan.result import STAGE_TRANSITIONS
from cosell_sync.engine.plan.versions import B, C, P, Versions


@dataclass
class Decision:
    """One field's outcome, per pair."""

    agree: np.ndarray  # both sides hold the same value
    pc_same: np.ndarray  # Partner Center's value is the base
    crm_same: np.ndarray  # the CRM's value is the base
    pc_changed: np.ndarray  # Partner Center's value counts as changed (for this field's direction)
    crm_changed: np.ndarray
    conflict: np.ndarray  # changed on both sides, differently
    pc_wins: np.ndarray  # Partner Center's value wins a conflict
    blocked_terminal: np.ndarray  # a write to a Closed referral, not done
    blocked_transition: np.ndarray  # a stage change Partner Center does not allow, not done
    to_crm: np.ndarray  # writes planned, after the directions of the run and the blocks
    to_pc: np.ndarray


def authority(fm: FieldMapping, pc_newer: np.ndarray) -> np.ndarray:
    """True where Partner Center's value wins a conflict on this field."""
    if fm.direction == "pc_to_crm" or fm.authority == "partner_center":
        return np.ones(len(pc_newer), bool)
    if fm.direction == "crm_to_pc" or fm.authority == "crm":
        return np.zeros(len(pc_newer), bool)
    return pc_newer


def invalid_transitions(v: Versions, asked: np.ndarray, n: int) -> np.ndarray:
    """A mask over the ``n`` pairs: True where the stage write asked at ``asked`` is a
    transition Partner Center does not allow (:data:`STAGE_TRANSITIONS`)."""
    blocked = np.zeros(n, dtype=bool)
    now, now_stages = pd.factorize(v.values(P, asked).astype(str))
    new, new_stages = pd.factorize(v.values(C, asked).astype(str))
    # each (stage now, stage asked) judged once, not once per pair
    table = np.array([[b in STAGE_TRANSITIONS.get(a, ()) for b in new_stages] for a in now_stages], dtype=bool)
    allowed = table.reshape(len(now_stages), len(new_stages))[now, new]
    blocked[asked[~allowed]] = True
    return blocked


def decide(fm: FieldMapping, v: Versions, pairs: Pairs, allow_to_crm: bool, allow_to_pc: bool) -> Decision:
    """The merge of field ``fm``: changed on one side only -> copied to the other; changed on
    both to the same value -> agreed; changed on both differently -> a conflict, won by the
    field's authority; nothing is written against the field's direction or the run's, to a
    Closed referral, or as a stage transition Partner Center refuses."""
    n, has_base = pairs.n, pairs.has_base
    agree = v.same(P, C)
    pc_same, crm_same = v.same(P, B), v.same(C, B)
    pc_changed = ~pc_same | ~has_base
    crm_changed = ~crm_same | ~has_base
    if fm.direction == "pc_to_crm":
        crm_changed = np.zeros(n, dtype=bool)
    elif fm.direction == "crm_to_pc":
        pc_changed = np.zeros(n, dtype=bool)
    conflict = pc_changed & crm_changed & ~agree
    pc_wins = authority(fm, pairs.pc_newer)
    to_crm = (pc_changed & ~crm_changed & ~agree) | (conflict & pc_wins)
    to_pc = (crm_changed & ~pc_changed & ~agree) | (conflict & ~pc_wins)
    if fm.direction == "crm_to_pc":
        to_crm = np.zeros(n, dtype=bool)
    if fm.direction == "pc_to_crm":
        to_pc = np.zeros(n, dtype=bool)

    blocked_terminal = to_pc & pairs.pc_closed
    if fm.name == "stage":
        blocked_transition = invalid_transitions(v, np.flatnonzero(to_pc & ~pairs.pc_closed), n)
    else:
        blocked_transition = np.zeros(n, dtype=bool)
    to_crm &= allow_to_crm
    to_pc &= allow_to_pc & ~(blocked_terminal | blocked_transition)
    return Decision(
        agree=agree,
        pc_same=pc_same,
        crm_same=crm_same,
        pc_changed=pc_changed,
        crm_changed=crm_changed,
        conflict=conflict,
        pc_wins=pc_wins,
        blocked_terminal=blocked_terminal,
        blocked_transition=blocked_transition,
        to_crm=to_crm,
        to_pc=to_pc,
    )
