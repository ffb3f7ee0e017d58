"""Entra ID faults on msal's calls (OpenID discovery and the token request).

Retried like the API calls (429 after Retry-After, 5xx, dropped connections); what is left
after the retry budget is a typed error, and a refused credential an AuthenticationError.
"""

from __future__ import annotations

import json
import logging

import pytest

from cosell_sandbox.server import FaultConfig
from cosell_sync.errors import AuthenticationError, ServerError, ThrottledError, TransportError
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.entra import forget_tokens
from cosell_sync.hooks.http import RetryPolicy

FAST = RetryPolicy(max_attempts=3, backoff_base=0.05, backoff_max=0.2)


@pytest.fixture
def fast_retries(monkeypatch):
    """Short backoff for a hook given no policy ([cosell] http_retry_backoff); Retry-After (1 s
    from the emulator) is still honoured. The hook's own policy is the one its token requests are
    retried with."""
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", str(FAST.backoff_base))
    monkeypatch.setenv("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF_MAX", str(FAST.backoff_max))


def _paths(pc) -> tuple[str, str]:
    tenant = pc.credentials.tenant_id
    return f"/{tenant}/v2.0/.well-known/openid-configuration", f"/{tenant}/oauth2/v2.0/token"


def _calls(pc, path: str) -> list[tuple[int, str | None, float]]:
    return [(e.status, e.fault, e.at) for e in pc.entra.log if e.path == path]


def test_one_fault_of_each_kind_is_retried_and_the_hook_gets_a_token(pc, dyn_conn, fast_retries):
    discovery, token = _paths(pc)

    # One 503 on OpenID discovery (the application is built on the first token request).
    pc.entra.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=503, max_faults=1, path_prefix=discovery))
    assert DynamicsHook(retry_policy=FAST).get_token()
    calls = _calls(pc, discovery)
    assert [(s, f) for s, f, _ in calls] == [(503, "5xx"), (200, None)]
    assert calls[1][2] - calls[0][2] >= 0.9  # the 503's Retry-After: 1 was honoured

    # One 429 with Retry-After on the token endpoint.
    forget_tokens()
    pc.entra.log.clear()
    pc.entra.faults.configure(FaultConfig(rate_429=1.0, retry_after=2, max_faults=1, path_prefix=token))
    assert DynamicsHook(retry_policy=FAST).get_token()
    calls = _calls(pc, token)
    assert [(s, f) for s, f, _ in calls] == [(429, "429"), (200, None)]
    assert calls[1][2] - calls[0][2] >= 1.9  # Retry-After: 2, not the short backoff

    # One dropped connection on the token endpoint, then one on discovery.
    for path in (token, discovery):
        forget_tokens()
        pc.entra.log.clear()
        pc.entra.faults.configure(FaultConfig(drop_rate=1.0, max_faults=1, path_prefix=path))
        assert DynamicsHook(retry_policy=FAST).get_token()
        calls = _calls(pc, path)
        assert [f for _, f, _ in calls] == ["drop", None] and calls[1][0] == 200
    assert pc.entra.grants["client_credentials"] == 4


def test_refresh_token_grant_survives_a_throttled_token_endpoint(pc, hook, fast_retries):
    _, token = _paths(pc)
    pc.entra.faults.configure(FaultConfig(rate_429=1.0, retry_after=1, max_faults=1, path_prefix=token))
    pc.partner_center.seed(2)
    assert len(list(hook.list_referrals())) == 2
    assert [(s, f) for s, f, _ in _calls(pc, token)] == [(429, "429"), (200, None)]


def test_wrong_client_secret_is_an_authentication_error_without_the_secret(pc, dyn_conn, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "wrong-secret-0123456789abcdef"
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(dict(dyn_conn, password=secret)))
    _, token = _paths(pc)
    with pytest.raises(AuthenticationError) as info:
        DynamicsHook(retry_policy=FAST).get_token()
    err = info.value
    assert err.code == "invalid_client" and "AADSTS7000215" in str(err) and "Invalid client secret" in str(err)
    assert secret not in str(err) and secret not in caplog.text
    assert len(_calls(pc, token)) == 1  # a refusal is not retried


def test_persistent_503_is_a_server_error_not_a_raw_msal_error(pc, dyn_conn, fast_retries, caplog):
    discovery, token = _paths(pc)
    pc.entra.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=503, path_prefix=discovery))
    with pytest.raises(ServerError) as info:
        DynamicsHook(retry_policy=FAST).get_token()
    assert info.value.status == 503 and info.value.system == "Entra ID"
    assert "serviceNotAvailable" in str(info.value) and "Msal" not in type(info.value).__name__
    assert len(_calls(pc, discovery)) == 3  # the whole retry budget

    forget_tokens()  # discovery is fine now; the token endpoint keeps failing
    pc.entra.faults.configure(FaultConfig(rate_5xx=1.0, status_5xx=500, path_prefix=token))
    with pytest.raises(ServerError, match="HTTP 500"):
        DynamicsHook(retry_policy=FAST).get_token()
    assert len(_calls(pc, token)) == 3
    assert dyn_conn["password"] not in caplog.text


def test_persistent_429_is_throttled_not_an_authentication_error(pc, dyn_conn, fast_retries):
    _, token = _paths(pc)
    pc.entra.faults.configure(FaultConfig(rate_429=1.0, retry_after=0, path_prefix=token))
    with pytest.raises(ThrottledError) as info:
        DynamicsHook(retry_policy=FAST).get_token()
    assert not isinstance(info.value, AuthenticationError)
    assert info.value.status == 429 and info.value.code == "tooManyRequests"
    assert len(_calls(pc, token)) == 3


def test_connection_dropped_every_time_is_a_transport_error(pc, dyn_conn, fast_retries):
    _, token = _paths(pc)
    pc.entra.faults.configure(FaultConfig(drop_rate=1.0, path_prefix=token))
    with pytest.raises(TransportError, match="connection failed"):
        DynamicsHook(retry_policy=FAST).get_token()
    assert len(_calls(pc, token)) == 3
