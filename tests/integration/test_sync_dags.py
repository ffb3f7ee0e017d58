"""The sync DAGs run through Airflow (``dag.test()``) against the sandbox, for both CRMs.

These are the issue's scenarios at the issue's scale: the first sync from 200 referrals and
100 opportunities (60 flagged), idempotency, field edits that write only the changed
fields (checked in the emulators' request logs), crash recovery and injected faults.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from cosell_sandbox.dynamics365.choices import DEFAULT_CHOICE_BASE
from cosell_sandbox.server import FaultConfig
from cosell_sync.pipeline import initial_load_done
from cosell_sync.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
CRMS = ["salesforce", "dynamics365"]
WRITES = ("POST", "PATCH", "PUT", "DELETE")


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags


@pytest.fixture
def store(pc_conn, dyn_conn, sf_conn, monkeypatch, tmp_path) -> StateStore:
    monkeypatch.setenv("COSELL_STAGING_URL", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_COSELL_STATE", json.dumps({"conn_type": "generic", "host": f"sqlite:///{tmp_path}/state.db"})
    )
    s = StateStore.from_airflow()
    s.migrate()
    return s


class Run:
    """One finished DAG run: its state, the summary committed for it, and its note."""

    def __init__(self, dag_run, store: StateStore) -> None:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        self.state = str(dag_run.state)
        self.run_id = dag_run.run_id
        recorded = store.get_run(dag_run.dag_id, dag_run.run_id)
        self.summary = recorded["summary"] if recorded else None
        from cosell_sync.listeners.run_notes import wait_for_notes

        assert wait_for_notes(60), "the run's note was not written in time"
        with create_session() as session:
            row = session.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id))
            self.note = row.note

    @property
    def writes(self) -> int:
        s = self.summary
        return sum(s[d][k] for d in ("pc_to_crm", "crm_to_pc") for k in ("created", "updated", "failed"))


PARAMS = {"dry_run": False, "referral_ids": [], "full_resync": False, "directions": "both"}


def run_dag(dags, crm: str, store: StateStore, **params) -> Run:
    # Every param is passed: dag.test() keeps a run's conf in the DAG's params for the next run.
    return Run(dags[f"cosell_sync_{crm}"].test(run_conf=PARAMS | params), store)


def seed(pc, crm: str, referrals: int, opportunities: int, flagged: int, seed: int) -> None:
    pc.partner_center.seed(referrals, seed=seed)
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    emulator.seed(opportunities=opportunities, accounts=opportunities // 3, flagged=flagged, seed=seed)


def crm_write_requests(pc, crm: str) -> list:
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    return [r for r in emulator.requests_matching() if r.method in WRITES and not r.path.startswith("/_sandbox/")]


def pc_write_requests(pc) -> list:
    return [r for r in pc.partner_center.requests_matching() if r.method in WRITES and "/referrals" in r.path]


def clear_logs(pc) -> None:
    for emulator in (pc.partner_center, pc.salesforce, pc.dynamics365):
        emulator.log.clear()


# -- what each CRM holds -------------------------------------------------------------------------


def opportunities(pc, crm: str) -> list[dict]:
    """Every opportunity as {id, referral_id, referral_link, flagged, open, account, contact}."""
    if crm == "salesforce":
        roles = {
            r["OpportunityId"]: r["ContactId"]
            for r in pc.salesforce.list_records("OpportunityContactRole")
            if r.get("IsPrimary")
        }
        return [
            {
                "id": o["Id"],
                "referral_id": o.get("PC_Referral_Id__c"),
                "referral_link": o.get("PC_Referral_Link__c"),
                "flagged": bool(o.get("PC_Sync_With_Partner_Center__c")),
                "open": not str(o.get("StageName", "")).startswith("Closed"),
                "account": o.get("AccountId"),
                "contact": roles.get(o["Id"]),
                "status": o.get("PC_Sync_Status__c"),
            }
            for o in pc.salesforce.list_records("Opportunity")
        ]
    return [
        {
            "id": o["opportunityid"],
            "referral_id": o.get("cosell_referralid"),
            "referral_link": o.get("cosell_referrallink"),
            "flagged": bool(o.get("cosell_syncwithpartnercenter")),
            "open": o.get("statecode") == 0,
            "account": o.get("_parentaccountid_value"),
            "contact": o.get("_parentcontactid_value"),
            "status": o.get("cosell_syncstatus"),
        }
        for o in pc.dynamics365.rows("opportunities")
    ]


def batch_patches(body: bytes) -> dict[str, dict]:
    """The PATCH parts of a Dataverse ``$batch`` request body: {url: JSON body}."""
    text = body.decode()
    found = {}
    for match in re.finditer(r"^PATCH (\S+) HTTP/1\.1\r\n(?:.+\r\n)*\r\n(\{.*?\})\r\n", text, re.M):
        found[match.group(1)] = json.loads(match.group(2))
    return found


def crm_updates(pc, crm: str) -> dict[str, dict]:
    """The fields written to each existing opportunity, from the emulator's request log."""
    written: dict[str, dict] = {}
    for r in crm_write_requests(pc, crm):
        if crm == "salesforce" and r.method == "PATCH" and r.path.endswith("/composite/sobjects"):
            for record in r.json()["records"]:
                written[record["Id"]] = {k: v for k, v in record.items() if k not in ("Id", "attributes")}
        elif crm == "dynamics365" and r.path.endswith("/$batch"):
            for url, fields in batch_patches(r.body).items():
                if "/opportunities(" in url:
                    written[re.search(r"/opportunities\(([^)]+)\)", url).group(1)] = fields
    return written


