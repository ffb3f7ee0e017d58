"""Shared fixtures: an isolated AIRFLOW_HOME and one in-process sandbox per session.

The sandbox's emulators run on free ports on 127.0.0.1 over HTTPS with the
locally generated CA; every test resets the state it touches.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="cosell-test-"))
os.environ["AIRFLOW_HOME"] = str(_HOME / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
_REPO = Path(__file__).resolve().parents[1]
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(_REPO / "plugins")
os.environ["COSELL_SANDBOX_HOME"] = str(_HOME / "sandbox")
# Bytecode cached, as AirflowCluster does for its processes: with PYTHONDONTWRITEBYTECODE (set on
# these machines) and a venv installed without .pyc files, every Python process the suite starts
# (xdist workers, spawned state-store writers, the kill test's step server, CLI runs) compiled
# Airflow, pandas, SQLAlchemy and our code from source again: 1.5-2 s of CPU each. One cache in
# .airflow/pycache (git-ignored), shared with the clusters; Python checks each file's mtime.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", str(_REPO / ".airflow" / "pycache"))
sys.dont_write_bytecode = False
sys.pycache_prefix = sys.pycache_prefix or os.environ["PYTHONPYCACHEPREFIX"]
# A task that fails for a transient reason is retried (3 times, from 30 s by default): in tests,
# from 1 s, so a dag.test() with a failing task does not wait minutes. Tests of the retry
# settings themselves set their own values.
os.environ.setdefault("AIRFLOW__COSELL__TASK_RETRY_DELAY", "1")
# Likewise the hooks' backoff between attempts after a 5xx or a dropped connection (0.5 s doubling
# to 30 s by default): from 20 ms, capped at 0.2 s. Retry-After is still waited out in full.
# Tests of the backoff itself pass their own RetryPolicy.
os.environ.setdefault("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF", "0.02")
os.environ.setdefault("AIRFLOW__COSELL__HTTP_RETRY_BACKOFF_MAX", "0.2")

from cosell_sandbox.runtime import Sandbox  # noqa: E402
from tests import services  # noqa: E402
from tests.helpers import reset_secrets_masker  # noqa: E402

pytest_plugins = ["tests.xdist_groups", "tests.shared_airflow"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, naming the service and how to start it, when PostgreSQL or Redis is down:
    the suite never skips their tests silently (SPEC §8). Only the controller checks (not
    each xdist worker), and only when tests will run."""
    if hasattr(session.config, "workerinput") or session.config.option.collectonly:
        return
    missing = services.missing_services()
    if missing:
        pytest.exit("make test needs the local services:\n" + "\n".join(missing), returncode=3)


@pytest.fixture(autouse=True)
def _fresh_secrets_masker() -> Iterator[None]:
    """Each test starts with an empty secrets masker, as each Airflow task process does (see
    ``tests.helpers.reset_secrets_masker``)."""
    yield
    reset_secrets_masker()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test (dropped afterwards)."""
    with services.fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(_HOME / "sandbox") as sb:
        assert sb.dispatcher is not None
        sb.dispatcher.config.backoff_base = 0.05
        yield sb


@pytest.fixture
def pc(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The sandbox with Partner Center reset (no referrals, no registration, no faults)."""
    sandbox.reset()
    yield sandbox
    sandbox.reset()


@pytest.fixture
def pc_conn(pc: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """AIRFLOW_CONN_PARTNER_CENTER_DEFAULT pointing at the sandbox, with a private token store."""
    from cosell_sync.hooks.entra import forget_tokens

    forget_tokens()
    conn = pc.connections()["partner_center_default"]
    conn["extra"]["token_store_path"] = str(tmp_path / "tokens.json")
    monkeypatch.setenv("AIRFLOW_CONN_PARTNER_CENTER_DEFAULT", json.dumps(conn))
    yield conn
    forget_tokens()


@pytest.fixture
def hook(pc_conn: dict):
    from cosell_sync.hooks.partner_center import PartnerCenterHook

    return PartnerCenterHook()


@pytest.fixture
def dyn_conn(pc: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """AIRFLOW_CONN_DYNAMICS365_DEFAULT pointing at the Dataverse emulator."""
    from cosell_sync.hooks import dynamics365 as dynamics
    from cosell_sync.hooks.entra import forget_tokens

    forget_tokens()
    dynamics._currencies.clear()
    conn = pc.connections()["dynamics365_default"]
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(conn))
    yield conn
    forget_tokens()


@pytest.fixture
def dyn_hook(dyn_conn: dict):
    from cosell_sync.hooks.dynamics365 import DynamicsHook

    return DynamicsHook()


@pytest.fixture
def sf_conn(pc: Sandbox, monkeypatch: pytest.MonkeyPatch) -> dict:
    """AIRFLOW_CONN_SALESFORCE_DEFAULT pointing at the Salesforce emulator (direct token)."""
    conn = pc.connections()["salesforce_default"]
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", json.dumps(conn))
    return conn


@pytest.fixture
def sf_hook(sf_conn: dict):
    from cosell_sync.hooks.salesforce import SalesforceSyncHook

    return SalesforceSyncHook()


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated Airflow metadata DB (SQLite) under the test AIRFLOW_HOME, for dag.test(): a
    copy of the migrated DB the Airflow clusters start from (migrated once, cached in .airflow/)."""
    from cosell_sandbox.airflow_cluster import AirflowCluster

    AirflowCluster(Path(os.environ["AIRFLOW_HOME"]), {}).migrate()
