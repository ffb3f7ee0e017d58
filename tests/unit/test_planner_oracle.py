"""The vectorized planner agrees with a plain per-record merge on random data."""

from __future__ import annotations

import math

import pytest

from benchmarks.reference_planner import reference_plan
from benchmarks.synthetic import make_case
from cosell_sync.engine.mapping import load_mapping
from cosell_sync.engine.plan import plan


def _value(v):
    """Missing is missing, whether None or NaN."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


@pytest.mark.parametrize("shuffled", [False, True], ids=["in_link_order", "shuffled_partial"])
@pytest.mark.parametrize("typed", [True, False], ids=["arrow_frames", "object_frames"])
@pytest.mark.parametrize("columnar", [True, False], ids=["columnar_base", "dict_base"])
@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planner_matches_the_per_record_reference(crm, seed, columnar, typed, shuffled):
    mapping = load_mapping(crm)
    pc, crm_rows, links = make_case(
        3000, mapping, seed=seed, changed=0.15, both=0.05, columnar=columnar, typed=typed, shuffled=shuffled
    )
    result = plan(pc, crm_rows, links, mapping)
    expected = reference_plan(pc.to_dict("records"), crm_rows.to_dict("records"), links.to_dict("records"), mapping)

    got_changes = {
        (r.referral_id, r.crm_id, r.target, r.field, _value(r.new)) for r in result.changes.itertuples(index=False)
    }
    want_changes = {(*key, _value(new)) for *key, new in expected["changes"]}
    assert want_changes, "the random case must produce changes"
    assert got_changes == want_changes
    assert set(result.crm_creates["referral_id"]) == expected["crm_creates"]
    assert set(result.pc_creates["crm_id"]) == expected["pc_creates"]
    got_conflicts = {(r.referral_id, r.field, r.winner) for r in result.conflicts.itertuples(index=False)}
    assert expected["conflicts"] and got_conflicts == expected["conflicts"]
