"""Step 2 of the planner: one field's three versions (the base, Partner Center's, the CRM's),
aligned to the pairs and compared as whole columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pac

from cosell_sync.engine.mapping import KEEP
from cosell_sync.engine.plan.columns import aligned, arrow, dictionary_codes, pair_objects

B, P, C = 0, 1, 2  # a field's three versions: the base, Partner Center's, the CRM's


class Versions:
    """One field's three versions (``B``, ``P``, ``C``), aligned to the pairs: a missing value
    is None, the base's "no opinion" marker counts as missing (it is never a synced value), and
    a pair's side not read this run holds the base."""

    def same(self, x: int, y: int) -> np.ndarray:
        """Per pair: do versions ``x`` and ``y`` hold the same value (both missing counts)?"""
        raise NotImplementedError

    def values(self, which: int, rows: np.ndarray) -> np.ndarray:
        """Version ``which`` of the pairs at ``rows``, as Python values (None when missing)."""
        raise NotImplementedError


class ArrowVersions(Versions):
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


class CodedVersions(Versions):
    """Values of mixed types, factorized together by pandas: integer codes (-1 missing)."""

    def __init__(self, codes: list[np.ndarray], uniques: np.ndarray) -> None:
        self.codes = codes
        self.lookup = np.append(uniques, None)  # code -1 -> None

    def same(self, x: int, y: int) -> np.ndarray:
        return self.codes[x] == self.codes[y]

    def values(self, which: int, rows: np.ndarray) -> np.ndarray:
        return self.lookup[self.codes[which][rows]]


def versions(
    base: pd.Series | None,
    link_pos: np.ndarray,
    pc_col: pd.Series | None,
    pc_pos: np.ndarray,
    crm_col: pd.Series | None,
    crm_pos: np.ndarray,
    has_base: np.ndarray,
) -> Versions:
    """One field's versions. Dictionary-encoded text is compared by its codes, values of one plain
    type stay in Arrow, mixed ones are factorized."""
    n = len(link_pos)
    has_pc, has_crm = pc_pos >= 0, crm_pos >= 0
    parts = [(base, link_pos), (pc_col, pc_pos), (crm_col, crm_pos)]
    pairs_sides = (has_pc, has_crm, has_base)
    if (by_code := dictionary_versions(parts, pairs_sides)) is not None:
        return by_code
    arrays = [pa.nulls(0) if col is None else arrow(col) for col, _ in parts]
    kinds = {a.type for a in arrays if a is not None and not pa.types.is_null(a.type) and len(a)}
    if kinds <= {pa.string(), pa.large_string()} and len(kinds) > 1:
        kinds = {pa.large_string()}
    if all(a is not None for a in arrays) and len(kinds) <= 1:
        kind = kinds.pop() if kinds else pa.string()
        b, p, c = (aligned(a, pos, kind) for (_, pos), a in zip(parts, arrays, strict=True))
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
        return ArrowVersions([b, p, c])
    columns = [pair_objects(col, pos) for col, pos in parts]
    columns[0] = np.where(columns[0] == KEEP, None, columns[0])
    codes, uniques = pd.factorize(np.concatenate(columns))
    return coded(codes[:n], codes[n : 2 * n], codes[2 * n :], np.asarray(uniques, dtype=object), pairs_sides)


def dictionary_versions(parts: list[tuple[object, np.ndarray]], sides: tuple[np.ndarray, ...]) -> Versions | None:
    """The versions of dictionary-encoded text (categorical columns, as a columnar store hands
    them over), compared by their codes: each column's small dictionary is mapped onto one
    shared dictionary and no value is decoded. None unless every column present is so encoded."""
    found = [dictionary_codes(col) for col, _ in parts]
    if any(f is None for f in found):
        return None
    shared: dict[str, int] = {}
    aligned_codes = []
    for (codes, dictionary), (_, pos) in zip(found, parts, strict=True):  # type: ignore[misc]
        remap = np.array([-1 if v is None else shared.setdefault(v, len(shared)) for v in dictionary] + [-1], np.int32)
        if not len(codes):
            aligned_codes.append(np.full(len(pos), -1, dtype=remap.dtype))
            continue
        at = codes[pos]
        if not (present := pos >= 0).all():
            at = np.where(present, at, -1)
        aligned_codes.append(remap[at])  # a code of -1 (missing) stays -1
    uniques = np.empty(len(shared), dtype=object)
    uniques[:] = list(shared)
    return coded(*aligned_codes, uniques, sides)


def coded(
    cb: np.ndarray, cp: np.ndarray, cc: np.ndarray, uniques: np.ndarray, sides: tuple[np.ndarray, ...]
) -> Versions:
    """Versions from codes into ``uniques`` (-1 missing), with the rules of :func:`versions`: the
    base's "no opinion" marker is missing, a side not read holds the base, and a side's marker
    holds the base (or, with no base, the other side's value)."""
    has_pc, has_crm, has_base = sides
    keep = np.flatnonzero(uniques == KEEP)
    if keep.size:
        cb = np.where(cb == keep[0], -1, cb)
    cp = np.where(has_pc, cp, cb)
    cc = np.where(has_crm, cc, cb)
    if keep.size:
        cp = np.where(cp == keep[0], np.where(has_base, cb, cc), cp)
        cc = np.where(cc == keep[0], np.where(has_base, cb, cp), cc)
    return CodedVersions([cb, cp, cc], uniques)
