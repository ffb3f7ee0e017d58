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

import operator
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pac

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


def _take_time(frame: pd.DataFrame, column: str, pos: np.ndarray, present: np.ndarray) -> np.ndarray:
    out = np.full(len(pos), np.datetime64("NaT"), dtype="datetime64[us]")
    if column in frame and len(frame):
        stamps = pd.to_datetime(frame[column], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        out[present] = stamps[pos[present]]
    return out


def _objects(column: pd.Series) -> np.ndarray:
    """A column as an object array, missing values as None (Arrow, string and float columns)."""
    out = column.to_numpy(dtype=object)
    if column.dtype != object:
        out[pd.isna(out)] = None
    return out


def _one_chunk(arr: pa.ChunkedArray) -> pa.Array:
    """The array of ``arr``: its only chunk as it is (no copy), else its chunks joined."""
    return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _text(values: object) -> pa.Array | None:
    """``values`` as an Arrow large_string array (missing values null); None unless they are
    all text or missing."""
    try:
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = _one_chunk(arr)
    if pa.types.is_dictionary(arr.type):  # categorical text: decoded for the one field at hand
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    return None


def _same_type(arrays: list[pa.Array]) -> list[pa.Array]:
    """Text arrays cast to one type (string, or large_string when any is large)."""
    kinds = {a.type for a in arrays}
    if len(kinds) <= 1:
        return arrays
    return [a.cast(pa.large_string()) for a in arrays]


def _arrow(values: object) -> pa.Array | None:
    """``values`` as an Arrow array of one plain type (text, float, integer or boolean; missing
    values null), or None when they are of mixed or other types."""
    text = _text(values)
    if text is not None:
        return text
    try:
        arr = values if isinstance(values, pa.Array) else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = _one_chunk(arr)
    if pa.types.is_floating(arr.type):
        return pac.add(arr.cast(pa.float64()), 0.0)  # -0.0 is 0.0, as Python compares them
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.int64())
    if pa.types.is_boolean(arr.type):
        return arr
    return None


def _indexer(keys: object, values: object) -> np.ndarray:
    """The position in ``keys`` of each of ``values`` (-1: absent or missing), as
    ``Index.get_indexer``: hashed by Arrow when both are text, by pandas otherwise."""
    k, v = _text(keys), _text(values)
    if k is None or v is None:
        index = pd.Index(np.asarray(keys, dtype=object), dtype=object)
        return index.get_indexer(np.asarray(values, dtype=object))
    k, v = _same_type([k, v])
    if 8 * len(v) >= len(k):
        found = pac.index_in(v, value_set=k, skip_nulls=True).fill_null(-1)
        return found.to_numpy(zero_copy_only=False).astype(np.intp)
    # A few values among many keys: hash the values, not the keys, and scan the keys once.
    unique = pac.unique(v.drop_null())
    key_to_unique = pac.index_in(k, value_set=unique).fill_null(-1).to_numpy(zero_copy_only=False)
    hits = np.flatnonzero(key_to_unique >= 0)[::-1]  # reversed: the first of equal keys wins
    unique_pos = np.full(len(unique) + 1, -1, dtype=np.intp)
    unique_pos[key_to_unique[hits]] = hits
    value_to_unique = pac.index_in(v, value_set=unique, skip_nulls=True).fill_null(-1)
    return unique_pos[value_to_unique.to_numpy(zero_copy_only=False)]


