"""Fixtures the sync-step tests share: a fresh SQLite state DB and every sandbox connection."""

from __future__ import annotations

import pytest

from cosell_sync.state import StateStore


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
