"""pipeline.commit._values_by_key: a new link's base from the staged rows, in one pass (issue 16),
the same values a row-by-row read gave."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cosell_sync.engine.mapping import KEEP
from cosell_sync.pipeline.commit import _values_by_key
from cosell_sync.sides.base import plain

FIELDS = ["name", "amount", "close_date", "help_code", "absent"]


def _rows() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "referral_id": ["r1", "r2", "r3"],
            "name": ["Deal 1", None, "Deal 3"],
            "amount": [1000.5, np.nan, 7.0],
            "close_date": [pd.Timestamp("2027-01-31"), pd.NaT, pd.Timestamp("2027-02-01")],
            "help_code": [KEEP, "Technical", None],
        }
    )
    return frame.set_index("referral_id")


def _row_by_row(rows: pd.DataFrame, key: str) -> dict:
    row = rows.loc[key]
    return {f: None if row.get(f) == KEEP else plain(row.get(f)) for f in FIELDS}


def test_the_same_values_as_reading_each_row():
    rows = _rows()
    got = _values_by_key(rows, FIELDS, {"r1", "r2", "r3"})
    assert got == {key: _row_by_row(rows, key) for key in ("r1", "r2", "r3")}
    assert got["r1"] == {
        "name": "Deal 1",
        "amount": 1000.5,
        "close_date": "2027-01-31T00:00:00",
        "help_code": None,
        "absent": None,
    }
    assert list(got["r2"]) == FIELDS


def test_only_the_keys_asked_for_and_none_unknown():
    rows = _rows()
    assert set(_values_by_key(rows, FIELDS, {"r2", "nope"})) == {"r2"}
    assert _values_by_key(rows, FIELDS, set()) == {}
    assert _values_by_key(rows.iloc[:0], FIELDS, {"r1"}) == {}
