"""One real Airflow for the tests that need "an Airflow with our DAGs and plugin" (issue 17).

Starting a cluster (API server, scheduler, DAG processor and triggerer, as ``make airflow``
runs them: LocalExecutor, SQLite) costs each test 30-60 s on this 2-core machine. The tests
that need no topology or schedule of their own share one per xdist worker, for the session:
``shared_airflow``. They run in the xdist group ``SHARED_GROUP``, so one worker starts it once.

The cluster is the union of what they need: HTTPS (Partner Center delivers webhooks over TLS
only), the simple auth manager with real users (``admin``, ``viewer`` and ``ada``, a ``user``),
the sandbox's Partner Center and Salesforce connections and webhook settings, and a sync
schedule that never comes due during a test (so a DAG a test unpauses runs only what it
triggers). The state DB is at its default place under ``$AIRFLOW_HOME``.

Tests sharing it must not depend on each other's state: before each, ``shared_airflow``
pauses every DAG, waits for running DAG runs to end and deletes every run (through Airflow's
REST API, as an admin), empties the state DB, and starts again a component that has died
(saying so: a deployment restarts it too). The ``pc`` fixture resets the sandbox.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cosell_sandbox.airflow_cluster import COMPONENTS, AirflowCluster
from cosell_sandbox.runtime import Sandbox
from tests.xdist_groups import group_of

SHARED_GROUP = "airflow-cluster-a"  # the lane (xdist group) whose worker runs them
USERS = {"admin": "admin", "viewer": "viewer", "ada": "user"}  # name -> simple auth manager role
SYNC_DAGS = ("cosell_sync_salesforce", "cosell_sync_dynamics365")
EVENTS_DAG = "cosell_referral_events"
# No schedule: a DAG a test unpauses runs only what the test triggers.
NEVER = "none"


@dataclass
class SharedAirflow:
    af: AirflowCluster
    passwords: dict[str, str] = field(repr=False)
    staging: Path

    @property
    def url(self) -> str:
        return self.af.url

    @property
    def ca(self) -> str:
        assert self.af.ca is not None
        return self.af.ca

    @property
    def state_url(self) -> str:
        """The state DB the DAGs and the plugin use: the default, under the cluster's home."""
        return f"sqlite:///{self.af.home / 'cosell_state.db'}"

    def token(self, user: str) -> str:
        """A JWT for ``user`` from Airflow's ``/auth/token`` (its password from the passwords file)."""
        resp = requests.post(
            f"{self.url}/auth/token",
            json={"username": user, "password": self.passwords[user]},
            verify=self.ca,
            timeout=60,
        )
        assert resp.status_code in (200, 201), resp.text
        return resp.json()["access_token"]

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/api/v2/monitor/health", verify=self.ca, timeout=5).ok
        except requests.RequestException:
            return False

    def reset(self) -> None:
        """Every component up, every DAG paused and without runs, the state DB empty."""
        for name in COMPONENTS:
            proc = self.af.procs.get(name)
            if proc is None or proc.poll() is not None:
                code = "stopped" if proc is None else f"exited {proc.returncode}"
                print(f"shared Airflow: {name} {code}; starting it again\n{self.af.tail(20)}")
                self.af.start_component(name)
        self.af.wait_for(self._healthy, 120, "the API server to answer")
        headers = {"Authorization": f"Bearer {self.token('admin')}"}

        def api(method: str, path: str, **kwargs) -> requests.Response:
            # verify on each call: a Session's own verify loses to REQUESTS_CA_BUNDLE from the environment
            resp = requests.request(
                method, f"{self.url}/api/v2{path}", headers=headers, verify=self.ca, timeout=60, **kwargs
            )
            resp.raise_for_status()
            return resp

        for dag in api("GET", "/dags", params={"limit": 100, "paused": False}).json()["dags"]:
            api("PATCH", f"/dags/{dag['dag_id']}", json={"is_paused": True})

        def runs() -> list[dict]:
            return api("GET", "/dags/~/dagRuns", params={"limit": 1000}).json()["dag_runs"]

        self.af.wait_for(
            lambda: all(r["state"] != "running" for r in runs()), 240, "the previous test's DAG runs to end", 2
        )
        for run in runs():
            api("DELETE", f"/dags/{run['dag_id']}/dagRuns/{run['dag_run_id']}")
        left = runs()
        assert not left, f"DAG runs left after the reset: {[(r['dag_id'], r['dag_run_id']) for r in left]}"
        import sqlalchemy as sa  # here, not at the top: conftest loads this module in every process

        from cosell_sync.state import StateStore
        from cosell_sync.state.schema import metadata, schema_version_t

        store = StateStore(self.state_url)
        store.migrate()
        with store.engine.begin() as conn:
            present = set(sa.inspect(conn).get_table_names())
            for table in reversed(metadata.sorted_tables):
                if table.name in present and table is not schema_version_t:
                    conn.execute(table.delete())
        store.close()


