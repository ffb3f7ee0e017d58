"""``cosell-sync check`` against the sandbox, through the real hooks: all ✔ on a ready sandbox, and
for each broken item a ✘ line naming it and its fix, with a non-zero exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner

from cosell_sync.cli import main
from cosell_sync.engine.mapping import DEFAULTS
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS
from tests.helpers import Receiver

RECEIVER_URL = "https://airflow.example.com/cosell/webhooks/partner-center"


@pytest.fixture
def ready(conns, pc, store, state_url, hook, monkeypatch):
    """A ready sandbox: every connection, a migrated state DB, the webhook registered."""
    monkeypatch.delenv("COSELL_MAPPING_SALESFORCE", raising=False)
    monkeypatch.delenv("COSELL_MAPPING_DYNAMICS365", raising=False)
    hook.create_webhook_registration(RECEIVER_URL, list(REFERRAL_EVENTS))
    return pc


def run(*args: str):
    result = CliRunner().invoke(main, ["check", *args])
    return result.exit_code, result.output


def lines_with(output: str, mark: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(mark)]


def fix_after(output: str, needle: str) -> str:
    """The fix line that follows the ✘ line containing ``needle``."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("✘") and needle in line)
    assert lines[at + 1].startswith("    fix: "), output
    return lines[at + 1]


def test_all_green_on_a_ready_sandbox(ready, sf_conn, dyn_conn, pc_conn):
    code, output = run()
    assert code == 0, output
    assert not lines_with(output, "✘"), output
    ticks = "\n".join(lines_with(output, "✔"))
    for expected in (
        "Partner Center (partner_center_default): app+user token acquired",
        "the signed-in user can list referrals",
        "Salesforce (salesforce_default): signed in",
        "Salesforce: all",
        "Salesforce: every picklist value the mapping writes exists",
        "Salesforce: PC_Referral_Id__c is an External ID, unique",
        "Dynamics 365 (dynamics365_default): token acquired",
        "Dynamics 365: all",
        "Dataverse: every choice label the mapping writes exists",
        "Dataverse: cosell_referralid is an alternate key of opportunity",
        f"Partner Center webhook: registered to {RECEIVER_URL}",
        "Partner Center webhook: the events the sync needs",
        "reachable, migrated",
    ):
        assert expected in ticks, output
    for secret in (pc_conn["password"], pc_conn["extra"]["refresh_token"], sf_conn["extra"]["access_token"]):
        assert secret not in output
    # --crm limits the CRM checks to one
    code, output = run("--crm", "salesforce")
    assert code == 0 and "Salesforce: all" in output and "Dynamics 365" not in output, output


def test_a_removed_salesforce_field_is_named_with_its_fix(ready):
    origin = ready.origin("salesforce")
    answer = requests.delete(
        f"{origin}/_sandbox/schema/fields/Opportunity/PC_Solutions__c", verify=str(ready.pki.ca_cert), timeout=10
    )
    assert answer.status_code == 204, answer.text
    code, output = run("--crm", "salesforce")
    assert code == 1, output
    [line] = [x for x in lines_with(output, "✘")]
    assert "fields.solutions: the field Opportunity.PC_Solutions__c does not exist" in line
    assert "`cosell-sync setup salesforce`" in fix_after(output, "PC_Solutions__c")
    # a standard field cannot be removed: the control plane answers as the API does, 400
    refused = requests.delete(
        f"{origin}/_sandbox/schema/fields/Opportunity/Amount", verify=str(ready.pki.ca_cert), timeout=10
    )
    assert refused.status_code == 400


def _mapping_copy(tmp_path: Path, crm: str, edit) -> Path:
    doc = yaml.safe_load((DEFAULTS / f"{crm}.yaml").read_text())
    edit(doc)
    path = tmp_path / f"{crm}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_picklist_value_the_org_lacks_is_named_with_its_fix(ready, tmp_path, monkeypatch):
    def edit(doc):
        doc["fields"]["help_code"]["values"]["crm"]["write"]["QuotesOrLicensing"] = "Licensing"
        doc["fields"]["help_code"]["values"]["crm"]["read"]["Licensing"] = "QuotesOrLicensing"

    monkeypatch.setenv("COSELL_MAPPING_SALESFORCE", str(_mapping_copy(tmp_path, "salesforce", edit)))
    code, output = run("--crm", "salesforce")
    assert code == 1, output
    bad = lines_with(output, "✘")
    assert bad and all("'Licensing' is not a value of the PC_How_Can_Microsoft_Help__c picklist" in x for x in bad)
    assert "Values > New" in fix_after(output, "'Licensing'")


