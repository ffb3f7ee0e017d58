"""DynamicsHook connection and client-credentials token (queries and writes come with the Dataverse issue)."""

from __future__ import annotations

import json

import pytest

from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.hooks._msal import forget_tokens
from cosell_sync.hooks.dynamics import DynamicsHook

ORG = "https://contoso-sandbox.crm.dynamics.com"


@pytest.fixture
def dyn_conn(pc, monkeypatch):
    forget_tokens()
    pc.entra.register_resource(ORG)
    creds = pc.credentials
    conn = {
        "conn_type": "dynamics365",
        "host": ORG,
        "login": creds.client_id,
        "password": creds.client_secret,
        "extra": {"tenant_id": creds.tenant_id, "authority": pc.origin("entra"), "ca_bundle": str(pc.pki.ca_cert)},
    }
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))
    yield conn
    forget_tokens()


def test_client_credentials_token_for_the_environment_scope(pc, dyn_conn):
    hook = DynamicsHook()
    token = hook.get_token()
    claims = pc.entra.validate_bearer(f"Bearer {token}", ORG)
    assert claims["appid"] == dyn_conn["login"] and "upn" not in claims  # an app token, no user
    assert hook.get_token() == token  # cached
    assert pc.entra.grants["client_credentials"] == 1


def test_bad_secret_and_bad_host_are_clear(pc, dyn_conn, monkeypatch):
    bad = dict(dyn_conn, password="wrong-secret-12345")
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(bad))
    with pytest.raises(AuthenticationError, match="AADSTS7000215"):
        DynamicsHook().get_token()
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(dict(dyn_conn, host="http://plain.example")))
    with pytest.raises(ConfigurationError, match="environment URL"):
        DynamicsHook().settings  # noqa: B018
