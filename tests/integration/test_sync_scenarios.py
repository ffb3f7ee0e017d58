"""Issue scenarios through the sync steps, against the sandbox, for both CRMs:
won, terminal, conflict, dry run and bad records."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cosell_sandbox.seed import iso
from tests.integration.test_sync_runner import run_sync

CRMS = ["salesforce", "dynamics365"]


@pytest.fixture
def synced(pc, pc_conn, dyn_conn, sf_conn, store_factory, tmp_path, request):
    """A first sync done for ``request.param``; returns (crm, store, links)."""
    crm = request.param
    pc.partner_center.seed(24, seed=31)
    if crm == "salesforce":
        pc.salesforce.seed(opportunities=10, accounts=5, flagged=4, seed=31)
    else:
        pc.dynamics365.seed(opportunities=10, accounts=5, flagged=4, seed=31)
    store = store_factory()
    first = run_sync(crm, store, tmp_path / "staging")
    assert first["pc_to_crm"]["failed"] == 0 and first["crm_to_pc"]["failed"] == 0, first
    return crm, store, store.get_links(crm)


@pytest.fixture
def store_factory(tmp_path):
    from cosell_sync.state import StateStore

    def make():
        s = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
        s.migrate()
        return s

    return make


def _incoming_link(pc, links):
    """A link whose referral came from Microsoft (so a Microsoft seller can act on it)."""
    for row in links.itertuples():
        ref = pc.partner_center.referrals[row.referral_id]
        if ref["direction"] == "Incoming" and ref["status"] in ("New", "Active"):
            return row, ref
    raise AssertionError("no open incoming referral was linked")


def _crm_edit(pc, crm, crm_id, *, notes=None, amount=None):
    if crm == "salesforce":
        changes = {k: v for k, v in (("Description", notes), ("Amount", amount)) if v is not None}
        pc.salesforce.user_edit("Opportunity", crm_id, changes)
    else:
        changes = {k: v for k, v in (("description", notes), ("estimatedvalue", amount)) if v is not None}
        pc.dynamics365.edit("opportunities", crm_id, changes)


@pytest.mark.parametrize("synced", CRMS, indirect=True)
def test_won_by_microsoft_closes_the_opportunity(pc, synced, tmp_path):
    crm, store, links = synced
    row, ref = _incoming_link(pc, links)
    if ref["status"] == "New":
        pc.partner_center._commit_update(ref, {**ref, "status": "Active", "substatus": "Accepted"}, "Microsoft")
        ref = pc.partner_center.referrals[row.referral_id]
    pc.partner_center._commit_update(ref, {**ref, "status": "Closed", "substatus": "Won"}, "Microsoft")
    report = run_sync(crm, store, tmp_path / "staging")
    assert report["pc_to_crm"]["updated"] >= 1 and report["pc_to_crm"]["failed"] == 0, report
    if crm == "salesforce":
        opp = pc.salesforce.get_record("Opportunity", row.crm_id)
        assert opp["StageName"] == "Closed Won" and opp["IsClosed"] is True
    else:
        opp = pc.dynamics365.row("opportunities", row.crm_id)
        assert (opp["statecode"], opp["statuscode"]) == (1, 3)  # through WinOpportunity
        assert pc.dynamics365.requests_matching("POST", "/api/data/v9.2/WinOpportunity")


@pytest.mark.parametrize("synced", CRMS, indirect=True)
def test_crm_edit_to_a_closed_referral_is_not_sent_and_the_reason_is_recorded(pc, synced, tmp_path):
    crm, store, links = synced
    row, ref = _incoming_link(pc, links)
    pc.partner_center._commit_update(ref, {**ref, "status": "Closed", "substatus": "Lost"}, "Microsoft")
    run_sync(crm, store, tmp_path / "staging")  # the loss reaches the CRM
    before = dict(pc.partner_center.referrals[row.referral_id])
    _crm_edit(pc, crm, row.crm_id, notes="edited after the loss")
    run_sync(crm, store, tmp_path / "staging")
    assert pc.partner_center.referrals[row.referral_id]["eTag"] == before["eTag"]  # nothing written
    skips = store.audit(crm=crm, referral_id=row.referral_id, action="skip")
    assert any(str(d).startswith("terminal_referral") for d in skips["detail"]), skips


@pytest.mark.parametrize("synced", CRMS, indirect=True)
def test_conflict_is_resolved_by_authority_and_audited(pc, synced, tmp_path):
    crm, store, links = synced
    row, ref = _incoming_link(pc, links)
    # deal_value: authority crm. Both sides change it between runs.
    pc.partner_center._commit_update(ref, {**ref, "details": {**ref["details"], "dealValue": 111.0}}, "Microsoft")
    _crm_edit(pc, crm, row.crm_id, amount=222.0)
    report = run_sync(crm, store, tmp_path / "staging")
    assert report["crm_to_pc"]["conflicts"] == 1, report
    assert pc.partner_center.referrals[row.referral_id]["details"]["dealValue"] == 222.0
    conflict = store.audit(crm=crm, referral_id=row.referral_id, action="conflict")
    assert conflict["field"].tolist() == ["deal_value"] and "crm wins" in conflict["detail"].iloc[0]


@pytest.mark.parametrize("synced", CRMS, indirect=True)
def test_dry_run_writes_nothing_and_reports_the_plan(pc, synced, tmp_path):
    crm, store, links = synced
    _, ref = _incoming_link(pc, links)
    pc.partner_center._commit_update(ref, {**ref, "name": "renamed by Microsoft"}, "Microsoft")
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    emulator.log.clear()
    pc.partner_center.log.clear()
    report = run_sync(crm, store, tmp_path / "staging", dry_run=True)
    assert report["dry_run"] and report["pc_to_crm"]["updated"] == 1
    writes = [
        r for r in list(emulator.log) + list(pc.partner_center.log) if r.method in ("POST", "PATCH", "PUT", "DELETE")
    ]
    assert writes == []
    real = run_sync(crm, store, tmp_path / "staging")  # the dry run committed nothing: the change is still there
    assert real["pc_to_crm"]["updated"] == 1


@pytest.mark.parametrize("synced", CRMS, indirect=True)
def test_bad_records_go_to_the_dead_letter_and_the_good_ones_sync(pc, synced, tmp_path):
    crm, store, _ = synced
    good = pc.partner_center.seed(5, seed=77)
    now = iso(datetime.now(UTC))  # new referrals: after the watermark
    for rid in good:
        pc.partner_center.referrals[rid].update(status="New", substatus="Pending", updatedDateTime=now)
    bad_values = [
        {"details": {"currency": "dollars"}},
        {"details": {"currency": "XYZ"}},
        {"details": {"dealValue": -5}},
        {"status": "Open", "substatus": "Whatever"},
        {"details": {"notes": "x" * 1_000_000}},
        {"details": {"dealValue": "lots"}},
        {"name": "y" * 1_000_000},
        {"details": {"closingDateTime": "someday"}},
        {"inviteContext": {"assistanceRequestCode": "PleaseHelp"}},
        {"details": {"currency": "€"}},
    ]
    bad = pc.partner_center.seed(len(bad_values), seed=78)
    for rid, change in zip(bad, bad_values, strict=True):
        doc = pc.partner_center.referrals[rid]
        doc.update(status="New", substatus="Pending", updatedDateTime=now)
        for key, value in change.items():
            doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    report = run_sync(crm, store, tmp_path / "staging")
    assert report["pc_to_crm"]["created"] == len(good), report
    dead = store.dead_letter(crm)
    assert set(bad) <= set(dead["record_key"]), dead
    for rid in bad:
        error = dead.set_index("record_key").loc[rid, "last_error"]
        assert error and len(error) < 4001
    assert not set(good) & set(dead["record_key"])
