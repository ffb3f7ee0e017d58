"""Step 1 of the planner: the pairs a run judges. Known links, plus links recovered from the
records themselves (a record that names the other side), aligned to both sides' rows by
position (ids hashed by Arrow), never by merging whole frames."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import FieldMapping
from cosell_sync.engine.plan.base import BASE_PREFIX, base_columns, columnar_links
from cosell_sync.engine.plan.columns import arrow_or_series, indexer, marked, pair_ids, pair_objects, take_time


@dataclass
class Pairs:
    """The pairs in the run, one row each (arrays of the same length ``n``)."""

    n: int
    referral_ids: Any  # Arrow-backed strings when the ids are text, else an object array
    crm_ids: Any
    link_pos: np.ndarray  # each pair's row in ``links`` (-1: a recovered link)
    pc_pos: np.ndarray  # its row in ``pc`` (-1: not read this run)
    crm_pos: np.ndarray  # its row in ``crm`` (-1: not read this run)
    has_base: np.ndarray  # a base was synced (False for recovered links)
    synced_at: np.ndarray  # datetime64[us], NaT for recovered links
    pc_updated: np.ndarray  # datetime64[us]
    crm_modified: np.ndarray  # datetime64[us]
    pc_closed: np.ndarray  # the referral is Closed (or was, by the stage last synced)
    has_pc: np.ndarray  # pc_pos >= 0
    has_crm: np.ndarray  # crm_pos >= 0
    pc_newer: np.ndarray  # Partner Center's record was modified after the CRM's
    # the links' bases: one column per field (``base.<field>``), Arrow when of one plain type
    link_base: dict[str, Any]
    base_list: np.ndarray | None  # the older form: each pair's base dict (None: columnar links)
    recovered: pd.DataFrame  # referral_id, crm_id of the links found on the records
    pc_pos_all: np.ndarray  # row in ``pc`` of every link and recovered link (in the run or not)
    crm_pos_all: np.ndarray


def recover_links(
    pc: pd.DataFrame, crm: pd.DataFrame, links: pd.DataFrame, link_pc_pos: np.ndarray, link_crm_pos: np.ndarray
) -> pd.DataFrame:
    """Links named by unlinked records (``crm_ref`` on a referral, ``referral_ref`` on an
    opportunity) whose other side is in the run, and whose ids no link holds yet: one per id.
    ``link_pc_pos``, ``link_crm_pos``: each link's row in ``pc`` and ``crm`` (-1: none)."""
    pc_linked = marked(len(pc), link_pc_pos)
    crm_linked = marked(len(crm), link_crm_pos)
    # Only unlinked records that name the other side can recover a link: look up just those.
    cand_pc = np.flatnonzero(pc["crm_ref"].notna().to_numpy(dtype=bool) & ~pc_linked)
    pc_ref = pc["crm_ref"].iloc[cand_pc].to_numpy(dtype=object)
    found = indexer(crm["crm_id"], pc_ref) >= 0
    cand_pc, pc_ref = cand_pc[found], pc_ref[found]
    cand_crm = np.flatnonzero(crm["referral_ref"].notna().to_numpy(dtype=bool) & ~crm_linked)
    crm_ref = crm["referral_ref"].iloc[cand_crm].to_numpy(dtype=object)
    found = indexer(pc["referral_id"], crm_ref) >= 0
    cand_crm, crm_ref = cand_crm[found], crm_ref[found]
    recovered = pd.DataFrame(
        {
            "referral_id": np.concatenate([pc["referral_id"].iloc[cand_pc].to_numpy(dtype=object), crm_ref]),
            "crm_id": np.concatenate([pc_ref, crm["crm_id"].iloc[cand_crm].to_numpy(dtype=object)]),
        },
        dtype=object,
    ).drop_duplicates()
    recovered = recovered[
        (indexer(links["referral_id"], recovered["referral_id"]) < 0)
        & (indexer(links["crm_id"], recovered["crm_id"]) < 0)
    ]
    return recovered.drop_duplicates("referral_id").drop_duplicates("crm_id").reset_index(drop=True)


