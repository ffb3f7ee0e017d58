"""What a run's plan holds (:class:`Plan`), and the rules' constants."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

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
    # referral_id, crm_id and the base for each link whose synced values moved: ``base`` (a dict
    # per link) when the links came so, else ``base.<field>`` columns (see with_base_dicts)
    new_base: pd.DataFrame
    recovered_links: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["referral_id", "crm_id"]))

    def updates(self, target: str) -> pd.DataFrame:
        """Per record: ``fields`` to write to ``target`` (``partner_center`` or ``crm``) and the
        ``expected`` values the target held when planned (for a re-merge after a 412)."""
        rows = self.changes[self.changes["target"] == target]
        if rows.empty:
            return pd.DataFrame(columns=["referral_id", "crm_id", "fields", "expected"])
        out = []
        for (referral_id, crm_id), group in rows.groupby(["referral_id", "crm_id"], sort=False):
            fields = dict(zip(group["field"], group["new"], strict=True))
            expected = dict(zip(group["field"], group["old"], strict=True))
            out.append({"referral_id": referral_id, "crm_id": crm_id, "fields": fields, "expected": expected})
        return pd.DataFrame(out, columns=["referral_id", "crm_id", "fields", "expected"], dtype=object)

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


def empty_frame(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)
