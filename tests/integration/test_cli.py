"""`cosell-sandbox serve` prints connection lines that the hook can use unchanged."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


def _exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.fixture
def served(tmp_path: Path):
    home = tmp_path / "sandbox"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cosell_sandbox.cli", "serve", "--home", str(home), "--seed-referrals", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "# ready":
            break
    try:
        assert lines and lines[-1].strip() == "# ready", "".join(lines) + (proc.stderr.read() if proc.poll() else "")
        yield home, "".join(lines)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_serve_prints_connection_lines_the_hook_uses_unchanged(served, tmp_path):
    home, output = served
    env = _exports(output)
    assert set(env) == {
        "AIRFLOW_CONN_PARTNER_CENTER_DEFAULT",
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT",
        "AIRFLOW_CONN_SALESFORCE_DEFAULT",
        "AIRFLOW__COSELL__WEBHOOK_CERTIFICATE_HOSTS",
        "AIRFLOW__COSELL__WEBHOOK_RESOURCE_HOSTS",
        "AIRFLOW__COSELL__WEBHOOK_TRUST_ROOTS",
        "AIRFLOW__COSELL__WEBHOOK_ISSUER_ORGANIZATION",
        "AIRFLOW__COSELL__WEBHOOK_CA_BUNDLE",
    }
    assert env["AIRFLOW__COSELL__WEBHOOK_CERTIFICATE_HOSTS"] == "127.0.0.1"
    assert env["AIRFLOW__COSELL__WEBHOOK_RESOURCE_HOSTS"] == "127.0.0.1"
    assert env["AIRFLOW__COSELL__WEBHOOK_TRUST_ROOTS"] == str(home / "pki" / "ca.pem")

    script = textwrap.dedent(
        """
        from cosell_sync.hooks.dynamics365 import DynamicsHook
        from cosell_sync.hooks.partner_center import PartnerCenterHook
        from cosell_sync.hooks.salesforce import SalesforceSyncHook
        hook = PartnerCenterHook()
        print(len(list(hook.list_referrals())), "referral-updated" in hook.list_webhook_events(),
              bool(DynamicsHook().whoami()["UserId"]),
              SalesforceSyncHook().conn.query("SELECT COUNT() FROM Opportunity")["totalSize"] == 0)
        """
    )
    child_env = {**os.environ, **env, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    result = subprocess.run([sys.executable, "-c", script], env=child_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].split() == ["120", "True", "True", "True"], result.stdout

    again = subprocess.run(
        [sys.executable, "-m", "cosell_sandbox.cli", "env", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0
    assert _exports(again.stdout) == env


def test_env_without_a_sandbox_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cosell_sandbox.cli", "env", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cosell-sandbox serve" in result.stderr
