"""The Dynamics 365 connection id is ``dynamics365_default`` (SPEC §4); the id of earlier
versions, ``dynamics_default``, is still read when the new one is absent, with a warning."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowNotFoundException

from cosell_sync.hooks.dynamics365 import DynamicsHook, dynamics_connection


def _conn(host: str) -> str:
    return json.dumps(
        {
            "conn_type": "dynamics365",
            "host": host,
            "login": "client",
            "password": "dv-test-pw-8f3k2",
            "extra": {"tenant_id": "t"},
        }
    )


@pytest.fixture(autouse=True)
def _no_dynamics_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIRFLOW_CONN_DYNAMICS365_DEFAULT", "AIRFLOW_CONN_DYNAMICS_DEFAULT", "AIRFLOW_CONN_OTHER_DYNAMICS"):
        monkeypatch.delenv(name, raising=False)


def test_the_hook_reads_dynamics365_default(monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder):
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", _conn("https://new.crm.dynamics.com"))
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", _conn("https://old.crm.dynamics.com"))
    assert DynamicsHook.default_conn_name == "dynamics365_default"
    assert DynamicsHook().settings.url.startswith("https://new.crm.dynamics.com")
    assert not [w for w in recwarn if "'dynamics_default' is deprecated" in str(w.message)]


def test_the_old_id_alone_is_read_with_a_deprecation_warning(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", _conn("https://old.crm.dynamics.com"))
    with pytest.warns(DeprecationWarning, match="'dynamics_default' is deprecated: name it 'dynamics365_default'"):
        settings = DynamicsHook().settings
    assert settings.url.startswith("https://old.crm.dynamics.com")


def test_no_connection_names_the_new_id(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(AirflowNotFoundException, match="dynamics365_default"):
        dynamics_connection()


def test_another_id_never_falls_back(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", _conn("https://old.crm.dynamics.com"))
    with pytest.raises(AirflowNotFoundException):
        DynamicsHook("other_dynamics").settings  # noqa: B018
