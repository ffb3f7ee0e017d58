"""Fixtures the integration tests share: a fresh SQLite state DB, every sandbox connection, and
the webhook receiver app (in-process, configured as an Airflow deployment has it)."""

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


@pytest.fixture
def store(tmp_path) -> StateStore:
    """A migrated state DB of the test's own (a module may define its own ``store`` instead)."""
    s = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    s.migrate()
    return s


@pytest.fixture
def conns(pc_conn, dyn_conn, sf_conn):
    """The Partner Center, Dataverse and Salesforce connections, all pointing at the sandbox."""
    return pc_conn


@pytest.fixture
def state_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'state.db'}"
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
