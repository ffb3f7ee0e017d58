"""Real Airflow components as child processes: API server, scheduler, DAG processor and
triggerer (LocalExecutor, SQLite), in their own AIRFLOW_HOME, for end-to-end tests and the demo.

What needs the scheduler itself (backfills, the event-driven DAG, the webhook route on the
API server) uses this; everything else runs DAGs with ``dag.test()``. Every process is
started in its own process group, the API server on 127.0.0.1 with a free port, and all
are stopped (group-wide) on exit. With ``tls`` the API server serves HTTPS, as Partner
Center's webhook deliveries require.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]  # the checkout: dags/ and plugins/ live there
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ) -> None:
        """``tls``: (certificate, key, CA file): the API server serves HTTPS with them, and
        task processes trust the CA for the execution API."""
        self.home = home
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.ca = str(tls[2]) if tls else None
        self.components = components
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
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.scheme}://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **env,
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
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("db", "migrate", timeout=600)
        for name in self.components:
            self.start_component(name)
        if "api-server" in self.components:
            self.wait_for(lambda: self._healthy(), 180, "the API server to answer")
        return self

    def start_component(self, name: str) -> None:
        self.logs[name] = self.home / f"{name}.log"
        with open(self.logs[name], "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", name],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

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
        with sqlite3.connect(f"file:{self.home / 'airflow.db'}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(sql, params).fetchall()

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
