"""The Co-sell page on a real API server (the shared Airflow, tests/shared_airflow.py), with the
simple auth manager's users logging in through ``/auth/token``: it is listed in the navigation, refuses anonymous
requests, lets a viewer read and refuses their actions, and lets an admin Retry now (a DAG
run with the dead letter's referral ids) and Dismiss (an audit row naming them) through the
HTML forms (cookie + CSRF token) and the JSON API (Bearer)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import requests

from cosell_sync.state import StateStore
from tests.shared_airflow import SHARED_GROUP, SharedAirflow

pytestmark = pytest.mark.xdist_group(SHARED_GROUP)  # the shared real Airflow: see tests/shared_airflow.py

DAG = "cosell_sync_salesforce"


def _fill(store: StateStore) -> None:
    links = pd.DataFrame(
        {
            "referral_id": ["ref-1", "ref-2"],
            "crm_id": ["006A", "006B"],
            "base": [
                {"name": "Deal one", "customer_name": "Contoso"},
                {"name": "Deal two", "customer_name": "<b>F</b>"},
            ],
        }
    )
    store.upsert_links("salesforce", links, "manual__seed")
    store.append_audit(
        [
            {
                "dag_id": DAG,
                "run_id": "manual__seed",
                "crm": "salesforce",
                "direction": "pc_to_crm",
                "referral_id": "ref-1",
                "crm_id": "006A",
                "action": "create",
                "detail": "created",
            },
        ]
    )
    for key in ("ref-2", "ref-3"):
        store.record_failures(
            "salesforce",
            "pc_to_crm",
            [
                {
                    "record_key": key,
                    "payload": {"referral_id": key, "fields": {"close_date": "x"}},
                    "error": f"close_date is not a date ({key})",
                }
            ],
            "manual__seed",
        )


def test_cosell_page_behind_airflow_auth(shared_airflow: SharedAirflow, pc):
    store = StateStore(shared_airflow.state_url)
    store.migrate()
    _fill(store)
    af = shared_airflow.af
    instance_url = pc.connections()["salesforce_default"]["extra"]["instance_url"].rstrip("/")
    ca = shared_airflow.ca  # every request trusts the sandbox's CA: the shared Airflow serves HTTPS
    ui = f"{af.url}/cosell/ui"
    # -- anonymous: refused (a redirect to the login page for HTML, 401 for the API)
    page = requests.get(f"{ui}/", allow_redirects=False, timeout=30, verify=ca)
    assert page.status_code == 303 and "/auth/login" in page.headers["location"], (page.status_code, page.text)
    for path in (
        "/api/overview",
        "/api/links?crm=salesforce",
        "/api/dead-letter",
        "/api/conflicts",
        "/api/timeline?crm=salesforce&referral_id=ref-1",
    ):
        assert requests.get(ui + path, timeout=30, verify=ca).status_code == 401, path
    anon_post = requests.post(f"{ui}/api/dead-letter/{DAG}/dismiss", json={"items": []}, timeout=30, verify=ca)
    assert anon_post.status_code == 401
    assert requests.get(
        f"{ui}/", cookies={"_token": "not-a-jwt"}, allow_redirects=False, timeout=30, verify=ca
    ).status_code in (303, 401, 403)
    # the webhook receiver stays public: it answers for itself (405 to a GET, not 401)
    assert requests.get(f"{af.url}/cosell/webhooks/partner-center", timeout=30, verify=ca).status_code == 405

    admin, viewer = shared_airflow.token("admin"), shared_airflow.token("viewer")
    # -- listed in Airflow's navigation
    plugins = requests.get(
        f"{af.url}/api/v2/plugins", headers={"Authorization": f"Bearer {viewer}"}, timeout=30, verify=ca
    )
    views = [v for p in plugins.json()["plugins"] for v in p["external_views"]]
    assert any(v["name"] == "Co-sell" and v["href"] == "/cosell/ui/" and v["destination"] == "nav" for v in views)

    # -- a viewer reads, and may not act
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    html = requests.get(f"{ui}/", headers=as_viewer, timeout=60, verify=ca)
    assert html.status_code == 200, html.text
    for heading in ("Overview", "Links", "Dead letter", "Conflicts"):
        assert f">{heading}</h2>" in html.text
    assert "Retry now" not in html.text and "read only" in html.text
    assert "&lt;b&gt;F&lt;/b&gt;" in html.text and "<b>F</b>" not in html.text
    assert f'href="{instance_url}/lightning/r/Opportunity/006A/view"' in html.text
    dead = requests.get(f"{ui}/api/dead-letter", headers=as_viewer, timeout=30, verify=ca).json()
    assert sorted(r["record_key"] for r in dead["rows"]) == ["ref-2", "ref-3"]
    links = requests.get(
        f"{ui}/api/links", params={"crm": "salesforce", "q": "contoso"}, headers=as_viewer, timeout=30, verify=ca
    ).json()
    assert [r["referral_id"] for r in links["rows"]] == ["ref-1"]
    timeline = requests.get(
        f"{ui}/timeline", params={"crm": "salesforce", "referral_id": "ref-1"}, headers=as_viewer, timeout=30, verify=ca
    )
    assert timeline.status_code == 200 and "manual__seed" in timeline.text
    item = {"items": [{"direction": "pc_to_crm", "record_key": "ref-2"}]}
    assert (
        requests.post(
            f"{ui}/api/dead-letter/{DAG}/retry", json=item, headers=as_viewer, timeout=30, verify=ca
        ).status_code
        == 403
    )
    assert (
        requests.post(
            f"{ui}/api/dead-letter/{DAG}/dismiss", json=item, headers=as_viewer, timeout=30, verify=ca
        ).status_code
        == 403
    )

    # -- an admin: Retry now through the JSON API triggers the DAG for that referral
    af.wait_for(lambda: af.dag_serialized(DAG), 240, f"{DAG} to be parsed")
    as_admin = {"Authorization": f"Bearer {admin}"}
    retried = requests.post(f"{ui}/api/dead-letter/{DAG}/retry", json=item, headers=as_admin, timeout=60, verify=ca)
    assert retried.status_code == 200, retried.text
    run_id = retried.json()["run_id"]
    conf = af.query("select conf from dag_run where dag_id = ? and run_id = ?", DAG, run_id)
    assert conf, f"no run {run_id}"
    stored = conf[0][0]
    stored = json.loads(stored) if isinstance(stored, str | bytes) else stored
    assert stored == {"referral_ids": ["ref-2"]}

    # -- the HTML form with the cookie the UI sets: the CSRF token is required
    session = requests.Session()
    session.cookies.set("_token", admin)
    page = session.get(f"{ui}/", timeout=60, verify=ca)
    assert page.status_code == 200 and page.text.count(">Retry now</button>") == 2
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)[1]
    form = {"item": "pc_to_crm:ref-3"}
    bad = session.post(
        f"{ui}/dead-letter/{DAG}/dismiss", data=form | {"csrf": "0" * 64}, allow_redirects=False, timeout=30, verify=ca
    )
    assert bad.status_code == 403
    cross = session.post(
        f"{ui}/dead-letter/{DAG}/dismiss",
        data=form | {"csrf": csrf},
        allow_redirects=False,
        headers={"Origin": "https://evil.example"},
        timeout=30,
        verify=ca,
    )
    assert cross.status_code == 403
    done = session.post(
        f"{ui}/dead-letter/{DAG}/dismiss", data=form | {"csrf": csrf}, allow_redirects=False, timeout=30, verify=ca
    )
    assert done.status_code == 303, done.text
    assert sorted(store.dead_letter("salesforce")["record_key"]) == ["ref-2"]
    audit = store.audit(referral_id="ref-3")
    assert len(audit) == 1 and "dismissed from the dead letter by admin" in audit.iloc[0]["detail"]
    after = session.get(
        done.headers["location"] if done.headers["location"].startswith("http") else af.url + done.headers["location"],
        timeout=60,
        verify=ca,
    )
    assert "Dismissed 1 record(s)" in after.text and 'data-record-key="ref-3"' not in after.text
    store.close()
