"""``make airflow``: the sandbox plus ``airflow standalone``, set up and started fresh together.

1. Checks that the ports are free (``AIRFLOW_PORT``, default 8080, for Airflow's API server and
   UI; ``COSELL_SANDBOX_PORT``, default 47400, and the next three for the emulators).
2. Starts fresh: the sandbox keeps its data in memory and seeds 200 new referrals on every
   start, so Airflow's metadata DB and our state (links, watermarks, inbox, staging, rotated
   refresh tokens) from a previous start would point at records that no longer exist. Both
   are removed, with the sandbox's saved credentials; its CA (``pki/``) and any other file
   (``airflow.cfg`` included) are kept.
3. Starts ``cosell-sandbox serve``, writes ``$AIRFLOW_HOME/env.sh`` (mode 0600: it holds the
   sandbox's connection secrets) so that ``source .airflow/env.sh`` points the ``airflow`` CLI
   at this instance, registers the webhook receiver on the API server with the sandbox, and
   runs ``airflow standalone`` in its own process group (its output goes to
   ``$AIRFLOW_HOME/logs/standalone.log``).
4. Once the API server answers and the DAG files are parsed, prints the UI URL, that login is
   off, and the first steps.
5. Ctrl-C or SIGTERM stops every process of Airflow's session (its process group, and the
   running tasks, which sit in process groups of their own), then the sandbox (by PID).

Run as ``python -m cosell_sandbox.standalone`` (``scripts/airflow_standalone.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[2]  # the checkout: dags/ and plugins/ live there
SEED_REFERRALS = 200
SANDBOX_PORTS = 4  # Sandbox.EMULATORS, one port each from the base port
MARKER = ".cosell-make-airflow"  # in AIRFLOW_HOME: this directory is ours to reset
WEBHOOK_PATH = "/cosell/webhooks/partner-center"
SYNC_DAGS = ("cosell_sync_salesforce", "cosell_sync_dynamics365")
EVENTS_DAG = "cosell_referral_events"
# What a previous start left that refers to the previous sandbox's records.
AIRFLOW_STATE = ("airflow.db", "cosell_state.db", "cosell", "logs", "env.sh")
SANDBOX_STATE = ("state.json", "state.tmp", "serve.log")
REGISTER = """
import sys
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook
hook = PartnerCenterHook()
if hook.get_webhook_registration() is None:
    hook.create_webhook_registration(sys.argv[1], REFERRAL_EVENTS)
else:
    hook.update_webhook_registration(sys.argv[1], REFERRAL_EVENTS)
"""


class StartError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


class Stop(Exception):
    """Ctrl-C or SIGTERM."""


def say(message: str = "") -> None:
    print(message, flush=True)


def show(path: Path) -> str:
    """A path as the user typed it: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- settings ------------------------------------------------------------------------------------------
