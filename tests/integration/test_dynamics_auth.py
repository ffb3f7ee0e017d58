"""DynamicsHook connection settings and the client-credentials token."""

from __future__ import annotations

import json

import pytest

from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.hooks.dynamics365 import DynamicsHook


def test_client_credentials_token_for_the_environment_scope(pc, dyn_conn):
    hook = DynamicsHook()
    token = hook.get_token()
    claims = pc.entra.validate_bearer(f"Bearer {token}", pc.origin("dynamics365"))
    assert claims["appid"] == dyn_conn["login"] and "upn" not in claims  # an app token, no user
    assert hook.get_token() == token  # cached
    assert pc.entra.grants["client_credentials"] == 1


def test_bad_secret_and_bad_host_are_clear(pc, dyn_conn, monkeypatch):
    bad = dict(dyn_conn, password="wrong-secret-12345")
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(bad))
    with pytest.raises(AuthenticationError, match="AADSTS7000215"):
        DynamicsHook().get_token()
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(dict(dyn_conn, host="http://plain.example")))
    with pytest.raises(ConfigurationError, match="environment URL"):
        DynamicsHook().settings  # noqa: B018
