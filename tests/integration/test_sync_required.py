"""Issue 12: a referral missing a field the mapping declares `required:` for a create (customer
name, country) creates no opportunity; it is dead-lettered naming the field, and the others sync."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cosell_sandbox.seed import iso
from cosell_sync.pipeline import commit, read_frame
from tests.integration.test_sync_retries import CRMS, new_job, run_load_crm, run_load_pc, seed, up_to_load


@pytest.mark.parametrize("crm", CRMS)
def test_a_referral_missing_a_required_field_is_dead_lettered_not_created(pc, conns, store, tmp_path, crm):
    seed(pc, crm)
    now = iso(datetime.now(UTC))
    ids = pc.partner_center.seed(4, seed=64)
    for i, rid in enumerate(ids):
        doc = pc.partner_center.referrals[rid]
        doc.update(status="New", substatus="Pending", updatedDateTime=now, externalReferenceId=None)
        doc["customerProfile"]["name"] = f"Req Customer {i}"
    pc.partner_center.referrals[ids[0]]["customerProfile"]["name"] = None
    pc.partner_center.referrals[ids[1]]["customerProfile"]["address"]["country"] = None
    job = new_job(crm, store, tmp_path / "staging")
    up_to_load(job, store)
    planned = set(read_frame(job, "plan_crm_creates")["referral_id"])
    assert ids[0] not in planned and ids[1] not in planned and ids[2] in planned and ids[3] in planned
    run_load_crm(job)
    run_load_pc(job)
    report = commit(job, store)
    assert report["pc_to_crm"]["failed"] == 2, report
    dead = store.dead_letter(crm)
    errs = dict(zip(dead["record_key"], dead["last_error"], strict=True))
    assert "customerProfile.name: is required" in errs[ids[0]]
    assert "customerProfile.address.country: is required" in errs[ids[1]]
    assert set(errs) == {ids[0], ids[1]}