def test_a_choice_label_and_a_column_dataverse_lacks(ready, tmp_path, monkeypatch):
    def edit(doc):
        doc["fields"]["help_code"]["values"]["crm"]["write"]["QuotesOrLicensing"] = "Licensing"
        doc["fields"]["help_code"]["values"]["crm"]["read"]["Licensing"] = "QuotesOrLicensing"
        doc["fields"]["solutions"]["crm"] = "cosell_solutionids"

    monkeypatch.setenv("COSELL_MAPPING_DYNAMICS365", str(_mapping_copy(tmp_path, "dynamics365", edit)))
    code, output = run("--crm", "dynamics365")
    assert code == 1, output
    assert "the label 'Licensing' is not an option of cosell_howcanmicrosofthelp" in output
    assert "cosell_howcanmicrosofthelp > Choices" in fix_after(output, "'Licensing'")
    assert "`cosell-sync setup dynamics365" in fix_after(output, "opportunities.cosell_solutionids does not exist")


def test_no_webhook_registration(conns, pc, store, state_url):
    code, output = run("--crm", "salesforce")
    assert code == 1, output
    assert [x for x in lines_with(output, "✘")] == [
        "✘ Partner Center webhook: no registration (changes reach the CRM only on the schedule)"
    ]
    assert "partner_center_webhook_registration" in fix_after(output, "no registration")


def test_a_registration_without_the_events_or_with_another_url(ready, hook):
    hook.update_webhook_registration("https://elsewhere.example.com/hook", ["referral-created"])
    code, output = run("--crm", "salesforce")
    assert code == 1
    assert "✘ Partner Center webhook: registered to https://elsewhere.example.com/hook" in output
    assert "not registered" in output and "referral-updated" in output
    code, output = run("--crm", "salesforce", "--webhook-url", "https://elsewhere.example.com/hook")
    assert "✔ Partner Center webhook: registered to https://elsewhere.example.com/hook" in output


def test_validation_event(ready, hook):
    receiver = Receiver(ready.pki.server_context())
    try:
        hook.update_webhook_registration(receiver.url, [*REFERRAL_EVENTS, "test-created"])
        code, output = run("--crm", "salesforce", "--validate-webhook")
        assert code == 0, output
        assert "✔ Partner Center webhook: validation event delivered" in output
        assert receiver.received
    finally:
        receiver.close()
    hook.update_webhook_registration(RECEIVER_URL, list(REFERRAL_EVENTS))
    code, output = run("--crm", "salesforce", "--validate-webhook")
    assert code == 1 and "send_test_event=true" in fix_after(output, "validation event needs")


def test_an_unmigrated_state_db(conns, pc, hook, tmp_path, monkeypatch):
    hook.create_webhook_registration(RECEIVER_URL, list(REFERRAL_EVENTS))
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", json.dumps({"conn_type": "generic", "host": url}))
    code, output = run("--crm", "salesforce")
    assert code == 1, output
    assert "schema version 0, this cosell-sync needs" in output
    assert "`cosell-sync check --migrate-state`" in fix_after(output, "schema version 0")
    code, output = run("--crm", "salesforce", "--migrate-state")
    assert code == 0, output
    assert "migrated now" in output
    assert run("--crm", "salesforce")[0] == 0


def test_a_missing_crm_connection_and_a_bad_secret(conns, pc, store, state_url, hook, monkeypatch):
    hook.create_webhook_registration(RECEIVER_URL, list(REFERRAL_EVENTS))
    monkeypatch.delenv("AIRFLOW_CONN_SALESFORCE_DEFAULT")
    code, output = run("--crm", "salesforce")
    assert code == 1 and "AIRFLOW_CONN_SALESFORCE_DEFAULT" in fix_after(output, "no connection 'salesforce_default'")
    conn = json.loads(os.environ["AIRFLOW_CONN_DYNAMICS365_DEFAULT"])
    conn["password"] = "wrong-secret-value"
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(conn))
    code, output = run()
    assert code == 1
    assert "✘ Dynamics 365 (dynamics365_default): token acquired" in output
    assert "Salesforce" not in output  # no connection: not checked without --crm
    assert "wrong-secret-value" not in output


def test_the_console_script(ready):
    script = Path(sys.executable).with_name("cosell-sync")
    assert script.exists() or shutil.which("cosell-sync")
    result = subprocess.run(
        [str(script) if script.exists() else "cosell-sync", "check", "--crm", "salesforce"],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✘" not in result.stdout and "✔ Salesforce: all" in result.stdout
