"""Synthetic canonical frames for planner benchmarks and property tests (seeded)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import SyncMapping

T0 = datetime(2026, 11, 1, tzinfo=UTC)
STAGES = np.array(["new", "active", "won", "lost"], dtype=object)
STATUS_FOR = {"new": "New", "active": "Active", "won": "Closed", "lost": "Closed"}
HELP = np.array(["GeneralOrOther", "QuotesOrLicensing", "ProofOfConceptOrDemo"], dtype=object)


def _values(rng: np.random.Generator, n: int, prefix: str) -> dict[str, np.ndarray]:
    return {
        "name": np.char.add(f"{prefix} deal ", rng.integers(0, 10**6, n).astype(str)).astype(object),
        "deal_value": np.round(rng.uniform(1_000, 1_000_000, n), 2).astype(object),
        "currency": rng.choice(np.array(["USD", "EUR", "GBP"], dtype=object), n),
        "close_date": (np.datetime64("2027-01-01") + rng.integers(0, 365, n)).astype(str).astype(object),
        "notes": rng.choice(np.array(["", "call back", "needs POC", None], dtype=object), n),
        "stage": rng.choice(STAGES[:2], n),
        "help_code": rng.choice(HELP, n),
        "solutions": rng.choice(np.array(["SOL-1", "SOL-1;SOL-2", None], dtype=object), n),
        "sales_stage": rng.choice(np.array(["qualify", "develop", "propose", "close"], dtype=object), n),
        "share_with_microsoft": rng.choice(np.array([True, True, False, None], dtype=object), n),
        "microsoft_status": rng.choice(np.array(["requested", "accepted", None], dtype=object), n),
    }


def make_case(
    n_pairs: int,
    mapping: SyncMapping,
    *,
    seed: int = 0,
    changed: float = 0.1,
    both: float = 0.02,
    unlinked: float = 0.05,
    columnar: bool = True,
    typed: bool = True,
    shuffled: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pc, crm, links): ``n_pairs`` linked pairs with edits on either or both sides, plus
    unlinked records on each side. ``links`` carries each base as ``base.<field>`` columns
    (``columnar``), or as a dict per link in ``base`` (the older form). ``typed``: text columns
    in Arrow and amounts as floats, as a columnar store hands them over (else Python objects).
    ``shuffled``: both sides' rows in random order, and a tenth of each side's linked records
    not read this run (the pair is then judged from the other side and the base)."""
    rng = np.random.default_rng(seed)
    fields = list(mapping.fields)
    synced = [f.name for f in mapping.synced_fields()]
    generated = pd.DataFrame(_values(rng, n_pairs, "base"))
    base = pd.DataFrame({f: generated.get(f) for f in fields})
    ids = np.arange(n_pairs).astype(str).astype(object)
    referral_ids = np.char.add("r", ids.astype(str)).astype(object)
    crm_ids = np.char.add("c", ids.astype(str)).astype(object)
    pc = base.copy()
    crm = base.copy()
    roll = rng.random(n_pairs)
    edit_pc = roll < changed
    edit_crm = (roll >= changed) & (roll < 2 * changed)
    edit_both = roll >= 1 - both
    edits = _values(rng, n_pairs, "edit")
    for col in synced:
        which = rng.random(n_pairs) < 0.4
        pc.loc[(edit_pc | edit_both) & which, col] = edits[col][(edit_pc | edit_both) & which]
        other = _values(rng, n_pairs, "crm")[col]
        crm.loc[(edit_crm | edit_both) & which, col] = other[(edit_crm | edit_both) & which]
    stamp = pd.Series(pd.Timestamp(T0) + pd.to_timedelta(rng.integers(0, 3600, n_pairs), unit="s"))
    pc.insert(0, "referral_id", referral_ids)
    pc["crm_ref"] = crm_ids
    pc["status"] = pc["stage"].map(STATUS_FOR)
    pc["substatus"] = None
    pc["updated_at"] = stamp + pd.to_timedelta(rng.integers(0, 7200, n_pairs), unit="s")
    crm.insert(0, "crm_id", crm_ids)
    crm["referral_ref"] = referral_ids
    crm["sync_flag"] = True
    crm["closed"] = crm["stage"].isin(["won", "lost"])
    crm["modified_at"] = stamp + pd.to_timedelta(rng.integers(0, 7200, n_pairs), unit="s")
    base_values = base[fields].astype(object).where(base[fields].notna(), None)
    links = pd.DataFrame({"referral_id": referral_ids, "crm_id": crm_ids})
    if columnar:
        for f in fields:
            links[f"base.{f}"] = base_values[f].to_numpy(dtype=object)
    else:
        links["base"] = base_values.to_dict("records")
    links["synced_at"] = pd.Timestamp(T0) - timedelta(hours=1)
    n_lone = int(n_pairs * unlinked)
    if n_lone:
        lone_pc = pc.iloc[:n_lone].copy()
        lone_pc["referral_id"] = np.char.add("lone-r", np.arange(n_lone).astype(str)).astype(object)
        lone_pc["crm_ref"] = None
        lone_crm = crm.iloc[:n_lone].copy()
        lone_crm["crm_id"] = np.char.add("lone-c", np.arange(n_lone).astype(str)).astype(object)
        lone_crm["referral_ref"] = None
        lone_crm["sync_flag"] = rng.random(n_lone) < 0.6
        pc = pd.concat([lone_pc, pc], ignore_index=True)  # linked rows at an offset on this side
        crm = pd.concat([crm, lone_crm], ignore_index=True)
    if shuffled:
        pc, crm = (frame.iloc[rng.permutation(len(frame))] for frame in (pc, crm))
        pc, crm = (frame[rng.random(len(frame)) >= 0.1].reset_index(drop=True) for frame in (pc, crm))
    if typed:
        pc, crm, links = _typed(pc), _typed(crm), _typed(links)
    return pc, crm, links


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns of text as Arrow text (categorical when it has few distinct values, as a
    columnar store dictionary-encodes them), of numbers as floats; booleans (with missing values)
    stay Python objects."""
    out = {}
    for name in frame.columns:
        column = frame[name]
        if column.dtype == object or isinstance(column.dtype, pd.StringDtype):
            present = column.dropna()
            if all(isinstance(v, str) for v in present):
                few = len(present) and present.nunique() <= max(100, len(column) // 100)  # stages, codes ...
                column = column.astype("category" if few else "str")
            elif all(isinstance(v, float) for v in present):
                column = column.astype("float64")
        out[name] = column
    return pd.DataFrame(out)
