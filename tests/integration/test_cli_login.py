"""`cosell-sync login partner-center`: the device-code sign-in against the Entra emulator, the
token stored where the hook reads it (metadata DB or a new AIRFLOW_CONN_ line), then a working
Partner Center call and sync with it; and the emulator's device-code grant on its own."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
from click.testing import CliRunner

from cosell_sandbox.runtime import Sandbox
from cosell_sync.cli import main
from cosell_sync.hooks.entra import RefreshTokenStore, forget_tokens
from cosell_sync.hooks.http import TrustedSession

ENV = "AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@pytest.fixture
def signed_out(pc: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The sandbox's partner_center connection without a user credential (a fresh tenant's), in
    the environment; the emulator tells clients to poll every second."""
    forget_tokens()
    conn = pc.connections()["partner_center_default"]
    del conn["extra"]["refresh_token"]
    conn["extra"]["token_store_path"] = str(tmp_path / "tokens.json")
    monkeypatch.setenv(ENV, json.dumps(conn))
    pc.entra.configure(device_code_interval=1)
    yield conn
    forget_tokens()


class Approver(threading.Thread):
    """Does what the user does in the browser once the command shows its code."""

    def __init__(self, pc: Sandbox, action: str = "approve", username: str | None = None) -> None:
        super().__init__(daemon=True)
        self.pc, self.action = pc, action
        self.username = username or pc.credentials.username
        self.result: dict[str, Any] | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            codes = self.pc.entra.pending_device_codes()
            if codes:
                self.result = self.pc.entra.act_on_device_code(self.action, self.username, codes[0])
                return
            time.sleep(0.1)


def run_login(pc: Sandbox, args: list[str], action: str = "approve") -> Any:
    approver = Approver(pc, action)
    approver.start()
    result = CliRunner().invoke(main, ["login", "partner-center", *args])
    approver.join(5)
    assert approver.result is not None, result.output
    return result


def secrets_of(pc: Sandbox) -> list[str]:
    """Every credential that must never appear in the command's output."""
    creds = pc.credentials
    return [creds.client_secret, creds.password, creds.refresh_token, *pc.entra.refresh_tokens]


def assert_no_secret(pc: Sandbox, output: str) -> None:
    for secret in secrets_of(pc):
        assert secret not in output


def new_refresh_token(pc: Sandbox) -> str:
    issued = [t for t, r in pc.entra.refresh_tokens.items() if r.public and not r.revoked]
    assert len(issued) == 1
    return issued[0]


# -- the env-var connection: a new 0600 file with the updated line ------------------------------


def test_login_with_an_env_var_connection_writes_a_private_env_file(
    pc, signed_out, dyn_conn, store, tmp_path, monkeypatch
):
    pc.partner_center.seed(12, seed=3)
    env_file = tmp_path / "out" / "pc.env"
    result = run_login(pc, ["--env-file", str(env_file)])
    assert result.exit_code == 0, result.output
    assert "To sign in, use a web browser to open the page" in result.output
    assert "service account" in result.output and "leave" in result.output
    assert f"Signed in as {pc.credentials.username}" in result.output
    assert str(env_file) in result.output and "0600" in result.output
    assert_no_secret(pc, result.output)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    line = env_file.read_text().strip()
    assert line.startswith(f"export {ENV}=")
    value = subprocess.run(["bash", "-c", f"source {env_file}; printenv {ENV}"], capture_output=True, text=True)
    conn = json.loads(value.stdout)
    assert conn["extra"]["refresh_token"] == new_refresh_token(pc)
    assert conn["extra"]["public_client"] is True
    assert conn["login"] == signed_out["login"] and conn["password"] == signed_out["password"]

    # The line works as it is: the hook redeems the token (without the secret) and lists referrals.
    from cosell_sync.hooks.partner_center import PartnerCenterHook

    monkeypatch.setenv(ENV, value.stdout)
    before = pc.entra.grants["refresh_token"]
    assert len(list(PartnerCenterHook().list_referrals())) == 12
    assert pc.entra.grants["refresh_token"] > before
    assert pc.entra.refresh_tokens_presented[-1] == conn["extra"]["refresh_token"]

    # ... and a whole sync runs on the signed-in user's token.
    from cosell_sync.dag_factory import sync_sides
    from cosell_sync.pipeline import sync, window_job

    pc.dynamics365.seed(opportunities=6, accounts=3, flagged=3, seed=3)
    job = window_job("dynamics365", store, tmp_path / "staging", "manual__login1")
    report = sync(job, *sync_sides("dynamics365", job.mapping), store)
    assert report["pc_to_crm"]["failed"] == 0 and report["crm_to_pc"]["failed"] == 0, report
    assert report["pc_to_crm"]["created"] > 0 and report["crm_to_pc"]["created"] > 0, report