# -- the scenarios -------------------------------------------------------------------------------


@pytest.mark.parametrize("crm", CRMS)
def test_first_sync_at_scale_then_quiet_then_only_changed_fields(pc, dags, store, crm):
    seed(pc, crm, referrals=200, opportunities=100, flagged=60, seed=5)
    referrals = dict(pc.partner_center.referrals)
    incoming = {i for i, d in referrals.items() if d["status"] in ("New", "Active")}
    before = {o["id"]: o for o in opportunities(pc, crm)}
    flagged = {i for i, o in before.items() if o["flagged"] and o["open"]}
    assert len(before) == 100 and len([o for o in before.values() if o["flagged"]]) == 60

    first = run_dag(dags, crm, store)
    assert first.state == "success"
    wanted = {"created": len(incoming), "updated": 0, "conflicts": 0, "failed": 0, "deferred": 0, "recovered": 0}
    assert {k: first.summary["pc_to_crm"][k] for k in wanted} == wanted, first.summary
    assert first.summary["writes"]["crm"]["created"] == len(incoming)
    assert first.summary["crm_to_pc"]["created"] == len(flagged) and first.summary["crm_to_pc"]["failed"] == 0
    # The report is the DAG run's note, so the grid view shows it.
    label = {"salesforce": "Salesforce", "dynamics365": "Dynamics 365"}[crm]
    created = len(incoming) + len(flagged)
    assert first.note.startswith(f"**cosell_sync_{crm}** · {created} created, 0 updated, 0 failed\n"), first.note
    assert f"| Partner Center → {label} | {len(incoming)} | 0 | 0 | 0 |" in first.note.splitlines(), first.note

    after = opportunities(pc, crm)
    by_referral = Counter(o["referral_id"] for o in after if o["referral_id"])
    # Every incoming referral has exactly one opportunity, with its account and contact.
    assert all(by_referral[r] == 1 for r in incoming), [r for r in incoming if by_referral[r] != 1]
    for o in after:
        if o["referral_id"] in incoming:
            assert o["account"] and o["contact"], o
    # Every flagged opportunity has exactly one referral, linked both ways.
    refs_now = pc.partner_center.referrals
    by_external = Counter(d.get("externalReferenceId") for d in refs_now.values() if d.get("externalReferenceId"))
    assert all(by_external[i] == 1 for i in flagged)
    for o in after:
        if o["id"] in flagged or o["referral_id"] in incoming:
            ref = refs_now[o["referral_id"]]
            assert ref["externalReferenceId"] == o["id"]
            assert o["referral_link"] and o["referral_id"] in o["referral_link"]
            assert o["status"] in ("Synced", DEFAULT_CHOICE_BASE), o  # Dataverse stores the choice's value
    links = store.get_links(crm)
    assert len(links) == len(incoming) + len(flagged)
    assert links["crm_id"].is_unique and links["referral_id"].is_unique

    # Run again at once: zero writes anywhere.
    clear_logs(pc)
    second = run_dag(dags, crm, store)
    assert second.state == "success" and second.writes == 0, second.summary
    assert crm_write_requests(pc, crm) == [] and pc_write_requests(pc) == []

    # A Microsoft seller changes a deal value; a CRM user edits another opportunity's notes.
    ms_link, crm_link = links.iloc[0], links.iloc[1]
    ref = refs_now[ms_link["referral_id"]]
    pc.partner_center._commit_update(ref, {**ref, "details": {**ref["details"], "dealValue": 4242.0}}, "Microsoft")
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_link["crm_id"], {"Description": "edited in the CRM"})
    else:
        pc.dynamics365.edit("opportunities", crm_link["crm_id"], {"description": "edited in the CRM"})
    clear_logs(pc)
    third = run_dag(dags, crm, store)
    assert third.summary["pc_to_crm"]["updated"] == 1 and third.summary["crm_to_pc"]["updated"] == 1, third.summary
    assert third.writes == 2

    # Only the changed field (plus the audit and sync-status fields) went to the CRM ...
    updates = crm_updates(pc, crm)
    assert set(updates) == {ms_link["crm_id"]}
    amount, audit, status = (
        ("Amount", "PC_Audit__c", "PC_Sync_Status__c")
        if crm == "salesforce"
        else ("estimatedvalue", "cosell_audit", "cosell_syncstatus")
    )
    assert set(updates[ms_link["crm_id"]]) <= {amount, audit, status} and amount in updates[ms_link["crm_id"]]
    assert updates[ms_link["crm_id"]][amount] == 4242.0
    # ... and only the changed field to Partner Center, as one JSON Patch with If-Match.
    patches = [r for r in pc_write_requests(pc) if r.method == "PATCH"]
    assert [p.path.rsplit("/", 1)[1] for p in patches] == [crm_link["referral_id"]]
    assert patches[0].headers.get("If-Match") or patches[0].headers.get("if-match")
    assert [op["path"] for op in patches[0].json()] == ["/details/notes"]
    assert refs_now[crm_link["referral_id"]]["details"]["notes"] == "edited in the CRM"

    fourth = run_dag(dags, crm, store)
    assert fourth.state == "success" and fourth.writes == 0, fourth.summary


