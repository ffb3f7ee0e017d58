"""Links: which CRM record a referral is synced with, and the base (the values both sides agreed on).

One link per (crm, referral_id), and a CRM record is linked to at most one referral (a unique
index on (crm, crm_id)). A write checks that in its own transaction, which on PostgreSQL takes
an advisory lock per CRM so two runs writing links of one CRM queue instead of racing past the
check; on SQLite the write transaction already holds the database's write lock.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import Database, UsesDatabase
from cosell_sync.state.schema import links_t
from cosell_sync.state.values import CRMS, check, chunks, frame, missing, req_str

LINK_COLUMNS = ["referral_id", "crm_id", "base", "base_hash", "synced_at", "run_id"]


class LinkConflictError(ValueError):
    """One CRM record would be linked to two referrals."""

    def __init__(self, crm: str, crm_id: str, existing_referral_id: str, referral_id: str) -> None:
        self.crm = crm
        self.crm_id = crm_id
        self.existing_referral_id = existing_referral_id
        self.referral_id = referral_id
        super().__init__(
            f"{crm} record {crm_id!r} is already linked to referral {existing_referral_id!r}; "
            f"it cannot also be linked to referral {referral_id!r}"
        )


def base_columns(texts: Sequence[str]) -> dict[str, pd.Series]:
    """Stored bases (JSON objects as text), one column per field: decoded in one pass by Arrow
    (text stays text, as stored: no timestamp or date guessing), else, when a field holds values
    of different JSON types or nested ones, row by row. A field missing from a base is None."""
    import pyarrow as pa
    import pyarrow.json as paj

    if not texts:
        return {}
    data = "\n".join(texts).encode()
    plain = {pa.string(), pa.large_string(), pa.float64(), pa.int64(), pa.bool_(), pa.null()}
    try:
        table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(block_size=max(1 << 20, len(data) + 1)))
        guessed = [f for f in table.schema if pa.types.is_temporal(f.type)]
        if guessed:  # Arrow reads ISO dates as timestamps: read them again as the text they are
            options = paj.ParseOptions(
                explicit_schema=pa.schema([(f.name, pa.string()) for f in guessed]), unexpected_field_behavior="infer"
            )
            table = paj.read_json(
                io.BytesIO(data),
                read_options=paj.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
                parse_options=options,
            )
        if all(f.type in plain for f in table.schema):
            out = {}
            for name, column in zip(table.column_names, table.columns, strict=True):
                array = column.combine_chunks()
                if pa.types.is_null(array.type):
                    array = array.cast(pa.string())
                if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
                    out[name] = pd.Series(
                        pd.arrays.ArrowStringArray(array, dtype=pd.StringDtype("pyarrow", na_value=math.nan))
                    )
                else:
                    out[name] = pd.Series(pd.arrays.ArrowExtensionArray(array))
            return out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    bases = [json.loads(text) for text in texts]
    names = list(dict.fromkeys(k for base in bases for k in base))
    return {name: pd.Series([base.get(name) for base in bases], dtype=object) for name in names}


def prepare_links(crm: str, links: pd.DataFrame, run_id: str) -> list[dict[str, Any]]:
    """The rows to write, checked (before any transaction): one per referral, the last one
    winning; :class:`LinkConflictError` when the batch itself links a CRM record twice."""
    check(crm, CRMS, "crm")
    lacking = {"referral_id", "crm_id", "base"} - set(links.columns)
    if lacking:
        raise ValueError(f"links lack the column(s) {sorted(lacking)}")
    now = values.now()
    by_ref: dict[str, dict[str, Any]] = {}
    for row in values.records(links):
        referral_id = req_str(row["referral_id"], "referral_id")
        crm_id = req_str(row["crm_id"], f"crm_id of referral {referral_id!r}")
        base = row["base"]
        if not isinstance(base, Mapping):
            raise ValueError(f"base of referral {referral_id!r} must be a dict, not {type(base).__name__}")
        base = dict(base)
        given_hash = row.get("base_hash")
        base_hash = values.hash_values(base) if missing(given_hash) or given_hash == "" else str(given_hash)
        by_ref[referral_id] = {  # the last row of a referral wins, as successive upserts would
            "crm": crm,
            "referral_id": referral_id,
            "crm_id": crm_id,
            "base": base,
            "base_hash": base_hash,
            "synced_at": now,
            "run_id": run_id,
        }
    owner: dict[str, str] = {}
    for row in by_ref.values():
        other = owner.setdefault(row["crm_id"], row["referral_id"])
        if other != row["referral_id"]:
            raise LinkConflictError(crm, row["crm_id"], other, row["referral_id"])
    return list(by_ref.values())


def write_links(db: Database, conn: Connection, crm: str, rows: list[dict[str, Any]]) -> int:
    """Upsert prepared rows inside the caller's transaction; :class:`LinkConflictError` when a
    CRM record is already linked to another referral that this batch does not move away."""
    if not rows:
        return 0
    db.lock(conn, f"cosell_state:links:{crm}")
    new_crm_id = {r["referral_id"]: r["crm_id"] for r in rows}
    new_owner = {r["crm_id"]: r["referral_id"] for r in rows}
    key = sa.select(links_t.c.referral_id, links_t.c.crm_id).where(links_t.c.crm == crm)
    # A CRM record already linked to another referral conflicts, unless that referral
    # is re-linked elsewhere by this same batch (a swap).
    for chunk in chunks(list(new_owner)):
        for existing_ref, crm_id in conn.execute(key.where(links_t.c.crm_id.in_(chunk))):
            wanted_ref = new_owner[crm_id]
            released = existing_ref in new_crm_id and new_crm_id[existing_ref] != crm_id
            if existing_ref != wanted_ref and not released:
                raise LinkConflictError(crm, crm_id, existing_ref, wanted_ref)
    # Links whose CRM record changes are removed first, so the unique index on
    # (crm, crm_id) never sees a transient duplicate.
    moving: list[str] = []
    for chunk in chunks(list(new_crm_id)):
        for ref, crm_id in conn.execute(key.where(links_t.c.referral_id.in_(chunk))):
            if new_crm_id[ref] != crm_id:
                moving.append(ref)
    for chunk in chunks(moving):
        conn.execute(links_t.delete().where(links_t.c.crm == crm, links_t.c.referral_id.in_(chunk)))
    stmt = db.insert(links_t)
    stmt = stmt.on_conflict_do_update(
        index_elements=[links_t.c.crm, links_t.c.referral_id],
        set_={
            "crm_id": stmt.excluded.crm_id,
            "base": stmt.excluded.base,
            "base_hash": stmt.excluded.base_hash,
            "synced_at": stmt.excluded.synced_at,
            "run_id": stmt.excluded.run_id,
        },
    )
    conn.execute(stmt, rows)
    return len(rows)


class Links(UsesDatabase):
    """The links part of :class:`~cosell_sync.state.StateStore`."""

    hash_values = staticmethod(values.hash_values)

    def get_links(
        self,
        crm: str,
        referral_ids: Iterable[str] | None = None,
        crm_ids: Iterable[str] | None = None,
        *,
        columnar: bool = False,
    ) -> pd.DataFrame:
        """The links of ``crm``: all of them, or those matching ``referral_ids`` OR ``crm_ids``.

        Columns: referral_id, crm_id, base (dict), base_hash, synced_at (UTC), run_id. With
        ``columnar``, the bases come as one ``base.<field>`` column per field instead of a dict
        per link, decoded from their stored JSON in one pass (see :func:`~cosell_sync.state.links.base_columns`).
        """
        check(crm, CRMS, "crm")
        refs = None if referral_ids is None else values.ids(referral_ids)
        cids = None if crm_ids is None else values.ids(crm_ids)
        cols = [
            sa.type_coerce(links_t.c.base, sa.Text).label("base") if columnar and name == "base" else links_t.c[name]
            for name in LINK_COLUMNS
        ]

        def work(conn: Connection) -> list[dict[str, Any]]:
            base = sa.select(*cols).where(links_t.c.crm == crm)
            if refs is None and cids is None:
                ordered = base.order_by(self._db.by_code_point(links_t.c.referral_id))
                return [dict(r._mapping) for r in conn.execute(ordered)]
            found: dict[str, dict[str, Any]] = {}
            for column, wanted in ((links_t.c.referral_id, refs), (links_t.c.crm_id, cids)):
                for chunk in chunks(wanted or []):
                    for r in conn.execute(base.where(column.in_(chunk))):
                        found[r.referral_id] = dict(r._mapping)
            return [found[k] for k in sorted(found)]

        rows = self._db.read(work)
        if not columnar:
            return frame(rows, LINK_COLUMNS, times=["synced_at"])
        others = [c for c in LINK_COLUMNS if c != "base"]
        out = frame(rows, others, times=["synced_at"])
        for name, column in base_columns([row["base"] for row in rows]).items():
            out[f"base.{name}"] = column
        return out

    def upsert_links(self, crm: str, links: pd.DataFrame, run_id: str) -> int:
        """Insert or update links on (crm, referral_id); returns the rows written.

        Raises :class:`~cosell_sync.state.LinkConflictError` (a ``ValueError``) when a CRM record
        would be linked to a second referral; nothing is written then.
        """
        rows = prepare_links(crm, links, run_id)
        if not rows:
            return 0
        return self._db.run(lambda conn: write_links(self._db, conn, crm, rows))

    def delete_links(self, crm: str, referral_ids: Iterable[str]) -> int:
        """Remove the links of ``referral_ids``; returns the rows removed."""
        check(crm, CRMS, "crm")
        refs = values.ids(referral_ids)

        def work(conn: Connection) -> int:
            deleted = 0
            for chunk in chunks(refs):
                result = conn.execute(links_t.delete().where(links_t.c.crm == crm, links_t.c.referral_id.in_(chunk)))
                deleted += result.rowcount
            return deleted

        return self._db.run(work) if refs else 0
