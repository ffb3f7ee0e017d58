"""``make airflow`` for real: the sandbox and ``airflow standalone`` on chosen ports, started fresh.

One start of ``make airflow`` (in its own process group, AIRFLOW_HOME and COSELL_SANDBOX_HOME
in tmp_path, AIRFLOW_PORT and COSELL_SANDBOX_PORT free ports) over the leftovers of a
"previous start". Then: the printed login and first steps; the previous state is gone and a
user's file kept; ``.airflow/env.sh`` is 0600 and makes the ``airflow`` CLI see the four DAGs
from a clean shell; a Microsoft-side edit is delivered to the receiver on the chosen port and
synced by ``cosell_referral_events`` (a task that reaches the execution API on that port);
SIGTERM to the group stops every process and frees every port. Plus the two refusals that
happen before anything starts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cosell_sandbox.airflow_cluster import free_port
from cosell_sandbox.standalone import MARKER, port_free

REPO = Path(__file__).resolve().parents[2]
# Real Airflow components: `make test` runs the tests of one lane ("airflow-cluster-b", with the Celery and
# the scheduler tests; lane a holds the shared cluster's tests and the backfill's) one after another on one
# xdist worker, so at most two clusters (one per lane) run at once, beside the rest of the suite.
pytestmark = pytest.mark.xdist_group("airflow-cluster-b")
DAG_IDS = {
    "cosell_sync_dynamics365",
    "cosell_sync_salesforce",
    "cosell_referral_events",
    "partner_center_webhook_registration",
}
PLANTED_SECRET = "planted-by-a-previous-start"


def free_base_port(count: int = 4) -> int:
    """A base port with ``count`` consecutive free ports (the sandbox's emulators)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        if all(port_free(p) for p in range(base, base + count)):
            return base
    raise AssertionError("no run of free ports")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without what conftest and the user's shell set for Airflow."""
    drop = ("AIRFLOW_", "AIRFLOW__", "COSELL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def processes_mentioning(text: str) -> list[str]:
    """Live processes (zombies aside) whose command line or environment mentions ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if text.encode() in cmd or text.encode() in environ:
            state, ppid, pgid, sid = stat[stat.rfind(")") + 2 :].split()[:4]
            command = cmd.replace(b"\0", b" ").decode(errors="replace")[:150]
            found.append(f"pid {entry} ppid {ppid} pgid {pgid} sid {sid} {state}: {command}")
    return found


def wait(what: str, condition, timeout: float, proc: subprocess.Popen, out: Path, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"make airflow exited ({proc.returncode}) while waiting for {what}:\n{out.read_text()}"
            )
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{out.read_text()}")


def plant_previous_start(home: Path, sandbox_home: Path) -> None:
    """What a previous start leaves behind (its own airflow.db would be an SQLite file; a
    non-DB one makes `airflow db migrate` fail if it is kept)."""
    (home / "cosell" / "staging" / "run=old").mkdir(parents=True)
    (home / "cosell" / "staging" / "run=old" / "frame.parquet").write_bytes(b"old frame")
    (home / "cosell" / "refresh_tokens.json").write_text(json.dumps({"old": PLANTED_SECRET}))
    (home / "airflow.db").write_bytes(b"the previous start's metadata DB")
    (home / "cosell_state.db").write_bytes(PLANTED_SECRET.encode())  # links and watermarks, say
    (home / "logs" / "dag_id=old").mkdir(parents=True)
    (home / MARKER).write_text("")
    (home / "my-notes.txt").write_text("a user's file: kept")
    sandbox_home.mkdir(parents=True)
    creds = {
        "tenant_id": "t",
        "client_id": "c",
        "client_secret": PLANTED_SECRET,
        "username": "u",
        "password": "p",
        "refresh_token": "r",
    }
    (sandbox_home / "state.json").write_text(json.dumps({"credentials": creds, "env": {}, "origins": {}}))


def airflow_cli(env_sh: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``airflow`` CLI in a clean shell that only sources env.sh (from the repo)."""
    return subprocess.run(
        ["bash", "-c", f'source "{env_sh}" && airflow "$@"', "airflow", *args],
        cwd=REPO,
        env={"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def json_output(result: subprocess.CompletedProcess) -> list[dict]:
    """The JSON a CLI command printed (warnings may come before it on stdout)."""
    assert result.returncode == 0, result.stdout + result.stderr
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("[")), None)
    assert line is not None, result.stdout + result.stderr
    return json.loads(line)


def event_runs(home: Path) -> list[tuple[str, str]]:
    try:
        with sqlite3.connect(f"file:{home / 'airflow.db'}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(
                "select run_id, state from dag_run where dag_id = 'cosell_referral_events' order by id"
            ).fetchall()
    except sqlite3.Error:
        return []


@pytest.mark.timeout(300)
def test_make_airflow_starts_fresh_prints_login_writes_env_sh_and_stops_cleanly(tmp_path):
    began = time.monotonic()
    home, sandbox_home = tmp_path / "airflow", tmp_path / "sandbox"
    plant_previous_start(home, sandbox_home)
    port, sandbox_port = free_port(), free_base_port()
    out = tmp_path / "make-airflow.out"
    env = clean_env(
        AIRFLOW_HOME=str(home),
        COSELL_SANDBOX_HOME=str(sandbox_home),
        AIRFLOW_PORT=str(port),
        COSELL_SANDBOX_PORT=str(sandbox_port),
    )
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "airflow"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait("the banner", lambda: "Stop: Ctrl-C" in out.read_text(), 240, proc, out)
        booted = time.monotonic() - began
        text = out.read_text()
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/api/v2/monitor/health", timeout=10).status_code == 200

        # How to log in (it is off), and the first steps.
        assert f"Airflow is ready: {url}" in text, text
        assert "Login: none" in text and "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True" in text, text
        assert "every visitor is admin" in text, text
        for words in ("start paused", "dry_run ticked", "initial load", "Unpause cosell_referral_events"):
            assert words in text, (words, text)
        assert f"source {home / 'env.sh'}" in text, text
        assert ":8080" not in text, text  # the chosen port everywhere

        # A fresh start, said once with its reason; a user's file and airflow.cfg stay.
        fresh = [line for line in text.splitlines() if line.startswith("# fresh start")]
        assert len(fresh) == 1 and "in memory" in fresh[0], text
        assert not (home / "cosell" / "staging" / "run=old").exists()
        for path in (home / "cosell" / "refresh_tokens.json", home / "cosell_state.db"):  # may be made anew
            assert not path.exists() or PLANTED_SECRET.encode() not in path.read_bytes(), path
        assert (home / "airflow.db").read_bytes()[:16] == b"SQLite format 3\x00"  # migrated anew
        assert not (home / "logs" / "dag_id=old").exists()
        assert (home / "my-notes.txt").read_text() == "a user's file: kept"
        state = json.loads((sandbox_home / "state.json").read_text())
        assert state["credentials"]["client_secret"] != PLANTED_SECRET  # not reused from the old state

        # env.sh: private, absolute, and enough for the CLI from a clean shell.
        env_sh = home / "env.sh"
        assert env_sh.stat().st_mode & 0o777 == 0o600
        sh = env_sh.read_text()
        assert PLANTED_SECRET not in sh and state["credentials"]["client_secret"] in sh
        assert f"export AIRFLOW_HOME={home}\n" in sh and f"export AIRFLOW__API__PORT={port}\n" in sh
        assert f"export PATH={Path(sys.prefix) / 'bin'}:" in sh
        dags = json_output(airflow_cli(env_sh, "dags", "list", "-o", "json"))
        assert {d["dag_id"] for d in dags} >= DAG_IDS, dags
        assert all(d["is_paused"] in (True, "True") for d in dags if d["dag_id"] in DAG_IDS), dags

        # The receiver registered on the chosen port gets a Microsoft-side edit, and the
        # event DAG's task (through the execution API on that port) syncs it.
        unpaused = airflow_cli(env_sh, "dags", "unpause", "cosell_referral_events")
        assert unpaused.returncode == 0, unpaused.stdout + unpaused.stderr
        ca, pc = state["ca_bundle"], state["origins"]["partner_center"]
        referrals = requests.get(f"{pc}/_sandbox/referrals", verify=ca, timeout=30).json()["value"]
        rid = next(r["id"] for r in referrals if r["direction"] == "Incoming" and r["status"] in ("New", "Active"))
        edit = {"action": "update", "changes": {"details": {"dealValue": 12345}}}
        requests.post(
            f"{pc}/_sandbox/referrals/{rid}/microsoft-edit", json=edit, verify=ca, timeout=30
        ).raise_for_status()

        def delivered():
            value = requests.get(f"{pc}/_sandbox/webhooks/deliveries", verify=ca, timeout=30).json()["value"]
            return [d for d in value if d["state"] == "delivered" and d["payload"]["ResourceUri"].endswith(rid)]

        deliveries = wait("the webhook delivery", delivered, 30, proc, out)
        assert deliveries[0]["url"] == f"{url}/cosell/webhooks/partner-center"

        def event_run_done():
            runs = event_runs(home)
            return runs if runs and runs[-1][1] in ("success", "failed") else None

        runs = wait("the cosell_referral_events run", event_run_done, 120, proc, out)
        assert runs[-1][1] == "success", (runs, (home / "logs" / "standalone.log").read_text()[-5000:])
        ready_checked = time.monotonic() - began
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        stopping = time.monotonic()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # Every process is gone, every port free, within the stop timeout.
    leftovers = processes_mentioning(str(tmp_path))
    deadline = time.monotonic() + 40
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = processes_mentioning(str(tmp_path))
    stopped = time.monotonic() - stopping
    assert not leftovers, leftovers
    busy = [p for p in (port, *range(sandbox_port, sandbox_port + 4)) if not port_free(p)]
    assert not busy, busy
    assert "# stopping Airflow and the sandbox" in out.read_text()
    print(
        f"make airflow: banner after {booted:.0f} s, checks done at {ready_checked:.0f} s, stopped in {stopped:.0f} s"
    )


def run_standalone(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cosell_sandbox.standalone"],
        cwd=REPO,
        env=clean_env(COSELL_SANDBOX_HOME=str(tmp_path / "sandbox"), **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(60)
def test_refuses_to_reset_an_airflow_home_it_did_not_make(tmp_path):
    home = tmp_path / "my-airflow"
    home.mkdir()
    (home / "airflow.db").write_bytes(b"someone's own Airflow")
    port, base = free_port(), free_base_port()
    result = run_standalone(tmp_path, AIRFLOW_HOME=str(home), AIRFLOW_PORT=str(port), COSELL_SANDBOX_PORT=str(base))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not made by `make airflow`" in result.stderr and "unset AIRFLOW_HOME" in result.stderr
    assert (home / "airflow.db").read_bytes() == b"someone's own Airflow"
    assert not (tmp_path / "sandbox" / "state.json").exists()  # nothing started


@pytest.mark.timeout(60)
def test_a_busy_port_is_named_before_anything_starts(tmp_path):
    home = tmp_path / "airflow"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_standalone(
            tmp_path, AIRFLOW_HOME=str(home), AIRFLOW_PORT=str(port), COSELL_SANDBOX_PORT=str(free_base_port())
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "AIRFLOW_PORT=" in result.stderr
    assert not home.exists()  # checked before the fresh start removes anything