def _arrow_or_series(column: pd.Series) -> pa.Array | pd.Series:
    """``column`` as an Arrow array when its values are of one plain type (converted once, as
    the merge reads a base column several times), else as it is."""
    try:
        raw = pa.array(column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return column
    if isinstance(raw, pa.ChunkedArray):
        raw = _one_chunk(raw)
    if pa.types.is_dictionary(raw.type) and _is_text(raw.type.value_type):
        return raw  # categorical text stays encoded: decoded for the one field at hand
    converted = _arrow(raw)
    return column if converted is None else converted


def _pair_ids(ids: pd.Series, recovered: np.ndarray, in_run: np.ndarray) -> object:
    """The pairs' ids (the links' then the recovered ones, those in the run): an Arrow-backed
    string array when they are text (no Python string per id), else an object array."""
    known = _text(ids)
    found = _text(pa.array(recovered, type=known.type if known is not None else None, from_pandas=True))
    if known is None or found is None:
        return np.concatenate([ids.to_numpy(dtype=object), recovered])[in_run]
    known, found = _same_type([known, found])
    chosen = pa.concat_arrays([known, found]).filter(pa.array(in_run))
    return pd.arrays.ArrowStringArray(chosen, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


def _pair_column(column: pa.Array | pd.Series, pos: np.ndarray) -> object:
    """``column`` aligned by ``pos`` (missing where ``pos`` < 0): text kept in Arrow (or its
    pandas type) when it is, anything else as Python values."""
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.StringDtype | pd.CategoricalDtype):
        return column.array.take(pos, allow_fill=True)  # its own type, no Python object per value
    if isinstance(column, pa.Array) and (_is_text(column.type) or pa.types.is_dictionary(column.type)):
        taken = column.take(pa.array(pos, mask=pos < 0))
        if pa.types.is_dictionary(taken.type):
            taken = taken.dictionary_decode()
        return pd.arrays.ArrowStringArray(taken, dtype=pd.StringDtype("pyarrow", na_value=np.nan))
    return _pair_objects(column, pos)  # numbers and booleans as Python values (None where missing)


def _pair_objects(column: pd.Series | None, pos: np.ndarray) -> np.ndarray:
    """``column`` aligned by ``pos`` as an object array; None where ``pos`` < 0, missing, or no column."""
    out = np.full(len(pos), None, dtype=object)
    if column is None or not len(column):
        return out
    if isinstance(column, pa.Array):
        taken = column.take(pa.array(pos, mask=pos < 0))
        if pa.types.is_dictionary(taken.type):
            taken = taken.dictionary_decode()
        if pa.types.is_string(taken.type) or pa.types.is_large_string(taken.type):
            return taken.to_numpy(zero_copy_only=False)
        out[:] = taken.to_pylist()  # numbers or booleans: None where missing
        return out
    text = _text(column)
    if text is not None:
        return text.take(pa.array(pos, mask=pos < 0)).to_numpy(zero_copy_only=False)
    out[pos >= 0] = _objects(column)[pos[pos >= 0]]
    return out


B, P, C = 0, 1, 2  # a field's three versions: the base, Partner Center's, the CRM's


class _Versions:
    """One field's three versions (``B``, ``P``, ``C``), aligned to the pairs: a missing value
    is None, the base's "no opinion" marker counts as missing (it is never a synced value), and
    a pair's side not read this run holds the base."""

    def same(self, x: int, y: int) -> np.ndarray:
        """Per pair: do versions ``x`` and ``y`` hold the same value (both missing counts)?"""
        raise NotImplementedError

    def values(self, which: int, rows: np.ndarray) -> np.ndarray:
        """Version ``which`` of the pairs at ``rows``, as Python values (None when missing)."""
        raise NotImplementedError


class _ArrowVersions(_Versions):
    """Values of one plain type, compared row by row by Arrow: no value is ever encoded or
    turned into a Python object unless it is written or reported."""

    def __init__(self, arrays: list[pa.Array]) -> None:
        self.arrays = arrays

    def same(self, x: int, y: int) -> np.ndarray:
        a, b = self.arrays[x], self.arrays[y]
        if not a.null_count and not b.null_count:
            return pac.equal(a, b).to_numpy(zero_copy_only=False)
        equal = pac.fill_null(pac.equal(a, b), False)
        return pac.or_(equal, pac.and_(a.is_null(), b.is_null())).to_numpy(zero_copy_only=False)

    def values(self, which: int, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)
        if len(rows):
            out[:] = self.arrays[which].take(pa.array(rows, type=pa.int64())).to_pylist()
        return out


class _CodedVersions(_Versions):
    """Values of mixed types, factorized together by pandas: integer codes (-1 missing)."""

    def __init__(self, codes: list[np.ndarray], uniques: np.ndarray) -> None:
        self.codes = codes
        self.lookup = np.append(uniques, None)  # code -1 -> None

    def same(self, x: int, y: int) -> np.ndarray:
        return self.codes[x] == self.codes[y]

    def values(self, which: int, rows: np.ndarray) -> np.ndarray:
        return self.lookup[self.codes[which][rows]]


def _aligned(array: pa.Array, pos: np.ndarray, kind: pa.DataType) -> pa.Array:
    """``array`` (cast to ``kind``) taken at ``pos``: null where ``pos`` < 0."""
    n = len(pos)
    if not len(array):
        return pa.nulls(n, kind)
    array = array.cast(kind)
    if n and pos[0] >= 0 and pos[-1] - pos[0] == n - 1 and bool((np.diff(pos) == 1).all()):
        return array.slice(int(pos[0]), n)  # already in pair order: no copy
    return array.take(pa.array(pos, mask=pos < 0))


def _versions(
    base: pd.Series | None,
    link_pos: np.ndarray,
    pc_col: pd.Series | None,
    pc_pos: np.ndarray,
    crm_col: pd.Series | None,
    crm_pos: np.ndarray,
    has_base: np.ndarray,
) -> _Versions:
    """One field's versions. Values of one plain type stay in Arrow; mixed ones are factorized."""
    n = len(link_pos)
    has_pc, has_crm = pc_pos >= 0, crm_pos >= 0
    parts = [(base, link_pos), (pc_col, pc_pos), (crm_col, crm_pos)]
    arrays = [pa.nulls(0) if col is None else _arrow(col) for col, _ in parts]
    kinds = {a.type for a in arrays if a is not None and not pa.types.is_null(a.type) and len(a)}
    if kinds <= {pa.string(), pa.large_string()} and len(kinds) > 1:
        kinds = {pa.large_string()}
    if all(a is not None for a in arrays) and len(kinds) <= 1:
        kind = kinds.pop() if kinds else pa.string()
        b, p, c = (_aligned(a, pos, kind) for (_, pos), a in zip(parts, arrays, strict=True))
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)

        def marked(x: pa.Array) -> pa.Array | None:
            if not text:
                return None
            found = pac.equal(x, pa.scalar(KEEP, kind))
            return pac.fill_null(found, False) if pac.any(found).as_py() else None

        if (keep := marked(b)) is not None:
            b = pac.if_else(keep, pa.scalar(None, kind), b)
        if not has_pc.all():
            p = pac.if_else(pa.array(has_pc), p, b)
        if not has_crm.all():
            c = pac.if_else(pa.array(has_crm), c, b)
        with_base = pa.array(has_base)
        if (keep := marked(p)) is not None:
            p = pac.if_else(keep, pac.if_else(with_base, b, c), p)
        if (keep := marked(c)) is not None:
            c = pac.if_else(keep, pac.if_else(with_base, b, p), c)
        return _ArrowVersions([b, p, c])
    columns = [_pair_objects(col, pos) for col, pos in parts]
    columns[0] = np.where(columns[0] == KEEP, None, columns[0])
    codes, uniques = pd.factorize(np.concatenate(columns))
    uniques = np.asarray(uniques, dtype=object)
    cb, cp, cc = codes[:n], codes[n : 2 * n], codes[2 * n :]
    cp = np.where(has_pc, cp, cb)
    cc = np.where(has_crm, cc, cb)
    keep = np.flatnonzero(uniques == KEEP)
    if keep.size:
        cp = np.where(cp == keep[0], np.where(has_base, cb, cc), cp)
        cc = np.where(cc == keep[0], np.where(has_base, cb, cp), cc)
    return _CodedVersions([cb, cp, cc], uniques)