def test_login_never_overwrites_an_existing_file(pc, signed_out, tmp_path):
    env_file = tmp_path / "pc.env"
    env_file.write_text("keep me\n")
    result = run_login(pc, ["--env-file", str(env_file)])
    assert result.exit_code != 0 and "exists" in result.output
    assert env_file.read_text() == "keep me\n"
    assert_no_secret(pc, result.output)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "expected"), [("decline", "authorization_declined"), ("expire", "expired_token")])
def test_a_declined_or_expired_sign_in_fails_and_stores_nothing(pc, signed_out, tmp_path, action, expected):
    env_file = tmp_path / "pc.env"
    result = run_login(pc, ["--env-file", str(env_file)], action=action)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Run the command again" in result.output
    assert not env_file.exists()
    assert_no_secret(pc, result.output)


def test_an_app_without_public_client_flows_gets_the_fix(pc, signed_out, tmp_path):
    creds = pc.credentials
    pc.entra.add_client(creds.client_id, creds.client_secret, public_client_flows=False)
    try:
        result = CliRunner().invoke(main, ["login", "partner-center", "--env-file", str(tmp_path / "x.env")])
    finally:
        pc.entra.add_client(creds.client_id, creds.client_secret, public_client_flows=True)
    assert result.exit_code == 1
    assert "Allow public client flows" in result.output
    assert_no_secret(pc, result.output)


def test_an_unknown_connection_is_named(pc, signed_out):
    result = CliRunner().invoke(main, ["login", "partner-center", "--conn-id", "no_such_conn"])
    assert result.exit_code == 1 and "No connection 'no_such_conn'" in result.output


# -- the metadata DB connection: updated in place, a new login wins over old rotations -----------


@pytest.fixture
def db_connection(airflow_db, pc: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict]:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    forget_tokens()
    conn = pc.connections()["partner_center_default"]
    conn["extra"]["token_store_path"] = str(tmp_path / "tokens.json")
    monkeypatch.delenv(ENV, raising=False)
    with create_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id == "pc_login_db"))
        session.add(
            Connection(
                conn_id="pc_login_db",
                conn_type="partner_center",
                login=conn["login"],
                password=conn["password"],
                extra=json.dumps(conn["extra"]),
            )
        )
    pc.entra.configure(device_code_interval=1)
    yield conn
    with create_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id == "pc_login_db"))
    forget_tokens()


def test_login_updates_a_metadata_db_connection_and_wins_over_old_rotations(pc, db_connection, monkeypatch):
    from airflow.models.connection import Connection

    from cosell_sync.hooks.partner_center import PartnerCenterHook

    old_seed = db_connection["extra"]["refresh_token"]
    token_store = RefreshTokenStore(Path(db_connection["extra"]["token_store_path"]))
    old_key = RefreshTokenStore.key("pc_login_db", db_connection["login"], old_seed)
    token_store.save(old_key, pc.entra.issue_refresh_token(pc.credentials.client_id, pc.credentials.username))

    result = run_login(pc, ["--conn-id", "pc_login_db"])
    assert result.exit_code == 0, result.output
    assert "metadata DB" in result.output
    assert_no_secret(pc, result.output)
    extra = Connection.get_connection_from_secrets("pc_login_db").extra_dejson
    new = new_refresh_token(pc)
    assert extra["refresh_token"] == new and extra["public_client"] is True
    assert token_store.load(old_key) is None  # the old sign-in's rotated token is gone

    pc.partner_center.seed(30, seed=5)
    # A task gets the connection from the API server, which reads this DB row; outside a task the
    # Task SDK has no API server, so hand the hook the row as it stands now.
    monkeypatch.setenv("AIRFLOW_CONN_PC_LOGIN_DB", Connection.get_connection_from_secrets("pc_login_db").as_json())
    hook = PartnerCenterHook("pc_login_db")
    assert len(list(hook.list_referrals())) == 30
    assert pc.entra.refresh_tokens_presented[-1] == new


