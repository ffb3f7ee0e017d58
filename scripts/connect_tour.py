"""`make connect-tour`: the README's "Connect your tenant" path, typed as a partner types it,
against the sandbox instead of a real tenant.

It starts the sandbox as a fresh tenant looks: a Dataverse org without the ``cosell_*``
columns and key, a Partner Center connection with no refresh token, no webhook registration.
Then it runs, each as the real ``cosell-sync`` console script (or ``airflow``) in a shell of
its own, and prints each command with its output:

1. ``cosell-sync login partner-center``: the device-code sign-in. The person at the browser is
   played by the Entra emulator's control plane, which approves the printed code;
2. ``cosell-sync setup dynamics365 --dry-run``, then for real, then again (nothing to do);
3. ``cosell-sync setup salesforce`` (prints how to deploy the fields with the Salesforce CLI);
4. ``cosell-sync check``: the webhook is not registered yet and the state DB is new, so both
   are ✘, each with its fix;
5. the fixes: ``airflow dags test partner_center_webhook_registration`` registers the webhook,
   and ``check --migrate-state`` migrates the state DB; then ``check`` is all ✔;
6. ``cosell-sync preview --crm dynamics365 --referral <id>``;
7. the first real run, ``airflow dags test cosell_sync_dynamics365``, and the opportunity it
   created, read back from Dataverse next to the preview's values.

Secrets never show: the tour checks its own output for every credential the sandbox issued
(and the refresh token the sign-in stored) and fails if one appears. Connections come from
``AIRFLOW_CONN_*`` variables, as in a deployment; only the URLs and the CA are the sandbox's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from cosell_sandbox.airflow_cluster import AirflowCluster
from cosell_sandbox.runtime import Sandbox

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WEBHOOK_URL = "https://airflow.example.com/cosell/webhooks/partner-center"
SHOWN = (
    "name",
    "estimatedvalue",
    "estimatedclosedate",
    "description",
    "cosell_referralid",
    "cosell_sharewithmicrosoft",
)


class Tour:
    def __init__(self, sb: Sandbox, work: Path) -> None:
        self.sb = sb
        self.ids: list[str] = []
        self.work = work
        self.secrets: set[str] = set()
        creds = sb.credentials
        self.secrets |= {creds.client_secret, creds.refresh_token, creds.salesforce_token, creds.password}
        env = dict(sb.env())
        pc = json.loads(env["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"])
        del pc["extra"]["refresh_token"]  # a fresh tenant: nobody has signed in yet
        env["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"] = json.dumps(pc)
        self.airflow = AirflowCluster(work / "airflow", env, components=())
        quiet = {"AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}
        self.env = self.airflow.env | quiet

    # -- shell -------------------------------------------------------------------------------------
    def show(self, text: str) -> None:
        for secret in self.secrets:
            if secret and secret in text:
                raise SystemExit("connect_tour: a secret appeared in a command's output; stopping")
        print(text, flush=True)

    def run(self, *argv: str, ok: tuple[int, ...] = (0,), tail: int | None = None) -> str:
        self.show(f"\n$ {shlex.join(argv)}")
        exe = str(BIN / argv[0]) if argv[0] in ("cosell-sync", "airflow") else argv[0]
        done = subprocess.run([exe, *argv[1:]], env=self.env, cwd=self.work, capture_output=True, text=True)
        out = (done.stdout + done.stderr).rstrip()
        lines = out.splitlines()
        if tail is not None and len(lines) > tail:
            lines = ["…", *lines[-tail:]]
        self.show("\n".join(lines))
        if done.returncode not in ok:
            raise SystemExit(f"connect_tour: {argv[0]} {argv[1]} exited {done.returncode}")
        return out

    def login(self) -> None:
        """``cosell-sync login partner-center``, the code approved as the person at the browser would."""
        argv = ["cosell-sync", "login", "partner-center", "--env-file", "partner_center_default.env"]
        self.show(f"\n$ {shlex.join(argv)}")
        proc = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]],
            env=self.env,
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            self.show(line.rstrip())
            code = re.search(r"enter the code (\S+)", line)
            if code:
                time.sleep(1)  # the person reads the code, opens the page, signs in
                resp = requests.post(
                    f"{self.sb.origin('entra')}/_sandbox/devicecode",
                    json={"action": "approve", "username": self.sb.credentials.username, "user_code": code[1]},
                    verify=str(self.sb.pki.ca_cert),
                    timeout=30,
                )
                resp.raise_for_status()
        if proc.wait() != 0:
            raise SystemExit("connect_tour: cosell-sync login failed")
        line = (self.work / "partner_center_default.env").read_text().strip()
        name, _, value = line.removeprefix("export ").partition("=")
        conn = json.loads(shlex.split(value)[0])
        self.secrets.add(conn["extra"]["refresh_token"])
        self.env[name] = json.dumps(conn)
        self.show(f"\n$ source partner_center_default.env   # sets {name}")

    # -- the tour ------------------------------------------------------------------------------------
    def main(self) -> None:
        self.sb.dynamics365.configure(cosell_columns=False)  # an org before setup
        self.airflow.migrate()
        self.login()
        self.run("cosell-sync", "setup", "dynamics365", "--dry-run")
        self.run("cosell-sync", "setup", "dynamics365")
        self.run("cosell-sync", "setup", "dynamics365")
        self.run(
            "cosell-sync", "setup", "salesforce", "--target-org", "acme", "--integration-user", "sync@acme.example"
        )
        self.run("cosell-sync", "check", "--crm", "dynamics365", ok=(1,))
        conf = json.dumps({"webhook_url": WEBHOOK_URL})
        self.run("airflow", "dags", "test", "partner_center_webhook_registration", "--conf", conf, tail=3)
        self.run("airflow", "dags", "list-runs", "partner_center_webhook_registration", "-o", "plain")
        self.run("cosell-sync", "check", "--crm", "dynamics365", "--webhook-url", WEBHOOK_URL, "--migrate-state")
        referral = self.open_referral()
        self.run("cosell-sync", "preview", "--crm", "dynamics365", "--referral", referral["id"])
        self.run("airflow", "dags", "test", "cosell_sync_dynamics365", tail=3)
        self.run("airflow", "dags", "list-runs", "cosell_sync_dynamics365", "-o", "plain")
        self.show_created(referral)

    def open_referral(self) -> dict[str, Any]:
        referrals = [self.sb.partner_center.referrals[i] for i in self.ids]
        return next(r for r in referrals if r.get("status") in ("New", "Active"))

    def show_created(self, referral: dict[str, Any]) -> None:
        rows = [r for r in self.sb.dynamics365.rows("opportunities") if r.get("cosell_referralid") == referral["id"]]
        self.show(f"\n# the opportunity the run created for referral {referral['id']}, read back from Dataverse:")
        for row in rows:
            self.show(json.dumps({k: row.get(k) for k in SHOWN}, indent=2, default=str))
        if len(rows) != 1:
            raise SystemExit(f"connect_tour: expected one opportunity for the referral, found {len(rows)}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cosell-connect-") as tmp, Sandbox(Path(tmp) / "sandbox") as sb:
        tour = Tour(sb, Path(tmp))
        tour.ids = sb.partner_center.seed(5, seed=7)
        tour.main()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    raise SystemExit(main())