def _settled(
    base: pd.Series | None, link_pos: np.ndarray, rows: np.ndarray, changed: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """A field's new base at the pairs ``rows``: its old base (the "no opinion" marker as None),
    overwritten at the pairs ``changed`` (sorted) by their settled ``values``."""
    out = np.array(_pair_objects(base, link_pos[rows]), dtype=object)  # a writable copy
    out[out == KEEP] = None
    at = np.searchsorted(rows, changed)
    hit = at < len(rows)
    hit[hit] = rows[at[hit]] == changed[hit]
    out[at[hit]] = values[hit]
    return out


def _marked(size: int, positions: np.ndarray) -> np.ndarray:
    """A boolean mask of ``size`` with True at the (non-negative) ``positions``."""
    mask = np.zeros(size, dtype=bool)
    mask[positions[positions >= 0]] = True
    return mask


BASE_PREFIX = "base."


def _base_columns(bases: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """The last synced values, one object array per field, from links' base dicts (the older
    form of ``links``; columnar links carry ``base.<field>`` columns instead)."""
    empty = (None,) * len(names)
    pick = operator.itemgetter(*names) if len(names) > 1 else (lambda d: (d[names[0]],))

    def row(b: object) -> tuple[object, ...]:
        if not isinstance(b, dict):
            return empty
        try:
            return pick(b)
        except KeyError:  # a base written before a field was added to the mapping
            return tuple(b.get(k) for k in names)

    table = np.empty((len(bases), len(names)), dtype=object)
    if len(bases) and names:
        table[:] = [row(b) for b in bases]
    return {name: table[:, i] for i, name in enumerate(names)}


def columnar_links(links: pd.DataFrame) -> bool:
    """True when ``links`` carries its bases as ``base.<field>`` columns."""
    return any(isinstance(c, str) and c.startswith(BASE_PREFIX) for c in links.columns)


def with_base_dicts(links: pd.DataFrame) -> pd.DataFrame:
    """``links`` with ``base`` as a dict per row (what the state store writes): built from its
    ``base.<field>`` columns when it is columnar, else ``links`` as it is."""
    if not columnar_links(links):
        return links
    prefixed = [c for c in links.columns if str(c).startswith(BASE_PREFIX)]
    names = [c[len(BASE_PREFIX) :] for c in prefixed]
    columns = [_objects(links[c]) for c in prefixed]
    out = links.drop(columns=prefixed)
    out["base"] = pd.Series([dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)],
                            index=links.index, dtype=object)  # fmt: skip
    return out


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
    skips: list[pd.DataFrame] = []
    if not len(links):
        links = _frame(["referral_id", "crm_id", "base", "synced_at"])

    # -- pairs: known links, plus links recovered from the records themselves ---------------
    # Rows are aligned by position (ids hashed by Arrow), never by merging whole frames.
    link_pc_pos = _indexer(pc["referral_id"], links["referral_id"])
    link_crm_pos = _indexer(crm["crm_id"], links["crm_id"])
    pc_linked = _marked(len(pc), link_pc_pos)
    crm_linked = _marked(len(crm), link_crm_pos)
    # Only unlinked records that name the other side can recover a link: look up just those.
    cand_pc = np.flatnonzero(pc["crm_ref"].notna().to_numpy(dtype=bool) & ~pc_linked)
    pc_ref = pc["crm_ref"].iloc[cand_pc].to_numpy(dtype=object)
    found = _indexer(crm["crm_id"], pc_ref) >= 0
    cand_pc, pc_ref = cand_pc[found], pc_ref[found]
    cand_crm = np.flatnonzero(crm["referral_ref"].notna().to_numpy(dtype=bool) & ~crm_linked)
    crm_ref = crm["referral_ref"].iloc[cand_crm].to_numpy(dtype=object)
    found = _indexer(pc["referral_id"], crm_ref) >= 0
    cand_crm, crm_ref = cand_crm[found], crm_ref[found]
    recovered = pd.DataFrame(
        {
            "referral_id": np.concatenate([pc["referral_id"].iloc[cand_pc].to_numpy(dtype=object), crm_ref]),
            "crm_id": np.concatenate([pc_ref, crm["crm_id"].iloc[cand_crm].to_numpy(dtype=object)]),
        },
        dtype=object,
    ).drop_duplicates()
    recovered = recovered[
        (_indexer(links["referral_id"], recovered["referral_id"]) < 0)
        & (_indexer(links["crm_id"], recovered["crm_id"]) < 0)
    ]
    recovered = recovered.drop_duplicates("referral_id").drop_duplicates("crm_id").reset_index(drop=True)
    rec_refs = recovered["referral_id"].to_numpy(dtype=object)
    rec_cids = recovered["crm_id"].to_numpy(dtype=object)

    # The links' bases, one column per field: given so (``base.<field>``), or unpacked once
    # from the older form (a dict per link) for the fields the merge reads.
    columnar = columnar_links(links)
    n_new = len(recovered)
    if columnar:
        read = {"stage", *(f.name for f in synced)}  # the merge reads these; the others are carried along
        link_base = {
            name: _arrow_or_series(links[c]) if name in read else links[c]
            for c in links.columns
            if str(c).startswith(BASE_PREFIX) and (name := c[len(BASE_PREFIX) :])
        }
        link_has_base = np.ones(len(links), dtype=bool)
        base_all = None
    else:
        base_all = np.concatenate([links["base"].to_numpy(dtype=object), np.full(n_new, None, dtype=object)])
        link_has_base = np.fromiter((isinstance(b, dict) for b in base_all[: len(links)]), dtype=bool, count=len(links))
        unpacked = _base_columns(base_all[: len(links)], list(dict.fromkeys(["stage", *(f.name for f in synced)])))
        link_base = {k: _arrow_or_series(pd.Series(v, dtype=object)) for k, v in unpacked.items()}
    synced_all = np.concatenate(
        [
            pd.to_datetime(links["synced_at"], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[us]"),
            np.full(len(recovered), np.datetime64("NaT"), dtype="datetime64[us]"),
        ]
    )
    pc_pos_all = np.concatenate([link_pc_pos, _indexer(pc["referral_id"], rec_refs)])
    crm_pos_all = np.concatenate([link_crm_pos, _indexer(crm["crm_id"], rec_cids)])
    in_run = (pc_pos_all >= 0) | (crm_pos_all >= 0)
    # each pair's row in ``links`` (-1: a recovered link)
    link_pos = np.concatenate([np.arange(len(links)), np.full(n_new, -1)])[in_run]
    rid_a = _pair_ids(links["referral_id"], rec_refs, in_run)
    cid_a = _pair_ids(links["crm_id"], rec_cids, in_run)
    base_list = base_all[in_run] if base_all is not None else None
    pc_pos, crm_pos, synced_at = pc_pos_all[in_run], crm_pos_all[in_run], synced_all[in_run]
    n = len(rid_a)
    has_pc_a, has_crm_a = pc_pos >= 0, crm_pos >= 0
    has_base_a = np.concatenate([link_has_base, np.zeros(n_new, dtype=bool)])[in_run]
    p_updated = _take_time(pc, "updated_at", pc_pos, has_pc_a)
    c_modified = _take_time(crm, "modified_at", crm_pos, has_crm_a)
    pc_newer = p_updated > c_modified
    # A referral not read this run is judged by the stage last synced: won/lost means Closed.
    pc_closed = np.zeros(n, dtype=bool)
    pc_closed[has_pc_a] = (pc["status"] == "Closed").to_numpy(dtype=bool, na_value=False)[pc_pos[has_pc_a]]
    unread = np.flatnonzero(~has_pc_a)
    pc_closed[unread] = np.isin(_pair_objects(link_base.get("stage"), link_pos[unread]), ["won", "lost"])

    # -- merge, field by field, row by row ----------------------------------------------------
    # Each field's three versions (base, Partner Center, CRM) are aligned to the pairs and
    # compared as whole columns (by Arrow for values of one plain type, else on codes); only
    # the values a run writes or reports become Python objects.
    changes: list[pd.DataFrame] = []
    conflicts: list[pd.DataFrame] = []
    moved = ~has_base_a
    touched = np.zeros(n, dtype=bool)
    settled_values: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # field -> (pairs, values) not the base's

    for fm in synced:
        v = _versions(link_base.get(fm.name), link_pos, pc.get(fm.name), pc_pos, crm.get(fm.name), crm_pos, has_base_a)
        agree = v.same(P, C)
        pc_same, crm_same = v.same(P, B), v.same(C, B)
        pc_changed = ~pc_same | ~has_base_a
        crm_changed = ~crm_same | ~has_base_a
        if fm.direction == "pc_to_crm":
            crm_changed = np.zeros(n, dtype=bool)
        elif fm.direction == "crm_to_pc":
            pc_changed = np.zeros(n, dtype=bool)
        conflict = pc_changed & crm_changed & ~agree
        pc_wins = _authority(fm, pc_newer)
        to_crm = (pc_changed & ~crm_changed & ~agree) | (conflict & pc_wins)
        to_pc = (crm_changed & ~pc_changed & ~agree) | (conflict & ~pc_wins)
        if fm.direction == "crm_to_pc":
            to_crm = np.zeros(n, dtype=bool)
        if fm.direction == "pc_to_crm":
            to_pc = np.zeros(n, dtype=bool)

        blocked_terminal = to_pc & pc_closed
        blocked_transition = np.zeros(n, dtype=bool)
        if fm.name == "stage":
            asked = np.flatnonzero(to_pc & ~pc_closed)
            now, new = v.values(P, asked).astype(str), v.values(C, asked).astype(str)
            allowed = np.fromiter(
                (b in STAGE_TRANSITIONS.get(a, ()) for a, b in zip(now, new, strict=True)), dtype=bool, count=len(asked)
            )
            blocked_transition[asked[~allowed]] = True
        if allow_to_pc:
            for mask, reason in ((blocked_terminal, "terminal_referral"), (blocked_transition, "invalid_transition")):
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
                    skips.append(
                        pd.DataFrame(
                            {
                                "side": CRM,
                                "referral_id": rid_a[rows],
                                "crm_id": cid_a[rows],
                                "reason": reason,
                                "field": fm.name,
                                "detail": detail,
                            }
                        )
                    )
        to_crm &= allow_to_crm
        to_pc &= allow_to_pc & ~(blocked_terminal | blocked_transition)
        touched |= to_crm | to_pc

        for mask, target, old, new in ((to_crm, CRM, C, P), (to_pc, PC, P, C)):
            if mask.any():
                rows = np.flatnonzero(mask)
                reason = np.where(conflict[rows], "conflict", PC if target == CRM else CRM)
                frame = pd.DataFrame(
                    dtype=object,
                    data={
                        "target": target,
                        "field": fm.name,
                        "old": v.values(old, rows),
                        "new": v.values(new, rows),
                        "reason": reason,
                    },
                )
                frame.insert(0, "referral_id", rid_a[rows])  # ids keep their (Arrow) type
                frame.insert(1, "crm_id", cid_a[rows])
                changes.append(frame)
        if conflict.any():
            rows = np.flatnonzero(conflict)
            pc_value, crm_value = v.values(P, rows), v.values(C, rows)
            conflicts.append(
                pd.DataFrame(
                    dtype=object,
                    data={
                        "referral_id": rid_a[rows],
                        "crm_id": cid_a[rows],
                        "field": fm.name,
                        "base": v.values(B, rows),
                        "pc_value": pc_value,
                        "crm_value": crm_value,
                        "winner": np.where(pc_wins[rows], PC, CRM),
                        "chosen": np.where(pc_wins[rows], pc_value, crm_value),
                    },
                )
            )
        # The new base is what both sides hold after this run's writes; a blocked or
        # disallowed write leaves the old base, so the difference is seen again next run.
        source = np.full(n, B, dtype=np.int8)
        source[agree & (pc_changed | crm_changed)] = P
        source[to_crm] = P
        source[to_pc] = C
        moved |= ((source == P) & ~pc_same) | ((source == C) & ~crm_same)
        rows = np.flatnonzero(source != B)
        settled = np.empty(len(rows), dtype=object)
        for which in (P, C):
            picked = source[rows] == which
            settled[picked] = v.values(which, rows[picked])
        settled_values[fm.name] = (rows, settled)
        del v

    change_frame = pd.concat(changes, ignore_index=True) if changes else _frame(CHANGE_COLUMNS)
    conflict_frame = pd.concat(conflicts, ignore_index=True) if conflicts else _frame(CONFLICT_COLUMNS)

    # -- pairs with nothing to write: echo of our own write, or no change ---------------------
    idle = ~touched
    if idle.any():
        tolerance = np.timedelta64(int(ECHO_TOLERANCE.total_seconds() * 1_000_000), "us")
        ours = ((c_modified <= synced_at + tolerance) | ~has_crm_a) & ((p_updated <= synced_at + tolerance) | ~has_pc_a)
        reason = np.where(ours & has_base_a, "echo", "no_change")
        skips.append(
            pd.DataFrame(
                {
                    "side": "pair",
                    "referral_id": rid_a[idle],
                    "crm_id": cid_a[idle],
                    "reason": reason[idle],
                    "field": None,
                    "detail": None,
                }
            )
        )
    # Links to (re)write: where the agreed values moved, and links found on the records.
    rows = np.flatnonzero(moved)
    new_base_cols = {
        name: _settled(link_base.get(name), link_pos, rows, *found) for name, found in settled_values.items()
    }
    names = list(new_base_cols)
    if base_list is None:  # columnar in, columnar out: the old base's columns, the agreed values over them
        base_frame = pd.DataFrame({"referral_id": rid_a[rows], "crm_id": cid_a[rows]})
        for name, column in link_base.items():  # fields the merge did not settle keep their column type
            kept = new_base_cols[name] if name in new_base_cols else _pair_column(column, link_pos[rows])
            base_frame[f"{BASE_PREFIX}{name}"] = pd.Series(kept, dtype=object if name in new_base_cols else None)
        for name in new_base_cols.keys() - link_base.keys():
            base_frame[f"{BASE_PREFIX}{name}"] = pd.Series(new_base_cols[name], dtype=object)
    else:
        moved_base = []
        for i, agreed in zip(rows, zip(*(new_base_cols[name] for name in names), strict=True), strict=True):
            record = dict(base_list[i]) if isinstance(base_list[i], dict) else {}
            record.update(zip(names, agreed, strict=True))
            moved_base.append(record)
        base_frame = pd.DataFrame({"referral_id": rid_a[rows], "crm_id": cid_a[rows], "base": moved_base})

    # -- records with no link: creates, or skips with their reason -----------------------------
    lone_pc = pc[~_marked(len(pc), pc_pos_all)]
    lone_crm = crm[~_marked(len(crm), crm_pos_all)]
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

    skip_frame = pd.concat(skips, ignore_index=True)[SKIP_COLUMNS] if skips else _frame(SKIP_COLUMNS)
    return Plan(
        crm_creates=crm_creates,
        pc_creates=pc_creates,
        changes=change_frame[CHANGE_COLUMNS],
        conflicts=conflict_frame[CONFLICT_COLUMNS],
        skips=skip_frame,
        new_base=base_frame,
        recovered_links=recovered.reset_index(drop=True),
    )


def _authority(fm: FieldMapping, pc_newer: np.ndarray) -> np.ndarray:
    """True where Partner Center's value wins a conflict on this field."""
    if fm.direction == "pc_to_crm" or fm.authority == "partner_center":
        return np.ones(len(pc_newer), bool)
    if fm.direction == "crm_to_pc" or fm.authority == "crm":
        return np.zeros(len(pc_newer), bool)
    return pc_newer