class Settings:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.port = _port(environ, "AIRFLOW_PORT", 8080)
        self.sandbox_port = _port(environ, "COSELL_SANDBOX_PORT", 47400)
        self.home = Path(environ.get("AIRFLOW_HOME") or REPO / ".airflow").resolve()
        self.sandbox_home = Path(environ.get("COSELL_SANDBOX_HOME") or REPO / ".sandbox").resolve()
        self.bin = Path(sys.prefix) / "bin"  # the repo's .venv/bin: `airflow`, `cosell-sandbox`, `python`
        self.dags = Path(environ.get("AIRFLOW__CORE__DAGS_FOLDER") or REPO / "dags").resolve()
        self.plugins = Path(environ.get("AIRFLOW__CORE__PLUGINS_FOLDER") or REPO / "plugins").resolve()
        self.load_examples = environ.get("AIRFLOW__CORE__LOAD_EXAMPLES") or "False"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "logs" / "standalone.log"

    @property
    def env_sh(self) -> Path:
        return self.home / "env.sh"

    def airflow_env(self, sandbox_env: Mapping[str, str]) -> dict[str, str]:
        """Everything env.sh exports, PATH aside (added by :meth:`process_env` and as ``$PATH`` there)."""
        return {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins),
            "AIRFLOW__CORE__LOAD_EXAMPLES": self.load_examples,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            # Tasks reach the API server here; Airflow's default assumes port 8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # Login is off: every visitor is admin. This is a sandbox on 127.0.0.1.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "COSELL_SANDBOX_HOME": str(self.sandbox_home),
            **sandbox_env,
        }

    def process_env(self, sandbox_env: Mapping[str, str]) -> dict[str, str]:
        env = {**os.environ, **self.airflow_env(sandbox_env)}
        env["PATH"] = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"  # standalone runs `airflow <component>`
        env["PYTHONUNBUFFERED"] = "1"  # the log file fills as it happens
        return env


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name) or str(default)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise StartError(f"{name}={value!r} is not a port number")
    return int(value)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def check_ports(settings: Settings) -> None:
    if not port_free(settings.port):
        raise StartError(
            f"port {settings.port} on 127.0.0.1 is in use (another `make airflow`?); "
            f"stop it, or choose another port: make airflow AIRFLOW_PORT=8081"
        )
    busy = [p for p in range(settings.sandbox_port, settings.sandbox_port + SANDBOX_PORTS) if not port_free(p)]
    if busy:
        raise StartError(
            f"the sandbox's ports {settings.sandbox_port}-{settings.sandbox_port + SANDBOX_PORTS - 1} are not all "
            f"free (in use: {', '.join(map(str, busy))}); stop what uses them, or choose another base port: "
            f"make airflow COSELL_SANDBOX_PORT=47500"
        )


# -- a fresh start ---------------------------------------------------------------------------------------
def start_fresh(settings: Settings) -> None:
    """Remove what a previous start left (see :data:`AIRFLOW_STATE`, :data:`SANDBOX_STATE`).

    AIRFLOW_HOME may come from the user's environment (the Makefile only defaults it), so a
    directory that holds an Airflow or cosell DB is reset only if it is the repo's ``.airflow``
    or carries our marker: never someone's own Airflow home.
    """
    home = settings.home
    ours = home == REPO / ".airflow" or (home / MARKER).exists()
    found = [name for name in ("airflow.db", "cosell_state.db", "cosell") if (home / name).exists()]
    if found and not ours:
        raise StartError(
            f"AIRFLOW_HOME={home} holds {', '.join(found)}, not made by `make airflow`. `make airflow` starts "
            f"fresh on every start and would delete them: unset AIRFLOW_HOME (the default is "
            f"{REPO / '.airflow'}) or point it to a new directory."
        )
    for base, names in ((home, AIRFLOW_STATE), (settings.sandbox_home, SANDBOX_STATE)):
        for name in names:
            for path in (base / name, *(base / f"{name}{s}" for s in ("-journal", "-wal", "-shm"))):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    settings.sandbox_home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text(
        "`make airflow` resets this directory's Airflow DB and cosell state on every start (the sandbox's data\n"
        "lives in memory and is re-seeded). airflow.cfg and other files are kept.\n"
    )
    say(
        f"# fresh start: removed the previous Airflow DB, run logs and cosell state in {show(home)} and the sandbox's "
        f"saved state in {show(settings.sandbox_home)}, because the sandbox keeps its data in memory and "
        f"re-seeds it on every start (old links and watermarks would point at records that no longer exist)"
    )