class SharedAirflowHost:
    """Starts the shared Airflow when a test first asks for it, and stops it when the worker's
    next test does not use it (so it does not idle beside the rest of the suite); a later test
    that asks again gets a fresh one."""

    def __init__(self, sandbox: Sandbox, base: Path) -> None:
        self.sandbox, self.base = sandbox, base
        self.current: SharedAirflow | None = None
        self.starts = 0

    def get(self) -> SharedAirflow:
        if self.current is None:
            self.starts += 1
            self.current = self._start(self.base / f"shared-{self.starts}")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.af.stop()
            self.current = None

    def _start(self, home: Path) -> SharedAirflow:
        sandbox = self.sandbox
        home.mkdir(parents=True)
        passwords = {user: secrets.token_urlsafe(18) for user in USERS}
        passwords_file = home / "simple_auth_manager_passwords.json"
        passwords_file.touch(mode=0o600)
        passwords_file.write_text(json.dumps(passwords))
        conns = sandbox.connections()
        conns["partner_center_default"]["extra"]["token_store_path"] = str(home / "tokens.json")
        staging = home / "staging"
        env = {
            f"AIRFLOW_CONN_{c.upper()}": json.dumps(conns[c]) for c in ("partner_center_default", "salesforce_default")
        }
        env |= {f"AIRFLOW__COSELL__{k.upper()}": v for k, v in sandbox.webhook_settings().items()}
        env |= {
            "AIRFLOW__COSELL__EVENT_CRMS": "salesforce",
            "AIRFLOW__COSELL__SYNC_SCHEDULE": NEVER,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            "COSELL_STAGING_URL": f"file://{staging}",
        }
        tls = (sandbox.pki.server_cert, sandbox.pki.server_key, sandbox.pki.ca_cert)
        af = AirflowCluster(home / "airflow", env, tls=tls)
        try:
            af.start()
            for dag_id in (*SYNC_DAGS, EVENTS_DAG):
                af.wait_for(lambda dag_id=dag_id: af.dag_serialized(dag_id), 240, f"{dag_id} to be parsed")
        except BaseException:
            af.stop()
            raise
        return SharedAirflow(af, passwords, staging)


_HOST = pytest.StashKey[SharedAirflowHost]()


@pytest.fixture(scope="session")
def shared_airflow_host(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedAirflowHost]:
    host = SharedAirflowHost(sandbox, tmp_path_factory.mktemp("shared-airflow"))
    yield host
    host.stop()


@pytest.fixture
def shared_airflow(
    pc: Sandbox, shared_airflow_host: SharedAirflowHost, request: pytest.FixtureRequest
) -> SharedAirflow:
    """The shared Airflow, reset for this test (the sandbox reset by ``pc``)."""
    group = group_of(request.node)
    assert group == SHARED_GROUP, f"a test using shared_airflow must be in xdist_group {SHARED_GROUP!r}, not {group!r}"
    request.config.stash[_HOST] = shared_airflow_host
    shared = shared_airflow_host.get()
    shared.reset()
    return shared


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After the last test in a row that uses the shared Airflow, stop it."""
    result = yield
    host = item.config.stash.get(_HOST, None)
    uses = "shared_airflow" in getattr(item, "fixturenames", ())
    if (
        host is not None
        and uses
        and (nextitem is None or "shared_airflow" not in getattr(nextitem, "fixturenames", ()))
    ):
        host.stop()
    return result
