"""Links with their bases as ``base.<field>`` columns plan exactly what dict bases plan."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.synthetic import make_case
from cosell_sync.engine.mapping import KEEP, load_mapping
from cosell_sync.engine.plan import plan, with_base_dicts


def _plain(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _rows(frame: pd.DataFrame) -> list[tuple]:
    return sorted((tuple(str(_plain(v)) for v in row) for row in frame.itertuples(index=False)), key=str)


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_columnar_bases_plan_what_dict_bases_plan(crm):
    mapping = load_mapping(crm)
    pc, crm_rows, columnar = make_case(2000, mapping, seed=5, changed=0.2, both=0.05)
    _, _, dicts = make_case(2000, mapping, seed=5, changed=0.2, both=0.05, columnar=False)
    assert "base" not in columnar.columns and "base.stage" in columnar.columns
    got, want = plan(pc, crm_rows, columnar, mapping), plan(pc, crm_rows, dicts, mapping)
    for part in ("changes", "conflicts", "skips", "crm_creates", "pc_creates", "recovered_links"):
        assert _rows(getattr(got, part)) == _rows(getattr(want, part)), part
    assert len(want.changes) and len(want.conflicts) and len(want.new_base)
    assert "base" not in got.new_base.columns  # columnar in, columnar out
    as_dicts = with_base_dicts(got.new_base)
    got_base = {
        r: {k: _plain(v) for k, v in b.items()} for r, b in zip(as_dicts["referral_id"], as_dicts["base"], strict=True)
    }
    want_base = {
        r: {k: _plain(v) for k, v in b.items()}
        for r, b in zip(want.new_base["referral_id"], want.new_base["base"], strict=True)
    }
    assert got_base == want_base


def test_a_link_missing_a_base_column_reads_it_as_never_synced_value():
    mapping = load_mapping("salesforce")
    pc, crm_rows, links = make_case(200, mapping, seed=9, changed=0.3, both=0.1)
    _, _, dicts = make_case(200, mapping, seed=9, changed=0.3, both=0.1, columnar=False)
    links = links.drop(columns=["base.notes"])
    dicts["base"] = [{k: v for k, v in b.items() if k != "notes"} for b in dicts["base"]]
    got, want = plan(pc, crm_rows, links, mapping), plan(pc, crm_rows, dicts, mapping)
    assert _rows(got.changes) == _rows(want.changes)
    assert (got.changes["field"] == "notes").any()


def test_with_base_dicts_leaves_dict_links_alone():
    links = pd.DataFrame({"referral_id": ["r1"], "crm_id": ["c1"], "base": [{"name": "x"}]})
    assert with_base_dicts(links) is links
    columnar = pd.DataFrame({"referral_id": ["r1"], "crm_id": ["c1"], "base.name": ["x"], "base.notes": [None]})
    assert with_base_dicts(columnar)["base"].tolist() == [{"name": "x", "notes": None}]


@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_categorical_text_plans_what_plain_text_plans(crm):
    """Categorical columns (compared by their codes) plan exactly what the same values as Python
    objects plan: with "no opinion" markers and missing values on every side, each side's
    categories its own, and a tenth of each side not read this run."""
    from benchmarks.synthetic import _typed

    mapping = load_mapping(crm)
    pc, crm_rows, links = make_case(3000, mapping, seed=11, changed=0.3, both=0.1, typed=False, shuffled=True)
    rng = np.random.default_rng(11)
    for frame, columns in (
        (pc, ["stage", "help_code", "notes"]),
        (crm_rows, ["stage", "help_code", "currency"]),
        (links, ["base.stage", "base.help_code", "base.close_date"]),
    ):
        for column in columns:
            values = frame[column].astype(object).to_numpy(copy=True)
            values[rng.random(len(frame)) < 0.05] = KEEP
            values[rng.random(len(frame)) < 0.03] = None
            frame[column] = values
    typed = [_typed(frame) for frame in (pc, crm_rows, links)]
    assert isinstance(typed[0]["stage"].dtype, pd.CategoricalDtype)
    assert isinstance(typed[2]["base.stage"].dtype, pd.CategoricalDtype)
    got, want = plan(*typed, mapping), plan(pc, crm_rows, links, mapping)
    for part in ("changes", "conflicts", "skips", "new_base", "recovered_links"):
        assert _rows(getattr(got, part)) == _rows(getattr(want, part)), part
    assert len(want.changes) and len(want.conflicts) and (want.changes["field"] == "stage").any()