@pytest.mark.parametrize("crm", CRMS)
def test_crash_mid_load_then_rerun_loses_nothing_and_duplicates_nothing(pc, dags, store, crm):
    """The CRM processes writes but the answers are lost (connections dropped after
    processing) part-way through the load; the rerun finishes the job exactly once."""
    seed(pc, crm, referrals=40, opportunities=20, flagged=8, seed=9)
    incoming = {i for i, d in pc.partner_center.referrals.items() if d["status"] in ("New", "Active")}
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    write_path = "/services/data/" if crm == "salesforce" else "/api/data/v9.2/"
    emulator.faults.configure(
        FaultConfig(seed=3, drop_after_rate=1.0, after=2, methods=("POST", "PATCH"), path_prefix=write_path)
    )
    crashed = run_dag(dags, crm, store)
    assert emulator.faults.injected["drop_after"] > 0
    emulator.faults.clear()
    assert crashed.summary is None or crashed.summary["pc_to_crm"]["failed"] > 0

    rerun = run_dag(dags, crm, store)
    assert rerun.state == "success"
    for _ in range(2):  # rows parked in the dead letter are retried on the next runs
        if rerun.summary["pc_to_crm"]["failed"] == 0 and rerun.summary["crm_to_pc"]["failed"] == 0:
            break
        rerun = run_dag(dags, crm, store)
    assert rerun.summary["pc_to_crm"]["failed"] == 0 and rerun.summary["crm_to_pc"]["failed"] == 0, rerun.summary

    after = opportunities(pc, crm)
    by_referral = Counter(o["referral_id"] for o in after if o["referral_id"])
    assert all(by_referral[r] == 1 for r in incoming), {r: by_referral[r] for r in incoming if by_referral[r] != 1}
    by_external = Counter(d.get("externalReferenceId") for d in pc.partner_center.referrals.values())
    assert all(n == 1 for key, n in by_external.items() if key), by_external
    assert len(store.get_links(crm)) == len(incoming) + sum(1 for o in after if o["flagged"] and o["open"])
    assert run_dag(dags, crm, store).writes == 0


