"""The links' bases (the canonical values last synced): as ``base.<field>`` columns or, in the
older form, a dict per link; and a field's new base once the run settled it."""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import KEEP
from cosell_sync.engine.plan.columns import objects, pair_objects

BASE_PREFIX = "base."


def base_columns(bases: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
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
    columns = [objects(links[c]) for c in prefixed]
    out = links.drop(columns=prefixed)
    out["base"] = pd.Series([dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)],
                            index=links.index, dtype=object)  # fmt: skip
    return out


def settled(
    base: pd.Series | None, link_pos: np.ndarray, rows: np.ndarray, changed: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """A field's new base at the pairs ``rows``: its old base (the "no opinion" marker as None),
    overwritten at the pairs ``changed`` (sorted) by their settled ``values``."""
    out = pair_objects(base, link_pos[rows], blank=KEEP)
    at = np.searchsorted(rows, changed)
    hit = at < len(rows)
    hit[hit] = rows[at[hit]] == changed[hit]
    out[at[hit]] = values[hit]
    return out
