"""Auth grants, TLS trust and secret hygiene of the Partner Center hook."""

from __future__ import annotations

import json
import logging
import socket

import pytest
import requests

from cosell_sandbox.runtime import Sandbox
from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.hooks.entra import forget_tokens
from cosell_sync.hooks.http import RetryPolicy, TrustedSession
from cosell_sync.hooks.partner_center import PartnerCenterHook


def _port_443_free() -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 443))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _port_443_free(), reason="msal's user realm lookup needs 127.0.0.1:443 (root, and free)")
def test_username_password_grant_for_a_service_account(tmp_path, monkeypatch):
    """msal looks the user realm up on port 443 of the authority host, whatever port the
    authority names; so this sandbox runs its token service on 443."""
    with Sandbox(tmp_path / "sb443", ports={"entra": 443}) as sb:
        assert sb.origin("entra") == "https://127.0.0.1:443"
        sb.partner_center.seed(5)
        conn = sb.connections()["partner_center_default"]
        extra = conn["extra"]
        del extra["refresh_token"]
        extra.update(
            authority="https://127.0.0.1",
            username=sb.credentials.username,
            user_password=sb.credentials.password,
            token_store_path=str(tmp_path / "t.json"),
        )
        monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
        forget_tokens()
        try:
            assert len(list(PartnerCenterHook().list_referrals())) == 5
            assert sb.entra.grants["password"] == 1
            assert any(e.path.startswith("/common/userrealm/") for e in sb.entra.log)

            extra["user_password"] = "not-the-password"
            monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
            forget_tokens()
            with pytest.raises(AuthenticationError, match="AADSTS50126"):
                list(PartnerCenterHook().list_referrals())
        finally:
            forget_tokens()


def test_connection_without_user_credentials_is_a_clear_configuration_error(pc_conn, monkeypatch):
    conn = json.loads(json.dumps(pc_conn))
    del conn["extra"]["refresh_token"]
    monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
    with pytest.raises(ConfigurationError, match="app\\+user"):
        PartnerCenterHook().settings  # noqa: B018


def test_ca_bundle_wins_over_requests_ca_bundle(pc, hook, monkeypatch):
    import certifi

    # The machine-wide variable points at roots that do not include the sandbox CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    plain = requests.Session()
    plain.verify = str(pc.pki.ca_cert)
    with pytest.raises(requests.exceptions.SSLError):
        plain.get(hook.settings.referrals_url, timeout=10)  # requests' own quirk: the env var wins

    trusted = TrustedSession(str(pc.pki.ca_cert))
    assert trusted.get(hook.settings.referrals_url, timeout=10).status_code == 401  # TLS fine, no token
    assert list(hook.list_referrals()) == []  # the hook (and msal through it) use the session


def test_requests_ca_bundle_is_honoured_without_ca_bundle(pc, pc_conn, monkeypatch):
    conn = json.loads(json.dumps(pc_conn))
    del conn["extra"]["ca_bundle"]
    monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pc.pki.ca_cert))
    pc.partner_center.seed(3)
    assert len(list(PartnerCenterHook().list_referrals())) == 3


def test_secrets_never_reach_logs_or_errors(pc, pc_conn, caplog, monkeypatch):
    from cosell_sandbox.server import FaultConfig

    caplog.set_level(logging.DEBUG)
    pc.partner_center.seed(150)
    pc.partner_center.faults.configure(FaultConfig(seed=2, rate_429=0.15, retry_after=1, path_prefix="/v1.0"))
    hook = PartnerCenterHook(retry_policy=RetryPolicy(max_attempts=8))
    assert len(list(hook.list_referrals(top=10))) == 150
    access_token = hook.get_token(hook.settings.referrals_scope)
    messages = [caplog.text]

    pc.partner_center.faults.clear()
    bad = json.loads(json.dumps(pc_conn))
    bad["extra"]["refresh_token"] = "0.sandbox.revoked-refresh-token-value"
    monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(bad))
    forget_tokens()
    with pytest.raises(AuthenticationError) as err:
        list(PartnerCenterHook().list_referrals())
    messages += [str(err.value), repr(err.value), caplog.text]

    secrets = [
        pc_conn["password"],
        pc_conn["extra"]["refresh_token"],
        access_token,
        "0.sandbox.revoked-refresh-token-value",
    ]
    assert "HTTP 429" in messages[0]  # the retries were logged...
    for text in messages:
        for secret in secrets:
            assert secret not in text  # ...without any credential
