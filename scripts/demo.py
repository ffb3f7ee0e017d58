"""`make demo`: the sync DAGs, run through Airflow against the sandbox, for both CRMs.

For each of ``cosell_sync_dynamics365`` and ``cosell_sync_salesforce`` (each against a
fresh sandbox: 200 referrals, 100 opportunities of which 60 are flagged "Sync with Partner
Center"):

1. the first sync seeds the CRM from Partner Center and Partner Center from the flagged
   open opportunities; the demo explains how many were shared and why (Salesforce's seed
   has closed flagged opportunities, Dataverse's has none) and what each skip category means;
2. a Microsoft seller changes a deal value (through the sandbox's control plane) and a CRM
   user edits an opportunity's notes (through the CRM's API); the demo shows, read back from
   both records, that each edited record is linked to one on the other side;
3. the second sync carries both across, and the demo reads each value back on the linked record;
4. a third sync writes nothing;
5. a summary per DAG and run.

Then the webhooks: Airflow's API server (HTTPS, with the sandbox's certificate), scheduler,
DAG processor and triggerer start; ``partner_center_webhook_registration`` registers the
receiver's URL (and its validation event completes); a Microsoft seller's change reaches
Salesforce through the signed delivery, the inbox and ``cosell_referral_events``, with no
scheduled run involved, and the demo prints how long it took.

Every run is a real DAG run (``dag.test()``: Airflow's metadata DB under ``.airflow/``);
its report is also the DAG run's note. Connections come from ``AIRFLOW_CONN_*`` variables,
exactly as a deployment gives them; only the URLs and the CA are the sandbox's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

import requests  # noqa: E402

from cosell_sandbox.runtime import Sandbox  # noqa: E402

CRMS = {"dynamics365": "Dynamics 365", "salesforce": "Salesforce"}

DIRECTIONS = (("pc_to_crm", "Partner Center -> CRM"), ("crm_to_pc", "CRM -> Partner Center"))

# Where the first sync writes each side's id onto the other side's record (the shipped mappings).
REFERRAL_ID_FIELD = {"dynamics365": "cosell_referralid", "salesforce": "PC_Referral_Id__c"}
DATAVERSE_STATES = {0: "Open", 1: "Won", 2: "Lost"}  # opportunity statecode


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def airflow_db_migrate() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit("airflow db migrate failed")


class Demo:
    def __init__(self, sandbox: Sandbox, work: Path) -> None:
        self.sandbox = sandbox
        self.work = work
        self.ca = str(sandbox.pki.ca_cert)
        self.runs: list[tuple[str, str, dict[str, Any], float]] = []
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(ROOT / "dags"))  # examples are off (AIRFLOW__CORE__LOAD_EXAMPLES)
        if bag.import_errors:
            raise SystemExit(f"DAG import errors: {bag.import_errors}")
        self.dags = bag.dags

    # -- one DAG run ---------------------------------------------------------------------------
    def run(self, crm: str, label: str) -> dict[str, Any]:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        from cosell_sync.state import StateStore

        dag = self.dags[f"cosell_sync_{crm}"]
        started = time.perf_counter()
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            dag_run = dag.test()
        took = time.perf_counter() - started
        if str(dag_run.state) != "success":
            sys.stdout.write(chatter.getvalue()[-6000:])
            raise SystemExit(f"{dag.dag_id} {dag_run.run_id} ended {dag_run.state}")
        store = StateStore.from_airflow()
        summary = store.get_run(dag.dag_id, dag_run.run_id)["summary"]
        # The plugin's listener writes the note from a background thread: wait for it before reading it back.
        from cosell_sync.listeners import run_notes

        if not run_notes.wait_for_notes(30):
            print("  (the note was not written within 30 s)")
        with create_session() as session:
            row = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == dag_run.run_id))
            note = row.note
        self.runs.append((dag.dag_id, label, summary, took))
        print(f"  DAG run {dag_run.run_id} ({took:.1f}s); its note (Markdown; the grid view renders it):")
        for line in (note or "(no note)").splitlines():
            print(f"      {line}".rstrip())
        return summary

    # -- the story for one CRM -----------------------------------------------------------------
    def control(self, method: str, path: str, body: dict | None = None) -> Any:
        url = self.sandbox.origin("partner_center") + path
        resp = requests.request(method, url, json=body, verify=self.ca, timeout=30)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def referral(self, referral_id: str) -> dict[str, Any]:
        """A referral as Partner Center holds it (the sandbox's raw view)."""
        return self.control("GET", f"/_sandbox/referrals/{referral_id}")

    def crm_value(self, crm: str, crm_id: str) -> tuple[Any, Any]:
        """(amount, notes) of an opportunity, read through our hooks."""
        if crm == "salesforce":
            from cosell_sync.hooks.salesforce import SalesforceSyncHook

            row = SalesforceSyncHook().get_conn().Opportunity.get(crm_id)
            return row["Amount"], row["Description"]
        from cosell_sync.hooks.dynamics365 import DynamicsHook

        row = DynamicsHook().get("opportunities", crm_id, select=["estimatedvalue", "description"])
        return row["estimatedvalue"], row["description"]

    def flagged_opportunities(self, crm: str) -> dict[str, str]:
        """{opportunity id: its state} of every opportunity flagged "Sync with Partner Center",
        read through our hooks; the state is "Open" or how it was closed."""
        if crm == "salesforce":
            from cosell_sync.hooks.salesforce import SalesforceSyncHook

            soql = "SELECT Id, StageName FROM Opportunity WHERE PC_Sync_With_Partner_Center__c = true"
            rows = SalesforceSyncHook().query_records(soql)
            return {r["Id"]: r["StageName"] if r["StageName"].startswith("Closed") else "Open" for r in rows}
        from cosell_sync.hooks.dynamics365 import DynamicsHook

        rows = DynamicsHook().query(
            "opportunities", select=["opportunityid", "statecode"], filter="cosell_syncwithpartnercenter eq true"
        )
        return {r["opportunityid"]: DATAVERSE_STATES.get(r["statecode"], str(r["statecode"])) for r in rows}

    def link_proof(self, crm: str, referral_id: str, crm_id: str) -> str:
        """How the two records point at each other, read back from both sides."""
        field = REFERRAL_ID_FIELD[crm]
        if crm == "salesforce":
            from cosell_sync.hooks.salesforce import SalesforceSyncHook

            on_opportunity = SalesforceSyncHook().get_conn().Opportunity.get(crm_id)[field]
        else:
            from cosell_sync.hooks.dynamics365 import DynamicsHook

            on_opportunity = DynamicsHook().get("opportunities", crm_id, select=[field])[field]
        on_referral = self.referral(referral_id).get("externalReferenceId")
        if on_opportunity != referral_id or (on_referral or "").lower() != crm_id.lower():
            raise SystemExit(f"referral {referral_id} and opportunity {crm_id} do not point at each other")
        return f"the opportunity's {field} is the referral id; the referral's externalReferenceId is the opportunity id"

    def crm_edit_notes(self, crm: str, crm_id: str, notes: str) -> None:
        """A CRM user edits an opportunity, through the CRM's own API."""
        if crm == "salesforce":
            from cosell_sync.hooks.salesforce import SalesforceSyncHook

            SalesforceSyncHook().get_conn().Opportunity.update(crm_id, {"Description": notes})
        else:
            from cosell_sync.hooks.dynamics365 import DynamicsHook

            DynamicsHook().update("opportunities", crm_id, {"description": notes})

    def story(self, crm: str) -> None:
        from cosell_sync.state import StateStore

        label = CRMS[crm]
        self.sandbox.reset()
        self.control("POST", "/_sandbox/seed", {"count": 200, "seed": 2026})
        emulator = self.sandbox.salesforce if crm == "salesforce" else self.sandbox.dynamics365
        emulator.seed(opportunities=100, accounts=35, flagged=60, seed=2026)
        state_db = self.work / f"state-{crm}.db"
        state_db.unlink(missing_ok=True)
        os.environ["AIRFLOW_CONN_COSELL_STATE"] = json.dumps({"conn_type": "generic", "host": f"sqlite:///{state_db}"})
        os.environ["COSELL_STAGING_URL"] = f"file://{self.work / 'staging'}"

        step(f"{label} 1/4: first sync (200 referrals; 100 opportunities, 60 flagged)")
        flagged = self.flagged_opportunities(crm)
        first = self.run(crm, "1 first sync")
        store = StateStore.from_airflow()
        links = store.get_links(crm)
        print(
            f"  links: {len(links)} linked pairs (referral <-> opportunity), each written on both sides: "
            f"{first['pc_to_crm']['created']} opportunities created (with account and contact) from open "
            f"referrals, {first['crm_to_pc']['created']} referrals created from flagged open opportunities"
        )
        self.explain_flagged(crm, flagged, first)
        self.explain_skips(first)

        step(f"{label} 2/4: a Microsoft seller and a CRM user each change something")
        ms = next(r for r in links.itertuples() if self.referral(r.referral_id)["direction"] == "Incoming")
        shared = {cid.lower() for cid, state in flagged.items() if state == "Open"}
        crm_row = next(r for r in links.itertuples() if r.crm_id.lower() in shared)
        new_value = 987654.0
        self.control(
            "POST",
            f"/_sandbox/referrals/{ms.referral_id}/microsoft-edit",
            {"action": "update", "changes": {"details": {"dealValue": new_value}}},
        )
        print(f"  Partner Center: Microsoft sets referral {ms.referral_id} deal value to {new_value:,.0f}")
        print(f"    linked record: {label} opportunity {ms.crm_id}, created from this referral by the first sync")
        print(f"    ({self.link_proof(crm, ms.referral_id, ms.crm_id)})")
        notes = f"Customer asked for a pilot in Q1 (edited in {label})"
        self.crm_edit_notes(crm, crm_row.crm_id, notes)
        print(f"  {label}: a user edits the notes of opportunity {crm_row.crm_id}")
        rid = crm_row.referral_id
        print(f"    linked record: referral {rid}, created from this flagged opportunity by the first sync")
        print(f"    ({self.link_proof(crm, crm_row.referral_id, crm_row.crm_id)})")

        step(f"{label} 3/4: second sync carries both across; each value read back on the linked record")
        self.run(crm, "2 after edits")
        amount, _ = self.crm_value(crm, ms.crm_id)
        referral = self.referral(crm_row.referral_id)
        print(
            f"  {label} opportunity {ms.crm_id} (linked to referral {ms.referral_id}) amount: {amount:,.0f}"
            "  (Microsoft's edit)"
        )
        print(
            f"  Partner Center referral {crm_row.referral_id} (linked to opportunity {crm_row.crm_id}) notes: "
            f"{referral['details']['notes']!r}  (the {label} user's edit)"
        )
        if amount != new_value or referral["details"]["notes"] != notes:
            raise SystemExit("a change did not reach the other side")

        step(f"{label} 4/4: third sync: nothing changed, nothing written")
        third = self.run(crm, "3 quiet")
        writes = sum(third[d][k] for d, _ in DIRECTIONS for k in ("created", "updated", "failed"))
        print(f"  writes: {writes}")

    def explain_flagged(self, crm: str, flagged: dict[str, str], first: dict[str, Any]) -> None:
        """Why the flagged opportunities gave this many referrals (and why the CRMs differ)."""
        label = CRMS[crm]
        closed = {state: n for state, n in Counter(flagged.values()).items() if state != "Open"}
        open_count = len(flagged) - sum(closed.values())
        created = first["crm_to_pc"]["created"]
        skipped_closed = (first.get("skipped") or {}).get("crm.closed_unlinked", 0)
        print(
            f"  flagged opportunities: {len(flagged)}; open {open_count} -> {created} referrals created"
            + (f"; closed {sum(closed.values())} -> not shared" if closed else "")
        )
        if closed:
            how = ", ".join(f"{n} {state}" for state, n in sorted(closed.items()))
            print(
                f"    why not {len(flagged)}: only open opportunities become referrals, and the {label} seed gives "
                f"opportunities realistic stages, closed ones included ({how}); the Dynamics 365 seed creates "
                "open opportunities only. Same rule, different data."
            )
        else:
            print(
                f"    all {len(flagged)}: the {label} seed creates open opportunities only, and every flagged open "
                "opportunity becomes a referral (the Salesforce seed also has closed ones, which are not shared)"
            )
        if (created, skipped_closed) != (open_count, sum(closed.values())):
            raise SystemExit(
                f"expected {open_count} referrals and {sum(closed.values())} closed skips, "
                f"the report says {created} and {skipped_closed}"
            )

    def explain_skips(self, report: dict[str, Any]) -> None:
        """The report's skip categories, in plain words."""
        from cosell_sync.pipeline import describe_skip

        skipped = report.get("skipped") or {}
        if not skipped:
            return
        print("  skipped records (left alone on purpose, not errors), by category:")
        width = max(len(key) for key in skipped)
        for key, count in sorted(skipped.items()):
            print(f"    {key:<{width}} {count:>4}  {describe_skip(key, count)}")

    def webhook_story(self) -> None:
        """A Microsoft-side change reaching Salesforce through the webhook, with Airflow running."""
        from cosell_sandbox.airflow_cluster import AirflowCluster
        from cosell_sync.hooks.partner_center import PartnerCenterHook, registration_value
        from cosell_sync.state import StateStore

        step("Webhooks 1/3: Airflow's API server (HTTPS), scheduler, DAG processor and triggerer start")
        env = {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__COSELL__"))}
        env |= {"AIRFLOW__COSELL__EVENT_CRMS": "salesforce", "COSELL_STAGING_URL": os.environ["COSELL_STAGING_URL"]}
        pki = self.sandbox.pki
        with AirflowCluster(self.work / "airflow", env, tls=(pki.server_cert, pki.server_key, pki.ca_cert)) as af:
            for dag_id in ("partner_center_webhook_registration", "cosell_referral_events"):
                af.wait_for(lambda d=dag_id: af.dag_serialized(d), 180, f"{dag_id} to be parsed")
                af.cli("dags", "unpause", dag_id)
            print(f"  API server {af.url}; the sync DAGs stay paused: no scheduled run is involved")

            step("Webhooks 2/3: register the receiver (partner_center_webhook_registration, with a test event)")
            url = f"{af.url}/cosell/webhooks/partner-center"
            conf = {"webhook_url": url, "overwrite": True, "send_test_event": True}
            af.cli("dags", "trigger", "partner_center_webhook_registration", "--conf", json.dumps(conf))

            def registered() -> str | None:
                states = {r["state"] for r in af.dag_runs("partner_center_webhook_registration")}
                if "failed" in states:
                    raise SystemExit(f"the registration DAG failed\n{af.tail()}")
                return "success" if states == {"success"} else None

            af.wait_for(registered, 300, "the registration DAG run")
            doc = PartnerCenterHook().get_webhook_registration() or {}
            print(f"  registered {registration_value(doc, 'webhookUrl')}")
            events = ", ".join(registration_value(doc, "webhookEvents") or [])
            print(f"  events: {events}; the validation event completed")
            af.wait_for(
                lambda: af.query("select count(*) from trigger where classpath like '%InboxTrigger%'")[0][0],
                120,
                "the inbox watcher",
            )

            step("Webhooks 3/3: a Microsoft seller changes a deal value; the webhook carries it to Salesforce")
            store = StateStore.from_airflow()
            links = store.get_links("salesforce")
            rid, crm_id = next(
                (r.referral_id, r.crm_id)
                for r in links.itertuples()
                if (doc := self.referral(r.referral_id))["direction"] == "Incoming"
                and doc["status"] in ("New", "Active")
            )
            value = 123456.0
            started = time.monotonic()
            self.control(
                "POST",
                f"/_sandbox/referrals/{rid}/microsoft-edit",
                {"action": "update", "changes": {"details": {"dealValue": value}}},
            )
            af.wait_for(lambda: self.crm_value("salesforce", crm_id)[0] == value, 120, "Salesforce's new value", 0.05)
            took = time.monotonic() - started
            print(f"  Salesforce opportunity {crm_id} amount: {value:,.0f}, {took:.1f}s after the Partner Center edit")
            af.wait_for(lambda: store.inbox_counts()["done"] >= 1, 60, "the event to be marked done")
            af.wait_for(
                lambda: all(r["state"] == "success" for r in af.dag_runs("cosell_referral_events")),
                120,
                "the cosell_referral_events run to finish",
            )
            runs = af.dag_runs("cosell_referral_events")
            scheduled = af.query("select count(*) from dag_run where dag_id like 'cosell_sync_%'")[0][0]
            for r in runs:
                print(f"  synced by cosell_referral_events {r['run_id']} ({r['state']})")
            print(f"  inbox: {store.inbox_counts()}; scheduled sync runs meanwhile: {scheduled}")

    def summary(self) -> None:
        step("5: summary per DAG and run (created / updated / conflicts / failed, per direction)")
        header = f"  {'DAG':<24} {'run':<15} {'PC -> CRM':>17} {'CRM -> PC':>17} {'unchanged':>9} {'time':>6}"
        print(header)
        print("  " + "-" * (len(header) - 2))
        for dag_id, label, s, took in self.runs:
            counts = ("created", "updated", "conflicts", "failed")
            cells = ["/".join(str(s[d][k]) for k in counts) for d, _ in DIRECTIONS]
            print(f"  {dag_id:<24} {label:<15} {cells[0]:>17} {cells[1]:>17} {s['unchanged']:>9} {took:>5.1f}s")


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    home = Path(os.environ.get("COSELL_SANDBOX_HOME", ROOT / ".sandbox"))
    work = Path(os.environ["AIRFLOW_HOME"]) / "cosell" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    step("Airflow metadata DB (SQLite under .airflow/)")
    airflow_db_migrate()
    print(f"  migrated: {os.environ['AIRFLOW_HOME']}")
    with Sandbox(home) as sandbox:
        step("Sandbox started (HTTPS, local CA)")
        for name, origin in sandbox.state()["origins"].items():
            print(f"  {name:<15} {origin}")
        os.environ.update(sandbox.env())
        print("  connections: AIRFLOW_CONN_{PARTNER_CENTER,DYNAMICS,SALESFORCE}_DEFAULT (secrets not shown)")
        tokens = work / "refresh_tokens.json"
        conn = json.loads(os.environ["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"])
        conn["extra"]["token_store_path"] = str(tokens)
        os.environ["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"] = json.dumps(conn)
        demo = Demo(sandbox, work)
        for crm in CRMS:
            demo.story(crm)
        demo.summary()
        demo.webhook_story()
    print("\ndemo finished: both sync DAGs ran through Airflow, each change reached the other side, and a")
    print("Microsoft-side change reached Salesforce through the webhook and cosell_referral_events.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