def test_a_public_refresh_token_is_refused_with_the_secret(pc, signed_out):
    """Why the hook redeems a login's token without the secret (AADSTS700025, as Entra does)."""
    creds = pc.credentials
    token = pc.entra.issue_refresh_token(creds.client_id, creds.username, public=True)
    authority = f"{pc.origin('entra')}/{creds.tenant_id}"
    http = TrustedSession(str(pc.pki.ca_cert))
    app = msal.ConfidentialClientApplication(
        creds.client_id,
        client_credential=creds.client_secret,
        authority=authority,
        instance_discovery=False,
        http_client=http,
    )
    result = app.acquire_token_by_refresh_token(token, scopes=["https://api.partner.microsoft.com/.default"])
    assert result["error"] == "invalid_client" and 700025 in result["error_codes"]
    public = msal.PublicClientApplication(
        creds.client_id, authority=authority, instance_discovery=False, http_client=http
    )
    assert "access_token" in public.acquire_token_by_refresh_token(
        token, scopes=["https://api.partner.microsoft.com/.default"]
    )


# -- the emulator's device-code endpoints, as documented ----------------------------------------


def _post(pc: Sandbox, path: str, data: dict[str, str]) -> requests.Response:
    url = f"{pc.origin('entra')}/{pc.credentials.tenant_id}/oauth2/v2.0/{path}"
    return requests.post(url, data=data, verify=str(pc.pki.ca_cert), timeout=10)


def test_devicecode_and_token_polling_follow_the_documented_protocol(pc, signed_out):
    creds = pc.credentials
    scope = "https://api.partner.microsoft.com/.default offline_access"
    started = _post(pc, "devicecode", {"client_id": creds.client_id, "scope": scope})
    assert started.status_code == 200
    body = started.json()
    assert set(body) == {"user_code", "device_code", "verification_uri", "expires_in", "interval", "message"}
    assert body["expires_in"] == 900 and body["interval"] == 1 and body["user_code"] in body["message"]
    poll = {"grant_type": DEVICE_GRANT, "client_id": creds.client_id, "device_code": body["device_code"]}
    pending = _post(pc, "token", poll)
    assert pending.status_code == 400
    assert pending.json()["error"] == "authorization_pending" and pending.json()["error_codes"] == [70016]
    bad = _post(pc, "token", {**poll, "device_code": "nope"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_verification_code"
    pc.entra.act_on_device_code("approve", creds.username, body["user_code"])
    done = _post(pc, "token", poll)
    assert done.status_code == 200 and {"access_token", "refresh_token"} <= set(done.json())
    again = _post(pc, "token", poll)  # a code is redeemed once
    assert again.status_code == 400 and again.json()["error"] == "bad_verification_code"


def test_devicecode_rejects_unknown_apps_and_scopes(pc, signed_out):
    unknown = _post(pc, "devicecode", {"client_id": "00000000-0000-0000-0000-000000000000", "scope": "x/.default"})
    assert unknown.status_code == 400 and unknown.json()["error"] == "unauthorized_client"
    bad_scope = _post(pc, "devicecode", {"client_id": pc.credentials.client_id, "scope": "https://nowhere/.default"})
    assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_resource"


def test_the_control_plane_approves_only_a_known_user_and_one_code(pc, signed_out):
    url = f"{pc.origin('entra')}/_sandbox/devicecode"
    ca = str(pc.pki.ca_cert)
    none = requests.post(url, json={"action": "approve", "username": pc.credentials.username}, verify=ca, timeout=10)
    assert none.status_code == 404
    _post(
        pc, "devicecode", {"client_id": pc.credentials.client_id, "scope": "https://api.partner.microsoft.com/.default"}
    )
    stranger = requests.post(url, json={"action": "approve", "username": "who@else.example"}, verify=ca, timeout=10)
    assert stranger.status_code == 400 and "unknown user" in stranger.text
    wrong = requests.post(url, json={"action": "dance"}, verify=ca, timeout=10)
    assert wrong.status_code == 400
    ok = requests.post(url, json={"action": "decline"}, verify=ca, timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "declined"


# -- the real console script -----------------------------------------------------------------------


def test_the_cosell_sync_console_script_signs_in(pc, signed_out, tmp_path):
    script = Path(sys.executable).with_name("cosell-sync")
    env_file = tmp_path / "script.env"
    approver = Approver(pc)
    approver.start()
    proc = subprocess.run(
        [str(script), "login", "partner-center", "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    approver.join(5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "enter the code" in proc.stdout and "Signed in as" in proc.stdout
    assert_no_secret(pc, proc.stdout + proc.stderr)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
