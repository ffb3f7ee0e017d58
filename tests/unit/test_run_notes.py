"""The DAG run note: built from the run's committed report(s); a person's note is kept."""

from __future__ import annotations

import json

from cosell_sync.listeners.run_notes import _ours, note_for
from cosell_sync.state import StateStore

REPORT = {
    "pc_to_crm": {"created": 2, "updated": 1, "conflicts": 0, "failed": 0},
    "crm_to_pc": {"created": 0, "updated": 3, "conflicts": 1, "failed": 1},
    "unchanged": 7,
    "skipped": {"terminal": 1},
}


def test_note_for_sync_and_event_runs(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", json.dumps({"conn_type": "generic", "host": url}))
    with StateStore(url) as store:
        store.migrate()
        store.record_run(dag_id="cosell_sync_salesforce", run_id="r1", crm="salesforce", summary=REPORT)
        store.record_run(dag_id="cosell_referral_events.salesforce", run_id="e1", crm="salesforce", summary=REPORT)
    note = note_for("cosell_sync_salesforce", "r1", [])
    assert note.splitlines()[:3] == [
        "cosell_sync_salesforce",
        "Partner Center -> CRM: created 2, updated 1, conflicts 0, failed 0",
        "CRM -> Partner Center: created 0, updated 3, conflicts 1, failed 1",
    ]
    assert note_for("cosell_referral_events", "e1", []).startswith("cosell_referral_events.salesforce\n")
    failed = note_for("cosell_sync_salesforce", "r2", ["load_crm"])
    assert failed == "run failed in: load_crm\nnothing was committed; the next run retries"
    assert note_for("cosell_sync_salesforce", "r3", []) is None  # nothing to say: no note


def test_a_persons_note_is_never_overwritten():
    assert _ours(None, "cosell_sync_salesforce")
    assert _ours("run failed in: load_crm", "cosell_sync_salesforce")
    assert _ours("cosell_sync_salesforce\nPartner Center -> CRM: ...", "cosell_sync_salesforce")
    assert not _ours("Paused while the CRM admin fixes the picklist", "cosell_sync_salesforce")
