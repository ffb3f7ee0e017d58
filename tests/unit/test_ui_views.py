"""The Co-sell page's queries and HTML, without any Airflow component: a state DB filled
through the store (and, for the size test, 100,000 bulk-inserted audit rows)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from cosell_sync.state import StateStore
from cosell_sync.state.schema import audit_t, dead_letter_t
from cosell_sync.ui import queries
from cosell_sync.ui.render import Links, render, render_index

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EVIL = '<script>alert("x")</script>&'


@pytest.fixture
def store(tmp_path):
    s = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    s.migrate()
    yield s
    s.close()


def _links(n: int, prefix: str = "ref") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "referral_id": [f"{prefix}-{i:04d}" for i in range(n)],
            "crm_id": [f"006{i:015d}" for i in range(n)],
            "base": [
                {"name": f"Deal {i}", "customer_name": "Contoso Ltd" if i == 3 else f"Fabrikam {i}"} for i in range(n)
            ],
        }
    )


def _fill(store: StateStore) -> None:
    store.upsert_links("salesforce", _links(120), "run-1")
    store.upsert_links("dynamics365", _links(2, "dyn"), "run-1")
    store.append_audit(
        [
            {
                "at": T0,
                "dag_id": "cosell_sync_salesforce",
                "run_id": "manual__r1",
                "crm": "salesforce",
                "direction": "pc_to_crm",
                "referral_id": "ref-0003",
                "crm_id": "006000000000000003",
                "action": "create",
                "detail": "created",
            },
            {
                "at": T0 + timedelta(minutes=5),
                "dag_id": "cosell_sync_salesforce",
                "run_id": "manual__r2",
                "crm": "salesforce",
                "direction": "crm_to_pc",
                "referral_id": "ref-0003",
                "crm_id": "006000000000000003",
                "action": "conflict",
                "field": "deal_value",
                "old_value": 100,
                "new_value": 250,
                "detail": "partner_center=200 crm=250; crm wins",
            },
            {
                "at": T0 + timedelta(minutes=6),
                "dag_id": "cosell_sync_salesforce",
                "run_id": "manual__r2",
                "crm": "salesforce",
                "direction": "pc_to_crm",
                "referral_id": "ref-0004",
                "crm_id": None,
                "action": "update",
                "field": "notes",
                "new_value": EVIL,
            },
        ]
    )
    store.record_failures(
        "salesforce",
        "pc_to_crm",
        [
            {
                "record_key": "ref-0004",
                "payload": {"action": "update", "fields": {"close_date": "x"}, "referral_id": "ref-0004"},
                "error": EVIL,
                "error_code": "INVALID",
            }
        ],
        "manual__r2",
    )
    store.record_failures(
        "salesforce",
        "crm_to_pc",
        [{"record_key": "006NEW", "payload": {"side": "crm"}, "error": "deal_value: must be positive (got -1)"}],
        "manual__r2",
    )
    store.record_run(
        dag_id="cosell_sync_salesforce",
        run_id="manual__r2",
        crm="salesforce",
        summary={
            "pc_to_crm": {"created": 1, "updated": 2, "conflicts": 0, "failed": 1},
            "crm_to_pc": {"created": 0, "updated": 1, "conflicts": 1, "failed": 1},
            "unchanged": 3,
        },
    )
    store.inbox_add(
        [
            {
                "dedup_key": "k1",
                "event_name": "referral-updated",
                "referral_id": "ref-0001",
                "resource_uri": "https://api.partnercenter.microsoft.com/v1/referrals/x",
            }
        ]
    )


def test_overview_counts(store):
    _fill(store)
    o = queries.overview(store.engine, ["salesforce", "dynamics365"], max_attempts=store.max_attempts)
    sf = o["crms"]["salesforce"]
    assert sf["links"] == 120 and o["crms"]["dynamics365"]["links"] == 2
    assert sf["conflicts"] == 1
    assert sf["dead_letter"] == {"crm_to_pc": {"total": 1, "exhausted": 0}, "pc_to_crm": {"total": 1, "exhausted": 0}}
    assert sf["directions"]["pc_to_crm"] == {"created": 1, "updated": 2, "conflicts": 0, "failed": 1}
    assert sf["last_run"]["run_id"] == "manual__r2" and sf["last_sync_run_id"] == "manual__r2"
    assert o["inbox"]["pending"] == 1
    assert o["crms"]["dynamics365"]["last_run"] is None


def test_links_search_and_paging(store):
    _fill(store)
    first = queries.links_page(store.engine, "salesforce", page=1)
    second = queries.links_page(store.engine, "salesforce", page=3)
    assert len(first.rows) == queries.PAGE_SIZE and first.has_next
    assert len(second.rows) == 20 and not second.has_next
    assert [r["referral_id"] for r in queries.links_page(store.engine, "salesforce", q="contoso").rows] == ["ref-0003"]
    assert [r["referral_id"] for r in queries.links_page(store.engine, "salesforce", q="006000000000000007").rows] == [
        "ref-0007"
    ]
    assert [r["referral_id"] for r in queries.links_page(store.engine, "salesforce", q="ref-0010").rows] == ["ref-0010"]
    assert queries.links_page(store.engine, "salesforce", q="%").rows == []  # LIKE wildcards are literal
    status = {r["referral_id"]: r["status"] for r in first.rows}
    assert status["ref-0004"] == "failing" and status["ref-0003"] == "synced"


def test_dead_letter_conflicts_timeline(store):
    _fill(store)
    dead = queries.dead_letter_page(store.engine, ["salesforce"], max_attempts=5)
    by_key = {r["record_key"]: r for r in dead.rows}
    assert by_key["ref-0004"]["field"] == "close_date" and by_key["ref-0004"]["referral_id"] == "ref-0004"
    assert by_key["006NEW"]["field"] == "deal_value" and by_key["006NEW"]["referral_id"] is None
    assert queries.dead_letter_page(store.engine, ["dynamics365"]).rows == []
    conflicts = queries.conflicts_page(store.engine, ["salesforce"]).rows
    assert len(conflicts) == 1
    c = conflicts[0]
    assert (c["field"], c["base"], c["chosen"], c["winner"]) == ("deal_value", 100, 250, "crm")
    assert (c["partner_center_value"], c["crm_value"]) == ("200", "250")
    t = queries.timeline_page(store.engine, "salesforce", referral_id="ref-0003")
    assert [r["action"] for r in t.rows] == ["conflict", "create"]  # newest first
    assert t.extra["link"]["crm_id"] == "006000000000000003"


def test_dismiss_removes_the_row_and_audits_who(store):
    _fill(store)
    assert queries.dismiss(store.engine, "salesforce", "pc_to_crm", "ref-0004", user="alice", now=T0)
    assert not queries.dismiss(store.engine, "salesforce", "pc_to_crm", "ref-0004", user="alice")
    assert len(store.dead_letter("salesforce")) == 1
    audit = store.audit(referral_id="ref-0004", action=queries.DISMISS_ACTION)
    assert len(audit) == 1
    row = audit.iloc[0]
    assert "dismissed from the dead letter by alice at 2026-03-01T12:00:00+00:00" in row["detail"]
    assert row["run_id"] == queries.DISMISS_RUN_ID and row["field"] == "dead_letter"


def _page(store: StateStore, crm_hosts=None) -> str:
    links = Links("/cosell/ui", "", crm_hosts or {"salesforce": "https://acme.my.salesforce.com"}, {})
    overview = queries.overview(store.engine, ["salesforce"])
    for o in overview["crms"].values():
        o.update(airflow_run={"run_id": "manual__r2", "state": "success"}, report="report")
    return render_index(
        store.engine,
        links,
        crms=["salesforce"],
        overview=overview,
        link_crm="salesforce",
        q="ref-0004",
        user="alice",
        extra_runs={},
        actionable={"salesforce"},
        csrf="tok",
    )


def test_page_has_the_labels_links_and_escapes_everything(store):
    _fill(store)
    html = _page(store)
    for heading in ("Overview", "Links", "Dead letter", "Conflicts"):
        assert re.search(rf"<h2[^>]*>{heading}</h2>", html), heading
    assert html.count(">Retry now</button>") == 2 and html.count(">Dismiss</button>") == 2
    assert ">Timeline</a>" in html
    assert EVIL not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in html
    assert 'href="https://partner.microsoft.com/dashboard/referrals/v2/leads/ref-0004"' in html
    assert 'href="https://acme.my.salesforce.com/lightning/r/Opportunity/006000000000000004/view"' in html
    assert 'href="/dags/cosell_sync_salesforce/runs/manual__r2" target="_top"' in html
    assert 'name="csrf" value="tok"' in html


def test_timeline_page_links_runs(store):
    _fill(store)
    t = queries.timeline_page(store.engine, "salesforce", referral_id="ref-0004")
    html = render("timeline.html", Links("/cosell/ui", "/base", {}, {}), user="bob", t=t)
    assert "<h2>Timeline</h2>" in html and 'href="/base/dags/cosell_sync_salesforce/runs/manual__r2"' in html
    assert EVIL not in html


def test_pages_with_100000_audit_rows(store, capsys):
    """Fills 100,000 audit rows in one bulk insert and renders every view; the timings are
    printed (no timed assert: ``make bench`` is where numbers are judged)."""
    _fill(store)
    rows = []
    for i in range(100_000):
        ref = f"ref-{i % 120:04d}"
        rows.append(
            {
                "at": T0 + timedelta(seconds=i),
                "dag_id": "cosell_sync_salesforce",
                "run_id": f"scheduled__{i // 500}",
                "crm": "salesforce",
                "direction": "pc_to_crm" if i % 2 else "crm_to_pc",
                "referral_id": ref,
                "crm_id": None,
                "action": "conflict" if i % 50 == 0 else "update",
                "field": "deal_value",
                "old_value": "1",
                "new_value": "2",
                "detail": "partner_center=1 crm=2; crm wins" if i % 50 == 0 else None,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(audit_t.insert(), rows)
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_t)).scalar() == 100_003
        assert conn.execute(sa.select(sa.func.count()).select_from(dead_letter_t)).scalar() == 2
    timings = {}
    start = time.perf_counter()
    html = _page(store)
    timings["index"] = time.perf_counter() - start
    start = time.perf_counter()
    t = queries.timeline_page(store.engine, "salesforce", referral_id="ref-0003", page=3)
    render("timeline.html", Links("/cosell/ui", "", {}, {}), user="u", t=t)
    timings["timeline p3"] = time.perf_counter() - start
    start = time.perf_counter()
    c = queries.conflicts_page(store.engine, ["salesforce"], page=20)
    timings["conflicts p20"] = time.perf_counter() - start
    assert len(t.rows) == queries.PAGE_SIZE and t.has_next
    assert len(c.rows) == queries.PAGE_SIZE and c.rows[0]["at"] > c.rows[-1]["at"]
    assert "Retry now" in html
    with capsys.disabled():
        print("\nCo-sell page with 100,000 audit rows (SQLite):", {k: f"{v * 1000:.0f} ms" for k, v in timings.items()})
