"""Real Airflow components as child processes: API server, scheduler, DAG processor and
triggerer, in their own AIRFLOW_HOME, for end-to-end tests and the demo.

Two topologies:

* the default, as ``make airflow`` runs: the LocalExecutor with Airflow's metadata in SQLite;
* the distributed one (SPEC §8), as ``docker-compose.yml`` runs it: Airflow's metadata on
  PostgreSQL (``metadata_url``) and the CeleryExecutor (``celery``), with Redis as broker,
  PostgreSQL as result backend and ``airflow celery worker`` processes, each with its own
  Celery hostname and the hostname it reports for its task instances (``worker_hostname``),
  so a test can tell which worker ran what.

What needs the scheduler itself (backfills, the event-driven DAG, the webhook route on the
API server) uses this; everything else runs DAGs with ``dag.test()``. Every process is
started in its own process group, the API server on 127.0.0.1 with a free port, and all
are stopped (group-wide) on exit. With ``tls`` the API server serves HTTPS, as Partner
Center's webhook deliveries require.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]  # the checkout: dags/ and plugins/ live there
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINISHED = ("success", "failed")
# Airflow's SQLite connections wait this long for a lock held by another component (the
# sqlite3 default is 5 s, which a busy scheduler outlasts: "database is locked").
SQLITE_CONNECT_ARGS = {"timeout": 60}
WORKER_HOSTNAME_ENV = "COSELL_WORKER_HOSTNAME"


def worker_hostname() -> str:
    """``[core] hostname_callable`` for the cluster: a Celery worker reports the name it was
    started with (so two workers on one machine can be told apart); other processes the FQDN."""
    return os.environ.get(WORKER_HOSTNAME_ENV) or socket.getfqdn()


@dataclass(frozen=True)
class Celery:
    """The CeleryExecutor's wiring: ``workers`` worker processes serving ``queue`` (one queue
    per cluster, and every broker key under ``key_prefix``, so clusters never share work)."""

    broker_url: str
    result_backend: str
    queue: str
    key_prefix: str
    workers: int = 2
    concurrency: int = 2

    def worker_names(self) -> list[str]:
        return [f"worker-{n}" for n in range(1, self.workers + 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_sqlite_template(auth_manager: str = "") -> Path:
    """Where a freshly migrated SQLite metadata DB is kept, named after the installed Airflow
    and providers and the auth manager (which may add tables of its own): another version gets
    a DB of its own."""
    from importlib import metadata

    versions = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith(("apache-airflow", "apache_airflow"))
    )
    key = hashlib.sha256("\n".join([*versions, auth_manager]).encode()).hexdigest()[:16]
    return REPO / ".airflow" / "migrated" / f"airflow-{key}.db"


class AirflowCommandError(RuntimeError):
    """An ``airflow`` command failed; the message holds the end of its stderr."""


class AirflowCluster:
    def __init__(
        self,
        home: Path,
        env: Mapping[str, str],
        components: tuple[str, ...] = COMPONENTS,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        metadata_url: str | None = None,
        celery: Celery | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA file): the API server serves HTTPS with them, and
        task processes trust the CA for the execution API. ``metadata_url``: Airflow's
        metadata DB (a PostgreSQL SQLAlchemy URL; SQLite in ``home`` when None). ``celery``:
        the CeleryExecutor and its workers instead of the LocalExecutor."""
        self.home = home
        self.metadata_url = metadata_url or f"sqlite:///{home / 'airflow.db'}"
        self.celery = celery
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.ca = str(tls[2]) if tls else None
        self.components = components + tuple(f"celery-{name}" for name in (celery.worker_names() if celery else ()))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
        self.env = {
            **base,
            "PATH": f"{Path(sys.executable).parent}:{base.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if celery else "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.scheme}://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The DAG files do not change while a cluster runs: each is parsed when found (within
            # REFRESH_INTERVAL) and again only every 30 s, not every 5 s (4 files, each parse a
            # process of its own and a metadata write, a steady load beside the tasks under test).
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            # As docker-compose.yml: an idle scheduler looks again after 0.25 s, not 1 s (a
            # webhook's DAG run is created, and the previous one seen finished, that much sooner).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **env,
        }
        # Bytecode cached, as on any deployed worker (an image's packages are compiled, or the
        # first import writes __pycache__): with PYTHONDONTWRITEBYTECODE, set on these machines,
        # every task process compiled pandas, pyarrow and our engine from source again (2-5 s
        # of each webhook's sync). One cache for every cluster; Python checks each file's mtime.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.setdefault("PYTHONPYCACHEPREFIX", str(REPO / ".airflow" / "pycache"))
        if self.metadata_url.startswith("sqlite"):
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = f"{__name__}.SQLITE_CONNECT_ARGS"
        if celery:
            self.env |= {
                "AIRFLOW__CELERY__BROKER_URL": celery.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": celery.result_backend,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(celery.concurrency),
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": celery.key_prefix,
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": celery.queue,
            }
        if tls:
            cert, key, ca = tls
            self.env |= {
                "AIRFLOW__API__SSL_CERT": str(cert),
                "AIRFLOW__API__SSL_KEY": str(key),
                "AIRFLOW__API__SSL_CA_FILE": str(ca),
            }

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # -- processes ---------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300, attempts: int = 3) -> subprocess.CompletedProcess:
        """``airflow <args>``; a command that fails because SQLite was locked by the running
        components is tried again (up to ``attempts`` times); any other failure raises with the
        command's stderr."""
        for attempt in range(1, attempts + 1):
            done = subprocess.run(
                [sys.executable, "-m", "airflow", *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if done.returncode == 0:
                return done
            if "database is locked" not in done.stderr or attempt == attempts:
                raise AirflowCommandError(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
            time.sleep(2 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def start(self) -> AirflowCluster:
        self.migrate()
        for name in self.components:
            self.start_component(name)
        if "api-server" in self.components:
            self.wait_for(lambda: self._healthy(), 180, "the API server to answer")
        return self

    def migrate(self) -> None:
        """Airflow's metadata DB, migrated: on SQLite, a copy of a freshly migrated DB cached
        under ``.airflow/`` for this Airflow and its providers (a ``db migrate`` from nothing
        costs 10-20 s of CPU; a test suite starts several clusters); ``db migrate`` otherwise."""
        self.home.mkdir(parents=True, exist_ok=True)
        db = self.home / "airflow.db"
        if not self.metadata_url.startswith("sqlite") or db.exists():
            self.cli("db", "migrate", timeout=600)
            return
        template = migrated_sqlite_template(self.env.get("AIRFLOW__CORE__AUTH_MANAGER", ""))
        if not template.exists():
            scratch = template.with_name(f"{template.stem}.{os.getpid()}.tmp")
            scratch.mkdir(parents=True, exist_ok=True)
            env = self.env | {
                "AIRFLOW_HOME": str(scratch),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{scratch / 'airflow.db'}",
            }
            done = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode:
                shutil.rmtree(scratch, ignore_errors=True)
                raise AirflowCommandError(f"airflow db migrate exited {done.returncode}:\n{done.stderr[-3000:]}")
            os.replace(scratch / "airflow.db", template)  # atomic: a concurrent start copies a whole file
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.copyfile(template, db)
        # The first airflow command writes $AIRFLOW_HOME/airflow.cfg with the secrets it generates
        # (the execution API's JWT secret among them): one command now, not the components at once,
        # which would each write their own and refuse each other's tokens ("Invalid auth token").
        self.cli("config", "get-value", "core", "executor")

    def start_component(self, name: str) -> None:
        """Start one component: ``api-server``, ``scheduler``, ... or ``celery-worker-N``."""
        self.logs[name] = self.home / f"{name}.log"
        args, env = [name], self.env
        if name.startswith("celery-"):
            assert self.celery is not None, f"{name} needs the CeleryExecutor"
            worker = name.removeprefix("celery-")
            args = ["celery", "worker", "--celery-hostname", f"{worker}@%h", "--queues", self.celery.queue]
            args += ["--concurrency", str(self.celery.concurrency), "--skip-serve-logs", "--without-gossip"]
            env = self.env | {WORKER_HOSTNAME_ENV: worker}
        with open(self.logs[name], "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill_component(self, name: str) -> None:
        """SIGKILL one component's whole process group (a worker and the tasks it runs), as a
        machine that dies would; the cluster then runs on without it."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_component(self, name: str, timeout: float = 30) -> None:
        """Stop one component (its whole process group), e.g. to show what survives a scheduler outage."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def _healthy(self) -> bool:
        try:
            resp = requests.get(f"{self.url}/api/v2/monitor/health", timeout=2, verify=self.ca or True)
            return resp.status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        if hasattr(self, "_engine"):
            self._engine.dispose()

    def __enter__(self) -> AirflowCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tail(self, lines: int = 60) -> str:
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def wait_for(self, condition, timeout: float, what: str, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"airflow {name} exited ({proc.returncode})\n{self.tail()}")
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.tail()}")

    # -- the metadata DB (read-only peeks) ---------------------------------------------------------------
    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Rows of ``sql`` (``?`` placeholders) from Airflow's metadata DB, SQLite or PostgreSQL."""
        if self.metadata_url.startswith("sqlite"):
            with sqlite3.connect(f"file:{self.home / 'airflow.db'}?mode=ro", uri=True, timeout=30) as db:
                return db.execute(sql, params).fetchall()
        import sqlalchemy as sa

        if not hasattr(self, "_engine"):
            self._engine = sa.create_engine(self.metadata_url, pool_size=1)
        names = {f"p{n}": value for n, value in enumerate(params)}
        parts = sql.split("?")
        text = "".join(part + (f":p{n}" if n < len(params) else "") for n, part in enumerate(parts))
        with self._engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(text), names)]

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "select run_id, run_type, state, data_interval_start, data_interval_end from dag_run where dag_id = ?"
            " order by id",
            dag_id,
        )
        keys = ("run_id", "run_type", "state", "data_interval_start", "data_interval_end")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def dag_serialized(self, dag_id: str) -> bool:
        return bool(self.query("select 1 from serialized_dag where dag_id = ?", dag_id))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Each task instance of a run: task id, state, try number and the hostname it ran on."""
        rows = self.query(
            "select task_id, state, try_number, hostname from task_instance where dag_id = ? and run_id = ?"
            " order by task_id",
            dag_id,
            run_id,
        )
        return [dict(zip(("task_id", "state", "try_number", "hostname"), row, strict=True)) for row in rows]

    # -- the REST API (as an admin) -----------------------------------------------------------------------
    def admin_token(self) -> str | None:
        """A JWT for Airflow's REST API: the simple auth manager's ``GET /auth/token`` when every
        user is an admin (the default here); None for a cluster with real users."""
        if self.env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "").lower() != "true":
            return None
        resp = requests.get(f"{self.url}/auth/token", timeout=60, verify=self.ca or True)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response | None:
        """``/api/v2<path>`` as an admin (raising on an error status), or None when the cluster
        has no API server or no admin token, or keeps its metadata in SQLite: then the caller
        uses the CLI. A request costs milliseconds; an ``airflow`` CLI command starts an
        interpreter and imports Airflow (some 3 s of CPU on these machines). On SQLite, though,
        the API server's writes can deadlock with its own execution API's (a ``POST dagRuns``
        beside a task's start: both waited out SQLite's 60 s lock timeout), where the CLI's
        write is tried again on "database is locked"."""
        if self.metadata_url.startswith("sqlite") or "api-server" not in self.components:
            return None
        if (token := self.admin_token()) is None:
            return None
        headers = {"Authorization": f"Bearer {token}"}
        resp = requests.request(
            method, f"{self.url}/api/v2{path}", headers=headers, timeout=60, verify=self.ca or True, **kwargs
        )
        if not resp.ok:
            raise AirflowCommandError(f"{method} /api/v2{path}: HTTP {resp.status_code} {resp.text[:2000]}")
        return resp

    def set_connection(self, conn_id: str, conn: Mapping[str, Any]) -> None:
        """Add or replace connection ``conn_id`` in the metadata DB, as one made in the UI (``conn``:
        as ``--conn-json`` takes it, ``extra`` a dict)."""
        body = {
            k: conn[k] for k in ("conn_type", "description", "host", "login", "schema", "port", "password") if k in conn
        }
        body |= {"connection_id": conn_id, "extra": json.dumps(conn.get("extra") or {})}
        try:
            created = self.api("POST", "/connections", json=body)
        except AirflowCommandError as exc:
            if "HTTP 409" not in str(exc):
                raise
            created = self.api("PATCH", f"/connections/{conn_id}", json=body)
        if created is None:
            if self._has_connection(conn_id):
                self.cli("connections", "delete", conn_id)
            self.cli("connections", "add", conn_id, "--conn-json", json.dumps(dict(conn)))

    def _has_connection(self, conn_id: str) -> bool:
        return bool(self.query("select 1 from connection where conn_id = ?", conn_id))

    def unpause(self, dag_id: str) -> None:
        if self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}) is None:
            self.cli("dags", "unpause", dag_id)

    # -- DAG runs ----------------------------------------------------------------------------------------
    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """A manual run with a fresh run id (returned), through the REST API as ``airflow dags
        trigger`` makes it (no logical date), or that command when there is no API to use."""
        self._triggered = getattr(self, "_triggered", 0) + 1
        run_id = f"manual__test_{self._triggered}_{datetime.now(UTC):%H%M%S%f}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        if self.api("POST", f"/dags/{dag_id}/dagRuns", json=body) is not None:
            return run_id
        args = ["dags", "trigger", dag_id, "--run-id", run_id]
        if conf is not None:
            args += ["--conf", json.dumps(conf)]
        self.cli(*args)
        return run_id

    def run(self, dag_id: str, run_id: str) -> dict | None:
        """The run (id, type, state, note, start date), or None while it does not exist."""
        rows = self.query(
            "select r.run_id, r.run_type, r.state, n.content, r.start_date from dag_run r"
            " left join dag_run_note n on n.dag_run_id = r.id where r.dag_id = ? and r.run_id = ?",
            dag_id,
            run_id,
        )
        if not rows:
            return None
        keys = ("run_id", "run_type", "state", "note", "start_date")
        return dict(zip(keys, rows[0], strict=True))

    def finished(self, dag_id: str, run_id: str, timeout: float = 240) -> dict:
        """Wait until the run has ended and its note is written; returns the run."""

        def done() -> dict | None:
            run = self.run(dag_id, run_id)
            return run if run and run["state"] in FINISHED and run["note"] else None

        return self.wait_for(done, timeout, f"{dag_id} {run_id} to finish with its note", interval=1)

    def failed_tasks(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {
            t["task_id"]: t["state"]
            for t in self.task_instances(dag_id, run_id)
            if t["state"] in ("failed", "upstream_failed")
        }
