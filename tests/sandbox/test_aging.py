"""The sandbox's "time passes" control (``age``): records' stamps move into the past, as if
written earlier; the server's own clock (its answers' Date headers) goes on as it is. Tests and
the quiet-run benchmark use it to start a run minutes after the last one without waiting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import requests

from cosell_sandbox.partner_center.records import _parse_stamp


def test_partner_center_age_moves_every_stamp_back_and_not_the_servers_clock(pc):
    ids = pc.partner_center.seed(3, seed=4)
    before = {i: dict(pc.partner_center.referrals[i]) for i in ids}
    assert pc.partner_center.age(600) == 3
    for i in ids:
        now, then = pc.partner_center.referrals[i], before[i]
        for key in ("createdDateTime", "updatedDateTime"):
            assert _parse_stamp(then[key]) - _parse_stamp(now[key]) == timedelta(seconds=600)
            assert len(now[key]) == len(then[key])  # the same 7-digit format
        assert now["eTag"] == then["eTag"]
    answer = requests.get(f"{pc.origin('partner_center')}/_sandbox/state", verify=str(pc.pki.ca_cert), timeout=10)
    served = parsedate_to_datetime(answer.headers["Date"])
    assert abs(served - datetime.now(UTC)) < timedelta(seconds=5)


def test_parse_stamp_reads_the_formats_partner_center_writes():
    assert _parse_stamp("2026-11-30T18:00:09.1234560Z") == datetime(2026, 11, 30, 18, 0, 9, 123456, tzinfo=UTC)
    assert _parse_stamp("2026-11-30T18:00:09Z") == datetime(2026, 11, 30, 18, 0, 9, tzinfo=UTC)
    assert _parse_stamp("2026-11-30T18:00:09.5+00:00") == datetime(2026, 11, 30, 18, 0, 9, 500000, tzinfo=UTC)


def test_dataverse_age_moves_createdon_and_modifiedon_back(pc):
    pc.dynamics365.seed(opportunities=2, accounts=1, flagged=1, seed=4)
    rows = {r["opportunityid"]: dict(r) for r in pc.dynamics365.rows("opportunities")}
    assert pc.dynamics365.age(120) >= 3  # opportunities, an account, currencies ...
    for row in pc.dynamics365.rows("opportunities"):
        then = rows[row["opportunityid"]]
        for column in ("createdon", "modifiedon"):
            moved = datetime.fromisoformat(then[column].replace("Z", "+00:00")) - datetime.fromisoformat(
                row[column].replace("Z", "+00:00")
            )
            assert moved == timedelta(seconds=120)
        assert row["versionnumber"] == then["versionnumber"]


def test_salesforce_age_moves_every_stamp_back(pc):
    from cosell_sandbox.salesforce.soql import parse_datetime

    pc.salesforce.seed(opportunities=2, accounts=1, flagged=1, seed=4)
    before = {r["Id"]: dict(r) for r in pc.salesforce.list_records("Opportunity")}
    assert pc.salesforce.age(90) >= 3  # opportunities and the account
    for row in pc.salesforce.list_records("Opportunity"):
        then = before[row["Id"]]
        for key in ("CreatedDate", "LastModifiedDate", "SystemModstamp"):
            assert parse_datetime(then[key]) - parse_datetime(row[key]) == timedelta(seconds=90)


def test_sandbox_age_moves_every_emulator_and_the_watermarks(pc, tmp_path):
    from cosell_sync.state import StateStore

    pc.partner_center.seed(1, seed=4)
    pc.salesforce.seed(opportunities=1, accounts=1, flagged=1, seed=4)
    referral = dict(next(iter(pc.partner_center.referrals.values())))
    opportunity = dict(pc.salesforce.list_records("Opportunity")[0])
    mark = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.migrate()
        store.set_watermark("cosell_sync_salesforce", "crm", mark, "run-1")
        pc.age(60, store=store, dag_ids=["cosell_sync_salesforce"])
        assert store.get_watermark("cosell_sync_salesforce", "crm") == mark - timedelta(seconds=60)
        assert store.get_watermark("cosell_sync_salesforce", "partner_center") is None  # none: none made
    aged = pc.partner_center.referrals[referral["id"]]
    assert _parse_stamp(referral["updatedDateTime"]) - _parse_stamp(aged["updatedDateTime"]) == timedelta(seconds=60)
    assert pc.salesforce.list_records("Opportunity")[0]["SystemModstamp"] != opportunity["SystemModstamp"]
