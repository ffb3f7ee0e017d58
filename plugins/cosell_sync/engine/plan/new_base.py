"""Step 5 of the planner: what both sides hold after the run's writes (the links' new base), and
the pairs with nothing to write (an echo of our own write, or no change)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cosell_sync.engine.plan.base import BASE_PREFIX, settled
from cosell_sync.engine.plan.columns import labels, pair_column
from cosell_sync.engine.plan.decide import Decision
from cosell_sync.engine.plan.pairing import Pairs
from cosell_sync.engine.plan.result import ECHO_TOLERANCE
from cosell_sync.engine.plan.versions import B, C, P, Versions


def settle(v: Versions, d: Decision, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One field's settled values: ``(rows, values, moved)``, the pairs whose value is not the
    base's, their values, and a mask of the pairs whose agreed value moved. A blocked or
    disallowed write leaves the old base, so the difference is seen again next run."""
    source = np.full(n, B, dtype=np.int8)
    source[d.agree & (d.pc_changed | d.crm_changed)] = P
    source[d.to_crm] = P
    source[d.to_pc] = C
    moved = ((source == P) & ~d.pc_same) | ((source == C) & ~d.crm_same)
    rows = np.flatnonzero(source != B)
    values = np.empty(len(rows), dtype=object)
    for which in (P, C):
        picked = source[rows] == which
        values[picked] = v.values(which, rows[picked])
    return rows, values, moved


def idle_skips(pairs: Pairs, touched: np.ndarray) -> pd.DataFrame | None:
    """The pairs with nothing to write: ``echo`` when neither side moved after our last sync
    (within :data:`ECHO_TOLERANCE`), else ``no_change``."""
    idle = ~touched
    if not idle.any():
        return None
    tolerance = np.timedelta64(int(ECHO_TOLERANCE.total_seconds() * 1_000_000), "us")
    synced_at = pairs.synced_at
    ours = ((pairs.crm_modified <= synced_at + tolerance) | ~pairs.has_crm) & (
        (pairs.pc_updated <= synced_at + tolerance) | ~pairs.has_pc
    )
    echo = (ours & pairs.has_base)[idle]
    nothing = np.full(len(echo), None, dtype=object)
    return pd.DataFrame(
        {
            "side": labels(np.zeros(len(echo), dtype=np.int8), ["pair"]),
            "referral_id": pairs.referral_ids[idle],
            "crm_id": pairs.crm_ids[idle],
            "reason": labels(echo.view(np.int8), ["no_change", "echo"]),
            "field": nothing,
            "detail": nothing.copy(),
        }
    )


def new_base(pairs: Pairs, settled_values: dict[str, tuple[np.ndarray, np.ndarray]], moved: np.ndarray) -> pd.DataFrame:
    """The links to (re)write: where the agreed values moved, and links found on the records.
    Columnar links in, columnar out (``base.<field>``); else a ``base`` dict per link."""
    rows = np.flatnonzero(moved)
    link_base, link_pos = pairs.link_base, pairs.link_pos
    new_base_cols = {
        name: settled(link_base.get(name), link_pos, rows, *found) for name, found in settled_values.items()
    }
    names = list(new_base_cols)
    rid, cid = pairs.referral_ids[rows], pairs.crm_ids[rows]
    if pairs.base_list is None:  # columnar in, columnar out: the old base's columns, the agreed values over them
        base_frame = pd.DataFrame({"referral_id": rid, "crm_id": cid})
        for name, column in link_base.items():  # fields the merge did not settle keep their column type
            kept = new_base_cols[name] if name in new_base_cols else pair_column(column, link_pos[rows])
            base_frame[f"{BASE_PREFIX}{name}"] = pd.Series(kept, dtype=object if name in new_base_cols else None)
        for name in new_base_cols.keys() - link_base.keys():
            base_frame[f"{BASE_PREFIX}{name}"] = pd.Series(new_base_cols[name], dtype=object)
        return base_frame
    base_list = pairs.base_list
    moved_base = []
    for i, agreed in zip(rows, zip(*(new_base_cols[name] for name in names), strict=True), strict=True):
        record = dict(base_list[i]) if isinstance(base_list[i], dict) else {}
        record.update(zip(names, agreed, strict=True))
        moved_base.append(record)
    return pd.DataFrame({"referral_id": rid, "crm_id": cid, "base": moved_base})
