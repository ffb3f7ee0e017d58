"""Project layout contracts: compose file shape, CI entry point, the sandbox/provider boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_modelled_on_airflows_and_uses_postgres_for_state():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in (
        "postgres",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-init",
    ):
        assert name in services
    for name, service in services.items():
        if name.startswith("airflow-"):
            env = service["environment"]
            assert env["AIRFLOW_CONN_COSELL_STATE"].startswith("postgresql")
            assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
            assert any(v.endswith("/plugins:/opt/airflow/plugins") for v in service["volumes"])
    assert (ROOT / "docker" / "postgres-init.sql").read_text().strip().startswith("CREATE DATABASE cosell_state")


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script and "set -e" in script


def test_provider_never_imports_the_sandbox():
    for path in (ROOT / "plugins" / "cosell_sync").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "cosell_sandbox" for n in names), path
