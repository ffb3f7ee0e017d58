"""The state store's fixtures, for SQLite and PostgreSQL alike (SPEC §8 "Both databases").

``db_url`` (and ``store``, migrated on it) runs each test that asks for it twice: on a SQLite
file under the test's ``tmp_path`` and on a new, empty PostgreSQL database of its own
(``tests.services.fresh_database``, dropped afterwards with its sessions), so parallel or
repeated runs never share state. PostgreSQL is required: when it does not answer, the session
stops (``tests/conftest.py``); a test is never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cosell_sync.state import SCHEMA_VERSION, StateStore
from tests import services

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The state store's database: ``sqlite`` or ``postgresql``."""
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty state database of this test's own on ``backend`` (its SQLAlchemy URL)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with services.fresh_database("cosell_state_test") as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[StateStore]:
    """A migrated store on ``db_url`` (``max_attempts=3``: the dead-letter tests count on it)."""
    with StateStore(db_url, max_attempts=3) as st:
        assert st.migrate() == SCHEMA_VERSION
        yield st


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[StateStore]:
    """A migrated SQLite store, for the tests of SQLite's own settings."""
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as st:
        st.migrate()
        yield st