def link_bases(
    links: pd.DataFrame, n_new: int, synced: Sequence[FieldMapping]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """The links' bases, one column per field: given so (``base.<field>``), or unpacked once
    from the older form (a dict per link) for the fields the merge reads. Returns the columns,
    which links have a base, and (older form only) every link's base dict followed by ``n_new``
    Nones for the recovered links."""
    if columnar_links(links):
        read = {"stage", *(f.name for f in synced)}  # the merge reads these; the others are carried along
        link_base = {
            name: arrow_or_series(links[c]) if name in read else links[c]
            for c in links.columns
            if str(c).startswith(BASE_PREFIX) and (name := c[len(BASE_PREFIX) :])
        }
        return link_base, np.ones(len(links), dtype=bool), None
    base_all = np.concatenate([links["base"].to_numpy(dtype=object), np.full(n_new, None, dtype=object)])
    has_base = np.fromiter((isinstance(b, dict) for b in base_all[: len(links)]), dtype=bool, count=len(links))
    unpacked = base_columns(base_all[: len(links)], list(dict.fromkeys(["stage", *(f.name for f in synced)])))
    link_base = {k: arrow_or_series(pd.Series(v, dtype=object)) for k, v in unpacked.items()}
    return link_base, has_base, base_all


def pair(pc: pd.DataFrame, crm: pd.DataFrame, links: pd.DataFrame, synced: Sequence[FieldMapping]) -> Pairs:
    """The pairs of this run: every link or recovered link with a side read this run."""
    # The two lookups are independent and hash in Arrow, which releases the GIL: one on a thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        on_pc = pool.submit(indexer, pc["referral_id"], links["referral_id"])
        link_crm_pos = indexer(crm["crm_id"], links["crm_id"])
        link_pc_pos = on_pc.result()
    recovered = recover_links(pc, crm, links, link_pc_pos, link_crm_pos)
    rec_refs = recovered["referral_id"].to_numpy(dtype=object)
    rec_cids = recovered["crm_id"].to_numpy(dtype=object)
    n_new = len(recovered)
    link_base, link_has_base, base_all = link_bases(links, n_new, synced)
    synced_all = np.concatenate(
        [
            pd.to_datetime(links["synced_at"], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[us]"),
            np.full(n_new, np.datetime64("NaT"), dtype="datetime64[us]"),
        ]
    )
    pc_pos_all = np.concatenate([link_pc_pos, indexer(pc["referral_id"], rec_refs)])
    crm_pos_all = np.concatenate([link_crm_pos, indexer(crm["crm_id"], rec_cids)])
    in_run = (pc_pos_all >= 0) | (crm_pos_all >= 0)
    link_pos = np.concatenate([np.arange(len(links)), np.full(n_new, -1)])[in_run]
    referral_ids = pair_ids(links["referral_id"], rec_refs, in_run)
    crm_ids = pair_ids(links["crm_id"], rec_cids, in_run)
    pc_pos, crm_pos = pc_pos_all[in_run], crm_pos_all[in_run]
    n = len(referral_ids)
    has_pc, has_crm = pc_pos >= 0, crm_pos >= 0
    # A referral not read this run is judged by the stage last synced: won/lost means Closed.
    pc_closed = np.zeros(n, dtype=bool)
    pc_closed[has_pc] = (pc["status"] == "Closed").to_numpy(dtype=bool, na_value=False)[pc_pos[has_pc]]
    unread = np.flatnonzero(~has_pc)
    pc_closed[unread] = np.isin(pair_objects(link_base.get("stage"), link_pos[unread]), ["won", "lost"])
    pc_updated = take_time(pc, "updated_at", pc_pos, has_pc)
    crm_modified = take_time(crm, "modified_at", crm_pos, has_crm)
    return Pairs(
        n=n,
        referral_ids=referral_ids,
        crm_ids=crm_ids,
        link_pos=link_pos,
        pc_pos=pc_pos,
        crm_pos=crm_pos,
        has_base=np.concatenate([link_has_base, np.zeros(n_new, dtype=bool)])[in_run],
        synced_at=synced_all[in_run],
        pc_updated=pc_updated,
        crm_modified=crm_modified,
        pc_closed=pc_closed,
        has_pc=has_pc,
        has_crm=has_crm,
        pc_newer=pc_updated > crm_modified,
        link_base=link_base,
        base_list=base_all[in_run] if base_all is not None else None,
        recovered=recovered,
        pc_pos_all=pc_pos_all,
        crm_pos_all=crm_pos_all,
    )
