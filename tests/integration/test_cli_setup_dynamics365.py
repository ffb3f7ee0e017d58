"""`cosell-sync setup dynamics365` against an org without the cosell_* columns and key (the
Dataverse emulator's ``cosell_columns: false``), then again on the finished org; and the
emulator's metadata writes and their documented errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from cosell_sandbox.runtime import Sandbox
from cosell_sync.cli import main
from cosell_sync.engine.dataverse_setup import ColumnSpec
from cosell_sync.hooks import dataverse_metadata as meta

API = "/api/data/v9.2/"
OPPORTUNITY = "EntityDefinitions(LogicalName='opportunity')"


@pytest.fixture
def empty_org(pc: Sandbox, dyn_conn: dict) -> Sandbox:
    pc.dynamics365.configure(cosell_columns=False, key_activation_seconds=0.5)
    return pc


def posts(pc: Sandbox) -> list[str]:
    return [r.path for r in pc.dynamics365.requests_matching("POST", API)]


def api(pc: Sandbox, dyn_hook: Any, method: str, path: str, **kwargs: Any) -> requests.Response:
    token = dyn_hook.get_token()
    return requests.request(
        method,
        f"{pc.origin('dynamics365')}{API}{path}",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        verify=str(pc.pki.ca_cert),
        timeout=10,
        **kwargs,
    )


def setup(*args: str) -> Any:
    return CliRunner().invoke(main, ["setup", "dynamics365", *args])


def test_setup_on_an_empty_org_then_a_sync_then_again_with_no_changes(empty_org, dyn_hook, conns, store, tmp_path):
    from cosell_sync.dag_factory import sync_sides
    from cosell_sync.pipeline import sync, window_job

    pc = empty_org
    assert "cosell_referralid" not in meta.read_columns(dyn_hook, "opportunity", "opportunities")
    assert meta.read_keys(dyn_hook, "opportunity") == []

    first = setup()
    assert first.exit_code == 0, first.output
    assert "✔ created column cosell_referralid" in first.output
    assert "✔ created alternate key on cosell_referralid" in first.output
    assert "alternate key on cosell_referralid is Active" in first.output
    columns = meta.read_columns(dyn_hook, "opportunity", "opportunities")
    assert columns["cosell_audit"].metadata_type == "MemoAttributeMetadata"
    assert set(columns["cosell_syncstatus"].labels) >= {"Synced", "Pending", "Error"}
    assert "Proof of concept or demo" in columns["cosell_howcanmicrosofthelp"].labels
    assert meta.read_keys(dyn_hook, "opportunity") == [(["cosell_referralid"], "Active")]

    # The new columns work for data: a whole sync both ways.
    pc.partner_center.seed(30, seed=8)
    pc.dynamics365.seed(opportunities=12, accounts=5, flagged=5, seed=8)
    job = window_job("dynamics365", store, tmp_path / "staging", "manual__setup1")
    report = sync(job, *sync_sides("dynamics365", job.mapping), store)
    assert report["pc_to_crm"]["created"] > 0 and report["pc_to_crm"]["failed"] == 0, report
    assert report["crm_to_pc"]["created"] > 0 and report["crm_to_pc"]["failed"] == 0, report

    pc.dynamics365.log.clear()
    second = setup()
    assert second.exit_code == 0, second.output
    assert "Nothing to do" in second.output and "No changes made" in second.output
    assert posts(pc) == []


def test_dry_run_prints_the_plan_and_writes_nothing(empty_org, dyn_hook):
    pc = empty_org
    pc.dynamics365.log.clear()
    result = setup("--dry-run")
    assert result.exit_code == 0, result.output
    assert (
        "Plan:" in result.output
        and "create column cosell_syncstatus (Picklist): Synced, Pending, Error" in result.output
    )
    assert (
        "create alternate key on cosell_referralid" in result.output and "Dry run: nothing was written" in result.output
    )
    assert posts(pc) == []
    assert "cosell_syncstatus" not in meta.read_columns(dyn_hook, "opportunity", "opportunities")


def test_setup_adds_the_options_a_choice_column_lacks(empty_org, dyn_hook):
    meta.create_column(
        dyn_hook, "opportunity", ColumnSpec("cosell_syncstatus", "Picklist", "Sync Status", None, ("Synced",))
    )
    result = setup()
    assert result.exit_code == 0, result.output
    assert "✔ added options to cosell_syncstatus: Pending, Error" in result.output
    values = dyn_hook.choice_options("opportunities", ["cosell_syncstatus"])["cosell_syncstatus"]
    base = empty_org.dynamics365.config.choice_value_base
    assert values == {"Synced": base, "Pending": base + 1, "Error": base + 2}


def test_a_missing_column_is_unknown_to_data_calls_and_the_key_is_usable_once_active(empty_org, dyn_hook):
    pc = empty_org
    missing = api(pc, dyn_hook, "GET", "opportunities?$select=cosell_referralid")
    assert missing.status_code == 400 and "cosell_referralid" in missing.json()["error"]["message"]
    write = api(pc, dyn_hook, "POST", "opportunities", json={"name": "x", "cosell_referralid": "r1"})
    assert write.status_code == 400
    spec = ColumnSpec("cosell_referralid", "String", "Referral ID", 100)
    meta.create_column(dyn_hook, "opportunity", spec)
    created = api(pc, dyn_hook, "POST", "opportunities", json={"name": "x", "cosell_referralid": "r1"})
    assert created.status_code == 204, created.text
    meta.create_key(dyn_hook, "opportunity", "cosell_referralid", "Referral ID")
    assert meta.read_keys(dyn_hook, "opportunity") == [(["cosell_referralid"], "Pending")]
    pending = api(pc, dyn_hook, "GET", "opportunities(cosell_referralid='r1')")
    assert pending.status_code == 400  # the index is not built yet
    time.sleep(0.6)
    assert meta.read_keys(dyn_hook, "opportunity") == [(["cosell_referralid"], "Active")]
    assert api(pc, dyn_hook, "GET", "opportunities(cosell_referralid='r1')").status_code == 200


def test_a_key_over_duplicate_values_fails_its_index_build(empty_org, dyn_hook):
    pc = empty_org
    meta.create_column(dyn_hook, "opportunity", ColumnSpec("cosell_referralid", "String", "Referral ID", 100))
    for _ in range(2):
        assert (
            api(pc, dyn_hook, "POST", "opportunities", json={"name": "x", "cosell_referralid": "dup"}).status_code
            == 204
        )
    meta.create_key(dyn_hook, "opportunity", "cosell_referralid", "Referral ID")
    time.sleep(0.6)
    assert meta.read_keys(dyn_hook, "opportunity") == [(["cosell_referralid"], "Failed")]


def test_the_emulator_refuses_duplicates_and_bad_metadata(pc, dyn_hook):
    """On the default org (every column and the key there)."""
    spec = ColumnSpec("cosell_referralid", "String", "Referral ID", 100)
    again = api(pc, dyn_hook, "POST", f"{OPPORTUNITY}/Attributes", json=meta.attribute_body(spec))
    assert again.status_code == 400 and again.json()["error"]["code"] == "0x80047013"
    key = {
        "SchemaName": "cosell_referralid_key",
        "DisplayName": meta.label("Referral ID"),
        "KeyAttributes": ["cosell_referralid"],
    }
    dup_key = api(pc, dyn_hook, "POST", f"{OPPORTUNITY}/Keys", json=key)
    assert dup_key.status_code == 400 and dup_key.json()["error"]["code"] == "0x80040237"
    no_schema = {k: v for k, v in meta.attribute_body(spec).items() if k != "SchemaName"}
    assert api(pc, dyn_hook, "POST", f"{OPPORTUNITY}/Attributes", json=no_schema).status_code == 400
    no_type = {k: v for k, v in meta.attribute_body(spec).items() if k != "@odata.type"}
    assert api(pc, dyn_hook, "POST", f"{OPPORTUNITY}/Attributes", json=no_type).status_code == 400
    bad_key = {**key, "KeyAttributes": ["nosuchcolumn"]}
    assert api(pc, dyn_hook, "POST", f"{OPPORTUNITY}/Keys", json=bad_key).status_code == 400
    unknown_table = api(pc, dyn_hook, "POST", "EntityDefinitions(LogicalName='nosuch')/Attributes", json=no_schema)
    assert unknown_table.status_code == 404


def test_the_cosell_sync_console_script_dry_run(empty_org, tmp_path):
    script = Path(sys.executable).with_name("cosell-sync")
    proc = subprocess.run(
        [str(script), "setup", "dynamics365", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "create column cosell_referralid (String, 100 characters)" in proc.stdout
    assert empty_org.credentials.client_secret not in proc.stdout + proc.stderr