# -- env.sh ----------------------------------------------------------------------------------------------
def write_env_sh(settings: Settings, sandbox_env: Mapping[str, str]) -> Path:
    lines = [
        "# Written by `make airflow` on every start: `source .airflow/env.sh` points the airflow CLI (and",
        "# cosell-sandbox) at that instance. It holds the sandbox's connection secrets (sandbox-only values).",
        *(f"export {key}={shlex.quote(value)}" for key, value in settings.airflow_env(sandbox_env).items()),
        f'export PATH={shlex.quote(str(settings.bin))}:"$PATH"',
        "",
    ]
    path = settings.env_sh
    tmp = path.with_name(".env.sh.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines))
    tmp.replace(path)
    return path


# -- processes -------------------------------------------------------------------------------------------
def wait_for(what: str, condition: Callable[[], Any], timeout: float, alive: Callable[[], None]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise StartError(f"timed out after {timeout:.0f} s waiting for {what}")


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    return "\n".join(text)


def health(url: str) -> dict[str, Any] | None:
    try:
        with urlopen(f"{url}/api/v2/monitor/health", timeout=2) as resp:  # noqa: S310 - our own http://127.0.0.1
            return json.loads(resp.read()) if resp.status == 200 else None
    except (URLError, OSError, ValueError):
        return None


def parsed_dag_files(settings: Settings) -> tuple[set[str], list[str]]:
    """(names of the DAG files the DAG processor has parsed, the import errors it recorded)."""
    db = settings.home / "airflow.db"
    if not db.exists():
        return set(), []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            dags = conn.execute("select relative_fileloc from dag where not is_stale").fetchall()
            errors = conn.execute("select filename, stacktrace from import_error").fetchall()
    except sqlite3.Error:
        return set(), []
    files = {Path(row[0]).name for row in dags if row[0]} | {Path(row[0]).name for row in errors if row[0]}
    return files, [f"{name}: {((trace or '').strip().splitlines() or [''])[-1]}" for name, trace in errors]


def _words(path: Path) -> list[str]:
    text = path.read_text(errors="replace").lower()
    return [word for word in ("airflow", "dag") if word in text]


def session_members(sid: int) -> list[int] | None:
    """The live processes (zombies aside) of session ``sid``; None where there is no ``/proc``.

    ``airflow standalone`` runs in a session of its own; its components share its process
    group, but the Task SDK moves every running task into a process group of its own (same
    session), so stopping the group alone would leave running tasks behind.
    """
    if not Path("/proc/self/stat").exists():
        return None
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def signal_session(sid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, sig)
    for pid in session_members(sid) or ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def session_alive(sid: int) -> bool:
    members = session_members(sid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(sid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM every process of the session ``proc`` leads, wait until all are gone, SIGKILL stragglers."""
    deadline = time.monotonic() + timeout
    signal_session(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    while session_alive(proc.pid):
        if time.monotonic() > deadline:
            signal_session(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Standalone:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.sandbox: subprocess.Popen | None = None
        self.airflow: subprocess.Popen | None = None
        self.register: subprocess.Popen | None = None

    def alive(self) -> None:
        if self.sandbox is not None and self.sandbox.poll() is not None:
            log = self.s.sandbox_home / "serve.log"
            raise StartError(f"the sandbox exited ({self.sandbox.returncode}); {show(log)}:\n{tail(log)}")
        if self.airflow is not None and self.airflow.poll() is not None:
            raise StartError(
                f"airflow standalone exited ({self.airflow.returncode}); {show(self.s.log)}:\n{tail(self.s.log)}"
            )

    def start_sandbox(self) -> dict[str, Any]:
        s = self.s
        log = s.sandbox_home / "serve.log"
        with open(log, "wb") as out:
            self.sandbox = subprocess.Popen(
                [
                    str(s.bin / "cosell-sandbox"),
                    "serve",
                    "--home",
                    str(s.sandbox_home),
                    "--base-port",
                    str(s.sandbox_port),
                    "--seed-referrals",
                    str(SEED_REFERRALS),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped by us, after Airflow
            )
        wait_for("the sandbox", lambda: "\n# ready" in log.read_text(errors="replace"), 60, self.alive)
        return json.loads((s.sandbox_home / "state.json").read_text())

    def run(self) -> int:
        s = self.s
        check_ports(s)
        start_fresh(s)
        state = self.start_sandbox()
        for name, origin in state["origins"].items():
            say(f"# sandbox {name:<15} {origin}")
        env = s.process_env(state["env"])
        write_env_sh(s, state["env"])
        receiver = f"{s.url}{WEBHOOK_PATH}"  # plain http to the loopback; production needs https
        self.register = register = subprocess.Popen(
            [str(s.bin / "python"), "-c", REGISTER, receiver], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        say(f"# migrating Airflow's metadata DB, then starting airflow standalone ({show(s.log)}); about a minute")
        migrate = subprocess.run(
            [str(s.bin / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, check=False
        )
        if migrate.returncode:
            raise StartError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
        with open(s.log, "ab") as out:
            self.airflow = subprocess.Popen(
                [str(s.bin / "airflow"), "standalone"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: stopping it stops every component and task
            )
        try:
            output, _ = register.communicate(timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise StartError("registering the webhook with the sandbox took over 120 s") from exc
        if register.returncode:
            raise StartError(f"registering the webhook with the sandbox failed:\n{output.decode(errors='replace')}")
        say(f"# webhook registered with the sandbox: {receiver}")
        wait_for(f"Airflow's API server on {s.url}", lambda: health(s.url), 300, self.alive)
        # The files Airflow's safe mode parses (those that mention both "airflow" and "dag").
        expected = {p.name for p in s.dags.glob("*.py") if {"airflow", "dag"} <= set(_words(p))}
        try:
            wait_for(
                "the DAG processor to parse the DAG files", lambda: parsed_dag_files(s)[0] >= expected, 120, self.alive
            )
        except StartError as exc:
            say(f"# {exc}; see {show(s.log)}")
        for error in parsed_dag_files(s)[1]:
            say(f"# DAG import error: {error}")
        say(banner(s, state["origins"].get("partner_center", "")))
        self.watch()
        return 0

    def watch(self) -> None:
        """Until Ctrl-C/SIGTERM; says when the scheduler stops or starts heartbeating."""
        healthy, last = True, 0.0
        while True:
            self.alive()
            if time.monotonic() - last > 15:
                last = time.monotonic()
                status = ((health(self.s.url) or {}).get("scheduler") or {}).get("status")
                if (status == "healthy") != healthy:
                    healthy = not healthy
                    say(
                        "# the scheduler is back"
                        if healthy
                        else f"# the scheduler is not heartbeating; see {show(self.s.log)}"
                    )
            time.sleep(1)

    def stop(self) -> None:
        if self.register is not None:
            stop_process(self.register)
        if self.airflow is not None:
            stop_session(self.airflow)
        if self.sandbox is not None:
            stop_process(self.sandbox)


def banner(s: Settings, partner_center: str) -> str:
    env_sh = show(s.env_sh)
    text = f"""
    ==========================================================================================
     Airflow is ready: {s.url}
     Login: none. Login is off in this sandbox (AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True):
       every visitor is admin. It listens on 127.0.0.1 only.

     First steps:
      1. The sync DAGs start paused. Trigger {SYNC_DAGS[0]} or {SYNC_DAGS[1]} with
         dry_run ticked to preview what a sync would write (it writes nothing; the run's
         note shows the plan).
      2. Then trigger it with dry_run unticked: that first real run does the initial load.
         Scheduled runs only start syncing after it (until then each one skips, noting that
         it waits for the initial load).
      3. Unpause {EVENTS_DAG} for webhook-driven syncs: a Microsoft-side edit
         (POST {partner_center}/_sandbox/referrals/<id>/microsoft-edit) syncs within seconds.

     CLI against this instance, from any shell in the repo:
       source {env_sh}
       airflow dags list
       airflow dags unpause {SYNC_DAGS[0]}      # runs of a paused DAG stay queued
       airflow dags trigger {SYNC_DAGS[0]} --conf '{{"dry_run": true}}'
     Airflow's output: {show(s.log)}     Stop: Ctrl-C (stops Airflow and the sandbox)
    ==========================================================================================
    """
    return textwrap.dedent(text).rstrip()


def main() -> int:
    armed = [True]

    def stop(signum: int, frame: object) -> None:
        # Once only: with Ctrl-C or a group-wide SIGTERM, make forwards the signal too, and a
        # second Stop must not cut the clean-up short.
        if armed[0]:
            armed[0] = False
            raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run: Standalone | None = None
    error: StartError | None = None
    try:
        try:
            run = Standalone(Settings(os.environ))
            run.run()
        except StartError as exc:
            error = exc
    except Stop:
        pass
    finally:
        armed[0] = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if error is not None:
        print(f"make airflow: {error}", file=sys.stderr, flush=True)
    if run is not None:
        say("# stopping Airflow and the sandbox")
        run.stop()
        say("# stopped")
    return 1 if error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
