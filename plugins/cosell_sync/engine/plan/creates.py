"""Step 6 of the planner: records with no link, as creates on the other side or skips with their
reason. Only New or Active referrals create opportunities; only flagged, open opportunities
create referrals; a record that already names the other side never creates a duplicate."""

from __future__ import annotations

import pandas as pd

from cosell_sync.engine.plan.columns import marked
from cosell_sync.engine.plan.pairing import Pairs
from cosell_sync.engine.plan.result import CRM, OPEN_REFERRAL, PC


def _skips(side: str, ids: pd.Series, reason: str) -> pd.DataFrame:
    """Skips of unlinked records of ``side``, by their ids (the other side's id: None)."""
    referral_ids, crm_ids = (ids, None) if side == PC else (None, ids)
    return pd.DataFrame(
        {"side": side, "referral_id": referral_ids, "crm_id": crm_ids, "reason": reason, "field": None, "detail": None}
    )


def creates(
    pc: pd.DataFrame,
    crm: pd.DataFrame,
    pairs: Pairs,
    fields: list[str],
    allow_to_crm: bool,
    allow_to_pc: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]]:
    """``(crm_creates, pc_creates, skips)``: the referrals to create opportunities from
    (``referral_id`` + canonical values), the opportunities to create referrals from
    (``crm_id`` + canonical values), and the unlinked records left alone, with their reason."""
    skips: list[pd.DataFrame] = []
    lone_pc = pc[~marked(len(pc), pairs.pc_pos_all)]
    lone_crm = crm[~marked(len(crm), pairs.crm_pos_all)]
    pc_elsewhere = lone_pc["crm_ref"].notna()
    pc_open = lone_pc["status"].isin(OPEN_REFERRAL)
    crm_create_mask = ~pc_elsewhere & pc_open & allow_to_crm
    crm_creates = lone_pc.loc[crm_create_mask, ["referral_id", *fields]].reset_index(drop=True)
    for mask, reason in ((pc_elsewhere, "linked_elsewhere"), (~pc_elsewhere & ~pc_open, "closed_unlinked")):
        if mask.any():
            skips.append(_skips(PC, lone_pc.loc[mask, "referral_id"], reason))
    crm_elsewhere = lone_crm["referral_ref"].notna()
    flagged = lone_crm["sync_flag"].astype(bool)
    crm_open = ~lone_crm["closed"].astype(bool)
    pc_create_mask = ~crm_elsewhere & flagged & crm_open & allow_to_pc
    pc_creates = lone_crm.loc[pc_create_mask, ["crm_id", *fields]].reset_index(drop=True)
    for mask, reason in (
        (crm_elsewhere, "linked_elsewhere"),
        (~crm_elsewhere & ~flagged, "not_flagged"),
        (~crm_elsewhere & flagged & ~crm_open, "closed_unlinked"),
    ):
        if mask.any():
            skips.append(_skips(CRM, lone_crm.loc[mask, "crm_id"], reason))
    return crm_creates, pc_creates, skips
