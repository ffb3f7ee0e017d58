"""The record step is one transaction (issue 17): links, audit, dead letter, run summary and
watermarks land together or not at all, through the runner's commit, for both CRMs.

A run whose PATCH to Partner Center was refused has a failure to record. If the commit dies
while recording it (or the run summary), nothing of the run may be recorded: the watermarks
stay where they were (else the next run reads past the failed record and nobody retries it),
the links and audit stay as they were, and a retry of the commit records everything once.
"""

from __future__ import annotations

import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync.pipeline import commit
from cosell_sync.state import StateStore
from cosell_sync.state import dead_letter as dead_letter_module
from cosell_sync.state import runs as runs_module
from tests.integration.test_sync_dead_letter import REFERRALS, rows_for, synced_then_edited_by_a_seller
from tests.integration.test_sync_retries import CRMS, new_job, run_load_crm, run_load_pc, up_to_load

SIDES = ("partner_center", "crm", "full_sync")


def _recorded(store: StateStore, crm: str, dag_id: str, run_id: str) -> tuple:
    links = store.get_links(crm)[["referral_id", "crm_id", "base_hash", "synced_at", "run_id"]]
    return (
        links.to_dict("records"),
        {side: store.get_watermark(dag_id, side) for side in SIDES},
        store.dead_letter(crm)[["record_key", "attempts"]].to_dict("records"),
        len(store.audit(run_id=run_id)),
        store.get_run(dag_id, run_id),
    )


@pytest.mark.parametrize("crm", CRMS)
@pytest.mark.parametrize("broken", ["failures", "summary"])
def test_a_commit_that_dies_recording_failures_or_the_summary_records_nothing(
    pc, conns, store, tmp_path, monkeypatch, crm, broken
):
    staging = tmp_path / "staging"
    rid, crm_id = synced_then_edited_by_a_seller(pc, crm, store, staging)

    job = new_job(crm, store, staging)
    up_to_load(job, store)
    run_load_crm(job)
    pc.partner_center.faults.configure(FaultConfig(rate_5xx=1.0, methods=("PATCH",), path_prefix=REFERRALS + rid))
    try:
        run_load_pc(job)
    finally:
        pc.partner_center.faults.clear()
    before = _recorded(store, crm, job.dag_id, job.run_id)
    assert before[3] == 0 and before[4] is None and before[2] == []

    def crash(*args, **kwargs):
        raise RuntimeError("the worker died while recording")

    target = (dead_letter_module, "write_failures") if broken == "failures" else (runs_module, "write_run")
    with monkeypatch.context() as m:
        m.setattr(*target, crash)
        with pytest.raises(RuntimeError, match="died while recording"):
            commit(job, store)
    assert _recorded(store, crm, job.dag_id, job.run_id) == before  # nothing of the run landed

    report = commit(job, store)  # the commit task's retry
    assert report["crm_to_pc"]["failed"] == 1, report
    row = rows_for(store, crm, crm_id)
    assert row[["direction", "attempts"]].values.tolist() == [["crm_to_pc", 1]], store.dead_letter(crm)
    after = _recorded(store, crm, job.dag_id, job.run_id)
    assert after[1]["full_sync"] > before[1]["full_sync"]
    assert after[3] > 0
    assert after[4]["summary"]["crm_to_pc"]["failed"] == 1
