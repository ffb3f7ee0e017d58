"""The planner: a pure function from both sides' rows and the last synced values to the
operations a run performs. Whole frames in, whole frames out: it loops over the mapped
fields (a handful), never over records.

Three-way merge per field, against the *base* (the canonical value last synced):

* changed on one side only -> copied to the other side;
* changed on both sides to the same value -> agreed, nothing to write;
* changed on both sides differently -> a conflict, resolved by the field's authority
  (``partner_center``, ``crm``, or ``newest`` by modification time) and reported;
* unchanged, or changed back to what we wrote -> nothing (an echo of our own write).

Rules on top (SPEC §5): only flagged, open opportunities create referrals; only New or
Active referrals create opportunities; a Closed referral is terminal (nothing is written
to it); Partner Center status transitions are checked before a write is planned; a
record already linked elsewhere never creates a duplicate.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import pandas as pd

from cosell_sync.engine.mapping import KEEP, FieldMapping, SyncMapping

PC, CRM = "partner_center", "crm"
DIRECTIONS = ("pc_to_crm", "crm_to_pc")
OPEN_REFERRAL = ("New", "Active")
STAGE_TRANSITIONS = {"new": {"new", "active", "won", "lost"}, "active": {"active", "won", "lost"}}
CHANGE_COLUMNS = ["referral_id", "crm_id", "target", "field", "old", "new", "reason"]
CONFLICT_COLUMNS = ["referral_id", "crm_id", "field", "base", "pc_value", "crm_value", "winner", "chosen"]
SKIP_COLUMNS = ["side", "referral_id", "crm_id", "reason", "field", "detail"]
ECHO_TOLERANCE = pd.Timedelta(seconds=2)


@dataclass
class Plan:
    crm_creates: pd.DataFrame  # referral_id + canonical values: a new opportunity per row
    pc_creates: pd.DataFrame  # crm_id + canonical values: a new referral per row
    changes: pd.DataFrame  # long form: one row per field to write (CHANGE_COLUMNS)
    conflicts: pd.DataFrame  # CONFLICT_COLUMNS
    skips: pd.DataFrame  # SKIP_COLUMNS
    new_base: pd.DataFrame  # referral_id, crm_id, base (dict) for every linked pair examined
    accounts: pd.DataFrame  # accounts the CRM creates need: match_key + customer fields
    contacts: pd.DataFrame  # contacts they need: email + contact fields + account match_key
    recovered_links: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["referral_id", "crm_id"]))

    def updates(self, target: str) -> pd.DataFrame:
        """Per record: the fields to write to ``target`` (``partner_center`` or ``crm``)."""
        rows = self.changes[self.changes["target"] == target]
        if rows.empty:
            return pd.DataFrame(columns=["referral_id", "crm_id", "fields"])
        grouped = rows.groupby(["referral_id", "crm_id"], sort=False)
        return (
            grouped.apply(lambda g: dict(zip(g["field"], g["new"], strict=True)), include_groups=False)
            .rename("fields")
            .reset_index()
        )

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for direction, target, creates in (("pc_to_crm", CRM, self.crm_creates), ("crm_to_pc", PC, self.pc_creates)):
            updated = self.changes[self.changes["target"] == target][["referral_id", "crm_id"]].drop_duplicates()
            conflicts = self.conflicts[self.conflicts["winner"] == (PC if target == CRM else CRM)]
            out[direction] = {
                "create": len(creates),
                "update": len(updated),
                "conflicts": len(conflicts),
                "skipped": int((self.skips["side"] == (PC if target == CRM else CRM)).sum()),
            }
        out["unchanged"] = {"pairs": int(self.skips["reason"].isin(["no_change", "echo"]).sum())}
        return out


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    both_missing = a.isna() & b.isna()
    equal = (a == b).fillna(False).astype(bool)
    return equal | both_missing


def _frame(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


def _prefixed(frame: pd.DataFrame, prefix: str, fields: list[str], key: str) -> pd.DataFrame:
    cols = [key, *[c for c in frame.columns if c not in (key, *fields)], *fields]
    out = frame[cols].copy()
    out.columns = [key, *[f"{prefix}{c}" for c in cols[1:]]]
    return out


def _match_key(name: pd.Series, postal: pd.Series) -> pd.Series:
    def norm(s: pd.Series) -> pd.Series:
        return s.fillna("").astype(str).str.lower().str.replace(r"\s+", "", regex=True)

    return norm(name) + "|" + norm(postal)


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
    skips: list[pd.DataFrame] = []

    # -- pairs: known links, plus links recovered from the records themselves ---------------
    links = (
        links[["referral_id", "crm_id", "base", "synced_at"]]
        if len(links)
        else _frame(["referral_id", "crm_id", "base", "synced_at"])
    )
    linked_refs = set(links["referral_id"])
    linked_crm = set(links["crm_id"])
    pc_ids, crm_ids = set(pc["referral_id"]), set(crm["crm_id"])
    from_pc = pc[pc["crm_ref"].notna() & ~pc["referral_id"].isin(linked_refs) & pc["crm_ref"].isin(crm_ids)]
    from_crm = crm[crm["referral_ref"].notna() & ~crm["crm_id"].isin(linked_crm) & crm["referral_ref"].isin(pc_ids)]
    recovered = pd.concat(
        [
            pd.DataFrame({"referral_id": from_pc["referral_id"], "crm_id": from_pc["crm_ref"]}),
            pd.DataFrame({"referral_id": from_crm["referral_ref"], "crm_id": from_crm["crm_id"]}),
        ],
        ignore_index=True,
    ).drop_duplicates()
    recovered = recovered[~recovered["referral_id"].isin(linked_refs) & ~recovered["crm_id"].isin(linked_crm)]
    recovered = recovered.drop_duplicates("referral_id").drop_duplicates("crm_id")
    all_links = pd.concat([links, recovered.assign(base=None, synced_at=pd.NaT)], ignore_index=True)

    pairs = all_links.merge(_prefixed(pc, "p_", fields, "referral_id"), on="referral_id", how="left")
    pairs = pairs.merge(_prefixed(crm, "c_", fields, "crm_id"), on="crm_id", how="left")
    pairs = pairs[pairs["referral_id"].isin(pc_ids) | pairs["crm_id"].isin(crm_ids)].reset_index(drop=True)
    has_pc = pairs["referral_id"].isin(pc_ids)
    has_crm = pairs["crm_id"].isin(crm_ids)
    has_base = pairs["base"].map(lambda b: isinstance(b, dict))
    base = pd.DataFrame.from_records([b if isinstance(b, dict) else {} for b in pairs["base"]], index=pairs.index)

    # -- merge, field by field ----------------------------------------------------------------
    changes: list[pd.DataFrame] = []
    conflicts: list[pd.DataFrame] = []
    new_base = pd.DataFrame(index=pairs.index)
    pc_newer = (pairs["p_updated_at"] > pairs["c_modified_at"]).fillna(False) if len(pairs) else pd.Series(dtype=bool)
    pc_closed = (pairs["p_status"] == "Closed").fillna(False)
    stage_now = pairs["p_stage"].where(has_pc, base.get("stage", pd.Series(None, index=pairs.index)))
    allow_to_crm = "pc_to_crm" in directions
    allow_to_pc = "crm_to_pc" in directions

    for fm in synced:
        b = base[fm.name] if fm.name in base else pd.Series(None, index=pairs.index, dtype=object)
        p = pairs[f"p_{fm.name}"].where(has_pc, b)
        c = pairs[f"c_{fm.name}"].where(has_crm, b)
        p = p.where(p != KEEP, b.where(has_base, c))
        c = c.where(c != KEEP, b.where(has_base, p))
        agree = _same(p, c)
        pc_changed = ~_same(p, b) | ~has_base
        crm_changed = ~_same(c, b) | ~has_base
        if fm.direction == "pc_to_crm":
            crm_changed &= False
        elif fm.direction == "crm_to_pc":
            pc_changed &= False
        conflict = pc_changed & crm_changed & ~agree
        pc_wins = _authority(fm, pc_newer)
        to_crm = (pc_changed & ~crm_changed & ~agree) | (conflict & pc_wins)
        to_pc = (crm_changed & ~pc_changed & ~agree) | (conflict & ~pc_wins)
        if fm.direction == "crm_to_pc":
            to_crm &= False
        if fm.direction == "pc_to_crm":
            to_pc &= False

        blocked_terminal = to_pc & pc_closed
        blocked_transition = pd.Series(False, index=pairs.index)
        if fm.name == "stage":
            allowed = pd.Series(
                [
                    new in STAGE_TRANSITIONS.get(str(now), set()) if isinstance(new, str) else False
                    for now, new in zip(stage_now, c, strict=True)
                ],
                index=pairs.index,
                dtype=bool,
            )
            blocked_transition = to_pc & ~pc_closed & ~allowed
        blocked = blocked_terminal | blocked_transition
        if not allow_to_crm:
            to_crm &= False
        if not allow_to_pc:
            to_pc &= False
        to_pc &= ~blocked

        for mask, reason in ((blocked_terminal, "terminal_referral"), (blocked_transition, "invalid_transition")):
            if allow_to_pc and mask.any():
                skips.append(
                    pd.DataFrame(
                        {
                            "side": CRM,
                            "referral_id": pairs.loc[mask, "referral_id"],
                            "crm_id": pairs.loc[mask, "crm_id"],
                            "reason": reason,
                            "field": fm.name,
                            "detail": "stage " + stage_now[mask].astype(str) + " -> " + c[mask].astype(str)
                            if fm.name == "stage"
                            else "the referral is Closed",
                        }
                    )
                )
        for mask, target, old, new in ((to_crm, CRM, c, p), (to_pc, PC, p, c)):
            if mask.any():
                reason = pd.Series(PC if target == CRM else CRM, index=pairs.index).where(~conflict, "conflict")
                changes.append(
                    pd.DataFrame(
                        {
                            "referral_id": pairs.loc[mask, "referral_id"],
                            "crm_id": pairs.loc[mask, "crm_id"],
                            "target": target,
                            "field": fm.name,
                            "old": old[mask],
                            "new": new[mask],
                            "reason": reason[mask],
                        }
                    )
                )
        if conflict.any():
            chosen = p.where(pc_wins, c)
            conflicts.append(
                pd.DataFrame(
                    {
                        "referral_id": pairs.loc[conflict, "referral_id"],
                        "crm_id": pairs.loc[conflict, "crm_id"],
                        "field": fm.name,
                        "base": b[conflict],
                        "pc_value": p[conflict],
                        "crm_value": c[conflict],
                        "winner": pd.Series(PC, index=pairs.index).where(pc_wins, CRM)[conflict],
                        "chosen": chosen[conflict],
                    }
                )
            )
        # The new base is what both sides hold after this run's writes; a blocked or
        # disallowed write leaves the old base, so the difference is seen again next run.
        settled = b.copy().astype(object)
        settled = settled.where(~(agree & (pc_changed | crm_changed)), p)
        settled = settled.where(~to_crm, p)
        settled = settled.where(~to_pc, c)
        new_base[fm.name] = settled.where(has_base | to_crm | to_pc | agree, b)

    change_frame = pd.concat(changes, ignore_index=True) if changes else _frame(CHANGE_COLUMNS)
    conflict_frame = pd.concat(conflicts, ignore_index=True) if conflicts else _frame(CONFLICT_COLUMNS)

    # -- pairs with nothing to write: echo of our own write, or no change ---------------------
    touched = set(zip(change_frame["referral_id"], change_frame["crm_id"], strict=True))
    idle = ~pd.Series(
        [(r, c) in touched for r, c in zip(pairs["referral_id"], pairs["crm_id"], strict=True)],
        index=pairs.index,
        dtype=bool,
    )
    synced_at = pd.to_datetime(pairs["synced_at"], utc=True)
    ours = ((pairs["c_modified_at"] <= synced_at + ECHO_TOLERANCE).fillna(False) | ~has_crm) & (
        (pairs["p_updated_at"] <= synced_at + ECHO_TOLERANCE).fillna(False) | ~has_pc
    )
    if idle.any():
        skips.append(
            pd.DataFrame(
                {
                    "side": "pair",
                    "referral_id": pairs.loc[idle, "referral_id"],
                    "crm_id": pairs.loc[idle, "crm_id"],
                    "reason": pd.Series("no_change", index=pairs.index).where(~(ours & has_base), "echo")[idle],
                    "field": None,
                    "detail": None,
                }
            )
        )
    base_records = new_base.astype(object).where(new_base.notna(), None).to_dict("records")
    base_frame = pd.DataFrame({"referral_id": pairs["referral_id"], "crm_id": pairs["crm_id"], "base": base_records})

    # -- records with no link: creates, or skips with their reason -----------------------------
    all_refs, all_crm = set(all_links["referral_id"]), set(all_links["crm_id"])
    lone_pc = pc[~pc["referral_id"].isin(all_refs)]
    lone_crm = crm[~crm["crm_id"].isin(all_crm)]
    pc_elsewhere = lone_pc["crm_ref"].notna()
    pc_open = lone_pc["status"].isin(OPEN_REFERRAL)
    crm_create_mask = ~pc_elsewhere & pc_open & allow_to_crm
    crm_creates = lone_pc.loc[crm_create_mask, ["referral_id", *fields]].reset_index(drop=True)
    for mask, reason in ((pc_elsewhere, "linked_elsewhere"), (~pc_elsewhere & ~pc_open, "closed_unlinked")):
        if mask.any():
            skips.append(
                pd.DataFrame(
                    {
                        "side": PC,
                        "referral_id": lone_pc.loc[mask, "referral_id"],
                        "crm_id": None,
                        "reason": reason,
                        "field": None,
                        "detail": None,
                    }
                )
            )
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
            skips.append(
                pd.DataFrame(
                    {
                        "side": CRM,
                        "referral_id": None,
                        "crm_id": lone_crm.loc[mask, "crm_id"],
                        "reason": reason,
                        "field": None,
                        "detail": None,
                    }
                )
            )

    accounts, contacts = _accounts_and_contacts(crm_creates)
    skip_frame = pd.concat(skips, ignore_index=True)[SKIP_COLUMNS] if skips else _frame(SKIP_COLUMNS)
    return Plan(
        crm_creates=crm_creates,
        pc_creates=pc_creates,
        changes=change_frame[CHANGE_COLUMNS],
        conflicts=conflict_frame[CONFLICT_COLUMNS],
        skips=skip_frame,
        new_base=base_frame,
        accounts=accounts,
        contacts=contacts,
        recovered_links=recovered.reset_index(drop=True),
    )


def _authority(fm: FieldMapping, pc_newer: pd.Series) -> pd.Series:
    """True where Partner Center's value wins a conflict on this field."""
    if fm.direction == "pc_to_crm" or fm.authority == "partner_center":
        return pd.Series(True, index=pc_newer.index, dtype=bool)
    if fm.direction == "crm_to_pc" or fm.authority == "crm":
        return pd.Series(False, index=pc_newer.index, dtype=bool)
    return pc_newer.astype(bool)


def _accounts_and_contacts(creates: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Distinct accounts (matched by name + postal code, case- and space-insensitive) and
    contacts (matched by email) that the new opportunities need."""
    customer = [c for c in creates.columns if c.startswith("customer_")]
    contact = [c for c in creates.columns if c.startswith("contact_")]
    if creates.empty or "customer_name" not in creates:
        return _frame(["match_key", *customer]), _frame(["email", "account_match_key", *contact])
    keyed = creates.assign(
        match_key=_match_key(creates["customer_name"], creates.get("customer_postal_code", pd.Series(dtype=object)))
    )
    accounts = keyed[keyed["customer_name"].notna()].drop_duplicates("match_key")[["match_key", *customer]]
    if "contact_email" in keyed:
        with_email = keyed[keyed["contact_email"].notna()]
        contacts = with_email.drop_duplicates("contact_email")[
            ["contact_email", "match_key", *[c for c in contact if c != "contact_email"]]
        ]
        contacts = contacts.rename(columns={"contact_email": "email", "match_key": "account_match_key"})
    else:
        contacts = _frame(["email", "account_match_key", *contact])
    return accounts.reset_index(drop=True), contacts.reset_index(drop=True)
