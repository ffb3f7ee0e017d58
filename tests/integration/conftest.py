"""Fixtures the integration tests share: a fresh state DB (SQLite; PostgreSQL when a test
parametrizes ``state_backend``), every sandbox connection, and the webhook receiver app
(in-process, configured as an Airflow deployment has it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosell_sandbox.runtime import Sandbox
from cosell_sync.state import StateStore
from cosell_sync.webhooks.receiver import create_app
from tests import services


@pytest.fixture
def state_backend() -> str:
    """The state DB's backend for ``store`` and ``state_url``: SQLite unless a test parametrizes
    ``state_backend`` (``@pytest.mark.parametrize("state_backend", ["sqlite", "postgresql"])``)."""
    return "sqlite"


@pytest.fixture
def state_db_url(state_backend: str, tmp_path: Path) -> Iterator[str]:
    """The test's own state DB: a SQLite file under tmp_path, or a fresh PostgreSQL database
    (dropped afterwards)."""
    if state_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    elif state_backend == "postgresql":
        with services.fresh_database("cosell_state_test") as url:
            yield url
    else:
        raise ValueError(f"state_backend must be sqlite or postgresql, not {state_backend!r}")


@pytest.fixture
def store(state_db_url: str) -> Iterator[StateStore]:
    """A migrated state DB of the test's own (a module may define its own ``store`` instead)."""
    s = StateStore(state_db_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def conns(pc_conn, dyn_conn, sf_conn):
    """The Partner Center, Dataverse and Salesforce connections, all pointing at the sandbox."""
    return pc_conn


@pytest.fixture
def state_url(state_db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The state DB's URL, also set as Airflow's ``cosell_state`` connection."""
    url = state_db_url
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", json.dumps({"conn_type": "generic", "host": url}))
    return url


@pytest.fixture
def webhook_env(pc: Sandbox, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AIRFLOW__COSELL__WEBHOOK_* lines ``cosell-sandbox env`` prints, set in the environment."""
    env = {k: v for k, v in pc.env().items() if k.startswith("AIRFLOW__COSELL__")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def app(webhook_env: dict[str, str], state_url: str) -> Iterator[FastAPI]:
    application = create_app()  # settings from the environment, store from the connection
    yield application
    application.state.runtime.close()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
