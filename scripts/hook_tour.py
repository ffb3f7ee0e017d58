"""`make tour`: start the sandbox and show each hook working against it (Partner Center, Dynamics 365, Salesforce).

Everything goes over HTTPS with the sandbox CA, through msal and requests, with the
connection given exactly as a deployment would give it (an AIRFLOW_CONN_* variable).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import requests  # noqa: E402
from cryptography import x509  # noqa: E402

from cosell_sandbox.runtime import Sandbox  # noqa: E402
from cosell_sandbox.server import FaultConfig  # noqa: E402
from cosell_sync.engine.mapping import load_mapping  # noqa: E402
from cosell_sync.engine.normalize import referrals_frame  # noqa: E402
from cosell_sync.hooks.batch import BatchRequest  # noqa: E402
from cosell_sync.hooks.dynamics365 import DynamicsHook  # noqa: E402
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook  # noqa: E402
from cosell_sync.hooks.salesforce import SalesforceSyncHook  # noqa: E402
from cosell_sync.hooks.soql import Condition, select  # noqa: E402
from cosell_sync.webhooks.signature import (  # noqa: E402
    SignatureError,
    load_certificate,
    signature_from_headers,
    verify_chain,
    verify_signature,
)


def step(title: str) -> None:
    print(f"\n== {title}")


class VerifyingReceiver:
    """A stand-in for the webhook receiver: verifies each delivery's signature."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.events: list[tuple[str, str]] = []
        root = x509.load_pem_x509_certificate(sandbox.pki.ca_cert.read_bytes())
        ca = str(sandbox.pki.ca_cert)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    headers = dict(self.headers.items())
                    cert_url = next(v for k, v in headers.items() if k.lower() == "x-ms-certificate-url")
                    cert = load_certificate(requests.get(cert_url, verify=ca, timeout=10).content)
                    verify_chain(cert, [root])
                    verify_signature(body, signature_from_headers(headers), cert)
                    payload = json.loads(body)
                    outer.events.append((payload["EventName"], payload["ResourceUri"].rsplit("/", 1)[-1]))
                    status = 200
                except (SignatureError, StopIteration, ValueError):
                    status = 401
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = sandbox.pki.server_context().wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/cosell/webhooks/partner-center"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> int:
    home = Path(os.environ.get("COSELL_SANDBOX_HOME", ROOT / ".sandbox"))
    with Sandbox(home) as sandbox, tempfile.TemporaryDirectory() as tokens:
        pc = sandbox.partner_center
        assert pc is not None
        step("Sandbox started (HTTPS, local CA)")
        for name, origin in sandbox.state()["origins"].items():
            print(f"  {name:<15} {origin}")
        for key, value in sandbox.env().items():
            os.environ[key] = value
        print("  connections: AIRFLOW_CONN_{PARTNER_CENTER,DYNAMICS,SALESFORCE}_DEFAULT (secrets not shown)")
        conn = json.loads(os.environ["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"])
        conn["extra"]["token_store_path"] = str(Path(tokens) / "tokens.json")
        os.environ["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"] = json.dumps(conn)

        pc.seed(240, seed=2026)
        hook = PartnerCenterHook()

        step("List every referral (pages of 100, following the documented nextLink)")
        started = time.perf_counter()
        everything = list(hook.list_referrals())
        print(
            f"  {len(everything)} referrals in {hook.referrals.calls['GET']} calls, "
            f"{time.perf_counter() - started:.2f}s"
        )
        docs = list(hook.list_referrals(filter="status eq 'New' and direction eq 'Incoming'"))
        parsed = referrals_frame(docs, load_mapping("salesforce"))  # the sync's parse, by the mapping
        bad = parsed.errors["key"].nunique()
        print(f"  status eq 'New' and direction eq 'Incoming': {len(parsed.frame)} parsed, {bad} malformed")
        sample = parsed.frame.iloc[0]
        print(
            f"  e.g. {sample['name']!r}: {sample['deal_value']:,.0f} {sample['currency']}, "
            f"help wanted: {sample['help_code'] or '-'}"
        )

        step("Create an outgoing referral from a CRM opportunity, then update it with JSON Patch")
        created = hook.create_referral(
            {
                "name": "Fabrikam - Copilot rollout",
                "externalReferenceId": "crm-opp-42",
                "status": "New",
                "substatus": "Pending",
                "type": "Independent",
                "qualification": "SalesQualified",
                "customerProfile": {
                    "name": "Fabrikam Inc",
                    "address": {"city": "New York", "postalCode": "10017", "country": "US"},
                },
                "details": {"dealValue": 80000, "currency": "USD", "closingDateTime": "2027-03-31T00:00:00Z"},
            }
        )
        print(f"  created {created['id']} (ETag {created['eTag']})")
        patched = hook.patch_referral(
            created["id"],
            [
                {"op": "replace", "path": "/details/dealValue", "value": 95000},
                {"op": "replace", "path": "/status", "value": "Active"},
                {"op": "replace", "path": "/substatus", "value": "Accepted"},
            ],
            etag=created["eTag"],
        )
        assert patched is not None
        print(f"  patched: dealValue {patched['details']['dealValue']:,}, status {patched['status']}")
        try:
            hook.patch_referral(
                created["id"], [{"op": "replace", "path": "/details/notes", "value": "x"}], etag=created["eTag"]
            )
        except Exception as exc:  # the stale ETag is refused
            print(f"  a write with the stale ETag is refused: {exc}")

        step("Webhooks: register, validate, and receive a signed Microsoft-side change")
        receiver = VerifyingReceiver(sandbox)
        try:
            hook.create_webhook_registration(receiver.url, [*REFERRAL_EVENTS, "test-created"])
            correlation = hook.create_validation_event()
            for _ in range(100):
                result = hook.get_validation_event(correlation)
                if result["status"] == "completed":
                    break
                time.sleep(0.05)
            print(f"  validation event: {result['status']}, {result['results'][0]['responseCode']}")
            open_one = next(d["id"] for d in docs if d.get("status") == "New")
            requests.post(
                f"{sandbox.origin('partner_center')}/_sandbox/referrals/{open_one}/microsoft-edit",
                json={"action": "accept"},
                verify=str(sandbox.pki.ca_cert),
                timeout=10,
            ).raise_for_status()
            deadline = time.monotonic() + 10
            while not any(e == ("referral-updated", open_one) for e in receiver.events):
                if time.monotonic() > deadline:
                    raise SystemExit("the webhook did not arrive")
                time.sleep(0.02)
            print(f"  Microsoft accepted {open_one}; signed 'referral-updated' verified by the receiver")
            print(f"  now: {hook.get_referral(open_one)['status']}")
        finally:
            receiver.close()

        step("Resilience: 30% of calls answer 429 with Retry-After: 1")
        pc.faults.configure(FaultConfig(seed=7, rate_429=0.3, retry_after=1, path_prefix="/v1.0"))
        resilient = PartnerCenterHook()
        started = time.perf_counter()
        count = sum(1 for _ in resilient.list_referrals(top=50))
        print(
            f"  {count} referrals; {pc.faults.injected['429']} throttled answers waited out "
            f"({resilient.referrals.waited:.0f}s of Retry-After) in {time.perf_counter() - started:.1f}s"
        )
        pc.faults.clear()

        step("Dynamics 365: the Dataverse sandbox through DynamicsHook (client credentials)")
        dv = sandbox.dynamics365
        assert dv is not None
        dv.seed(opportunities=120, accounts=40, flagged=30, seed=2026)
        dyn = DynamicsHook()
        print(f"  connected as application user {dyn.whoami()['UserId']}")
        flagged = list(
            dyn.query(
                "opportunities",
                select=["name", "estimatedvalue", "cosell_referralid"],
                filter="cosell_syncwithpartnercenter eq true and statecode eq 0",
                page_size=25,
            )
        )
        print(
            f"  {len(flagged)} open opportunities flagged 'Sync with Partner Center' "
            f"({dyn.api.calls['GET']} GETs at 25 rows a page)"
        )
        tracked = dyn.track_changes("opportunities", select=["name", "estimatedvalue"])
        print(f"  change tracking: initial load {len(tracked.rows)} rows, delta link kept")
        referral_id = everything[0]["id"]
        upserted = dyn.upsert(
            "opportunities",
            {"cosell_referralid": referral_id},
            {
                "name": everything[0]["name"][:300],
                "estimatedvalue": everything[0]["details"]["dealValue"],
                "transactioncurrencyid@odata.bind": DynamicsHook.bind(
                    "transactioncurrencies", dyn.currency_id(everything[0]["details"]["currency"])
                ),
            },
        )
        print(f"  upsert by alternate key cosell_referralid: created={upserted.created} id={upserted.id}")
        batch = dyn.batch(
            [
                BatchRequest(
                    "PATCH",
                    DynamicsHook.row("opportunities", row["opportunityid"]),
                    {"cosell_syncstatus": 100000000},
                    {"If-Match": "*"},
                )
                for row in flagged
            ]
        )
        print(f"  $batch of {len(batch)} updates: {sum(r.ok for r in batch)} ok")
        dyn.win_opportunity(upserted.id, "Won in Partner Center")
        delta = dyn.track_changes("opportunities", delta_link=tracked.delta_link)
        print(f"  WinOpportunity done; change tracking now reports {len(delta.rows)} changed rows")

        step("Salesforce: the Salesforce sandbox through SalesforceSyncHook (the provider's hook, extended)")
        sfe = sandbox.salesforce
        assert sfe is not None
        sfe.seed(opportunities=80, accounts=30, flagged=20, seed=2026)
        sfh = SalesforceSyncHook()
        flagged_sf = list(sfh.query_records(select(
            "Opportunity", ["Id", "Name", "Amount", "PC_Referral_Id__c"],
            [Condition("PC_Sync_With_Partner_Center__c", "=", True), Condition("IsClosed", "=", False)],
        )))  # fmt: skip
        print(
            f"  {len(flagged_sf)} open opportunities flagged for Partner Center; "
            f"{len(sfh.get_available_fields('Opportunity'))} Opportunity fields from describe"
        )
        upserts = sfh.upsert_records("Opportunity", "PC_Referral_Id__c", [
            {"PC_Referral_Id__c": r["id"], "Name": r["name"][:120], "StageName": "Prospecting",
             "CloseDate": r["details"]["closingDateTime"][:10], "Amount": r["details"]["dealValue"],
             "CurrencyIsoCode": r["details"]["currency"]}
            for r in everything[:250]
        ])  # fmt: skip
        created = sum(1 for u in upserts if u.success and u.created)
        print(
            f"  upsert of {len(upserts)} referrals by PC_Referral_Id__c (sObject Collections): {created} created, "
            f"{sum(1 for u in upserts if not u.success)} rejected ({sfh.retrier.calls['PATCH']} calls)"
        )
        since = datetime.now(UTC) - timedelta(minutes=5)
        recent = list(sfh.query_modified_since("Opportunity", ["Name"], since))
        print(
            f"  incremental read by SystemModstamp: {len(recent)} changed in the last 5 minutes; "
            f"API usage {sfh.usage.used}/{sfh.usage.limit}"
        )

        step("Summary")
        state = requests.get(
            f"{sandbox.origin('partner_center')}/_sandbox/state", verify=str(sandbox.pki.ca_cert), timeout=10
        ).json()
        print(f"  referrals: {state['referrals']}  deliveries: {state['deliveries']}")
        print(f"  token grants: {sandbox.entra.grants}")
    print("\ndemo finished: Partner Center, Dynamics 365 and Salesforce sandboxes reached through their hooks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