def faults_injected(emulator) -> int:
    return sum(emulator.faults.injected[k] for k in ("429", "5xx"))


@pytest.mark.parametrize("crm", CRMS)
def test_sync_ends_correct_under_throttling_and_server_errors(pc, dags, store, crm):
    """10% 429 (with ``Retry-After: 0``: that the hooks wait out what it says is the hooks'
    own tests') and 5% 5xx on every system, through a first sync and an edit sync: the results
    equal a clean run's, and a third (clean) run has nothing to do."""
    seed(pc, crm, referrals=120, opportunities=60, flagged=30, seed=13)
    incoming = {i for i, d in pc.partner_center.referrals.items() if d["status"] in ("New", "Active")}
    emulators = (pc.partner_center, pc.salesforce if crm == "salesforce" else pc.dynamics365)
    injected = [0, 0]
    try:
        for n, emulator in enumerate(emulators):
            emulator.faults.configure(FaultConfig(seed=17 + n, rate_429=0.10, retry_after=0, rate_5xx=0.05))
        first = run_dag(dags, crm, store)
        assert first.state == "success"
        assert first.summary["pc_to_crm"]["failed"] == 0 and first.summary["crm_to_pc"]["failed"] == 0, first.summary
        assert first.summary["pc_to_crm"]["created"] == len(incoming)
        injected = [a + faults_injected(e) for a, e in zip(injected, emulators, strict=True)]

        links = store.get_links(crm)
        for n, emulator in enumerate(emulators):
            emulator.faults.configure(FaultConfig(seed=27 + n, rate_429=0.10, retry_after=0, rate_5xx=0.05))
        for row in links.head(10).itertuples():
            if crm == "salesforce":
                pc.salesforce.user_edit("Opportunity", row.crm_id, {"Description": f"fault run {row.crm_id}"})
            else:
                pc.dynamics365.edit("opportunities", row.crm_id, {"description": f"fault run {row.crm_id}"})
        second = run_dag(dags, crm, store)
        injected = [a + faults_injected(e) for a, e in zip(injected, emulators, strict=True)]
    finally:
        for emulator in emulators:
            emulator.faults.clear()
    assert all(injected), injected
    wanted = {"created": 0, "updated": 10, "conflicts": 0, "failed": 0, "deferred": 0}
    assert {k: second.summary["crm_to_pc"][k] for k in wanted} == wanted, second.summary
    assert second.summary["writes"]["partner_center"]["updated"] == 10, second.summary
    for row in links.head(10).itertuples():
        assert pc.partner_center.referrals[row.referral_id]["details"]["notes"] == f"fault run {row.crm_id}"
    after = opportunities(pc, crm)
    assert Counter(o["referral_id"] for o in after if o["referral_id"] in incoming) == dict.fromkeys(incoming, 1)
    assert run_dag(dags, crm, store).writes == 0


def test_dry_run_param_plans_and_reports_but_writes_nothing(pc, dags, store):
    seed(pc, "salesforce", referrals=30, opportunities=12, flagged=5, seed=23)
    clear_logs(pc)
    dry = run_dag(dags, "salesforce", store, dry_run=True)
    assert dry.state == "success"
    assert dry.summary["dry_run"] and dry.summary["pc_to_crm"]["created"] > 0  # the plan, reported
    assert dry.note.startswith("**cosell_sync_salesforce** · dry run: the plan only, nothing was written"), dry.note
    created = dry.summary["pc_to_crm"]["created"]
    assert f"| Partner Center → Salesforce | {created} | 0 | 0 | 0 |" in dry.note.splitlines(), dry.note
    assert crm_write_requests(pc, "salesforce") == [] and pc_write_requests(pc) == []
    assert store.get_links("salesforce").empty and store.get_watermark("cosell_sync_salesforce", "crm") is None
    assert not initial_load_done(store, "cosell_sync_salesforce")  # a dry run does not open the schedule
    one = next(iter(pc.partner_center.referrals))
    assert run_dag(dags, "salesforce", store, referral_ids=[one]).state == "success"
    assert not initial_load_done(store, "cosell_sync_salesforce")  # nor does a run for named referrals
    real = run_dag(dags, "salesforce", store)
    assert initial_load_done(store, "cosell_sync_salesforce")
    assert real.summary["pc_to_crm"]["created"] > 0 and real.summary["crm_to_pc"]["created"] > 0
