"""First sync at the API floor (issue 16, SPEC §10): a large initial load through the sandbox,
with latency injected on every API request (token calls included), per CRM.

What it runs: the sandbox is reset and seeded with ``BENCH_TP_REFERRALS`` open referrals on
Partner Center that nothing links yet (the seed's Closed ones are reopened: a Closed
unlinked referral is never imported) and ``BENCH_TP_OPPORTUNITIES`` CRM opportunities, of
which ``BENCH_TP_FLAGGED`` are flagged for co-sell. Every emulator, Entra ID's token service
included, then answers each API request after ``BENCH_TP_LATENCY_MS``. One run of the CRM's
sync DAG follows, task by task in this process, each task building its own hooks and
forgetting the cached tokens first (as the DAG's tasks, each in its own process, do):
``prepare`` (the mapping checked against the org), ``extract_partner_center``,
``extract_crm``, ``plan``, ``load_crm``, ``load_partner_center``, ``commit_state``.

What it reports, per CRM:

* ``task_seconds``: the sum of the tasks' wall times (``tasks``: each one's);
* ``calls``: every API request the emulators served (their control plane left out), token
  service included, per system and per kind (``by_kind``);
* ``floor_calls``: the fewest calls that could have done the same work (SPEC §10), from what
  the run did write, per system and per write kind, as read from the requests themselves:

  - Salesforce: ⌈n/200⌉ sObject Collections calls per write kind (object and operation), or one
    Bulk API 2.0 job above 2,000 records, counted as its :data:`benchmarks.calls.BULK_JOB_CALLS` requests (create,
    upload, close, one status poll, successful and failed results);
  - Dataverse: ⌈n/1000⌉ ``$batch`` or ``*Multiple`` calls per write kind (table and operation);
  - Partner Center: one call per referral written (created, patched, asked of Microsoft);
  - reads: the extracts paged at the maximum page size (Partner Center 100, Dataverse 5,000,
    Salesforce 2,000 a page); lookups and metadata reads are not in the floor;
  - tokens: one grant per API audience the run calls (openid discovery not in the floor);

* ``concurrency``: the most requests each emulator had in flight at once, and 429s served
  (Dataverse allows 52 concurrent requests and 6,000 per 5 minutes).

Sizes: ``BENCH_TP_REFERRALS`` (10000), ``BENCH_TP_OPPORTUNITIES`` (5000), ``BENCH_TP_FLAGGED``
(2000), ``BENCH_TP_LATENCY_MS`` (50); ``BENCH_TP_CRMS`` (``salesforce,dynamics365``);
``BENCH_THROUGHPUT=0`` leaves it out of ``make bench``; ``BENCH_TP_PROFILE=<task>,...`` writes a
cProfile of those tasks next to their output (``<task>.out.prof``), or with ``BENCH_TP_PYSPY=<py-spy
executable>`` a py-spy profile of the threads holding the GIL (``<task>.pyspy``, raw stacks).
Targets: task time <= 60 s per CRM, calls <= 1.05 x the floor. Nothing is asserted.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.calls import floor_table, kind_rows, sf_write_kinds, task_at

REFERRALS = int(os.environ.get("BENCH_TP_REFERRALS", "10000"))
OPPORTUNITIES = int(os.environ.get("BENCH_TP_OPPORTUNITIES", "5000"))
FLAGGED = int(os.environ.get("BENCH_TP_FLAGGED", "2000"))
LATENCY_MS = int(os.environ.get("BENCH_TP_LATENCY_MS", "50"))
CRMS = [c for c in os.environ.get("BENCH_TP_CRMS", "salesforce,dynamics365").split(",") if c]
PROFILE = os.environ.get("BENCH_TP_PROFILE", "").split(",")
PYSPY = os.environ.get("BENCH_TP_PYSPY")  # a py-spy executable: it profiles the PROFILE tasks instead
TARGET_SECONDS = 60.0
TARGET_RATIO = 1.05


@dataclass
class Seen:
    """One API request an emulator served, whole (the emulators' own log keeps the first MiB of
    a body: a $batch of 1,000 upserts is longer)."""

    at: float
    method: str
    path: str
    target: str
    status: int
    body: bytes


class InFlight:
    """Counts each emulator's API requests in flight (its latency included) and keeps the peak;
    keeps every API request it served (:class:`Seen`)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.now = 0
        self.peak = 0
        self.busy: list[tuple[float, float]] = []  # (when, seconds spent beyond the injected latency)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._dispatch = app.dispatch
        app.dispatch = self.dispatch  # this instance only: the bench's own sandbox

    def dispatch(self, request: Any) -> Any:
        if request.path.startswith("/_sandbox/"):
            return self._dispatch(request)
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        start = time.perf_counter()
        status = 0  # the connection dropped, or the emulator failed
        try:
            response, fault = self._dispatch(request)
            status = response.status if response is not None else 0
            return response, fault
        finally:
            latency = self.app.faults.config.latency_ms[0] / 1000
            spent = max(0.0, time.perf_counter() - start - latency)
            seen = Seen(time.time(), request.method, request.path, request.target, status, request.body)
            with self._lock:
                self.now -= 1
                self.busy.append((time.time(), spent))
                self.seen.append(seen)

    def reset(self) -> None:
        with self._lock:
            self.peak = self.now
            self.busy.clear()
            self.seen.clear()


# -- the run --------------------------------------------------------------------------------------------
def _open_referrals(pc: Any) -> int:
    """Reopen the seed's Closed referrals (a Closed unlinked one is never imported): every
    referral is one the first sync must bring to the CRM."""
    with pc.lock:
        for doc in pc.referrals.values():
            if doc.get("status") == "Closed":
                doc.update(status="Active", substatus="Accepted", closedDateTime=None)
        return len(pc.referrals)


def _latency(sb: Any, ms: int) -> None:
    from cosell_sandbox.server import FaultConfig

    for app in (sb.entra, sb.partner_center, sb.dynamics365, sb.salesforce):
        app.faults.configure(FaultConfig(latency_ms=(ms, ms)))


TASKS = ("prepare", "extract_partner_center", "extract_crm", "plan", "load_crm", "load_partner_center", "commit_state")


def run_task(task: str, spec: dict[str, Any]) -> tuple[float, float, Any]:
    """One task of the sync DAG, as its task body in ``dag_factory`` runs it: (the step's
    seconds, its CPU seconds, its result). ``prepare`` returns the run's spec (window, choices, lease)."""
    from cosell_sync import pipeline as runner
    from cosell_sync.dag_factory import check_mapping, run_side_step, run_step, state_store
    from cosell_sync.engine.mapping import load_mapping

    crm = spec["crm"]
    start, cpu = time.perf_counter(), time.process_time()
    if task == "prepare":
        since_pc, since_crm = runner.window(state_store(), spec["dag_id"])
        choices = check_mapping(crm, load_mapping(crm))
        lease = state_store().acquire_lease(crm, spec["dag_id"], spec["run_id"], runner.lease.LEASE_TTL)
        result: Any = spec | {
            "since_pc": since_pc.isoformat() if since_pc else None,
            "since_crm": since_crm.isoformat() if since_crm else None,
            "choices": choices,
            "lease_epoch": lease.epoch,
            "lease_ttl": runner.lease.LEASE_TTL.total_seconds(),
        }
        return time.perf_counter() - start, time.process_time() - cpu, result

    # the step as the DAG's task runs it
    result = run_step(spec, runner.commit) if task == "commit_state" else run_side_step(spec, task)
    return time.perf_counter() - start, time.process_time() - cpu, result


def _task_process(task: str, spec: dict[str, Any], tmp: Path) -> tuple[float, float, float, Any]:
    """``task`` in a process of its own (as Airflow runs it; and the sandbox, in this process,
    does not share an interpreter lock with it): (the step's seconds, its CPU seconds, the
    process's seconds, result)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    spec_file, out_file = tmp / f"{task}.spec.json", tmp / f"{task}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "plugins")]))
    # Bytecode cached (in a folder of the bench's own), as on any Airflow worker: with
    # PYTHONDONTWRITEBYTECODE (set on these machines) each task would compile Airflow from
    # source again, 10 s and more of its time.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp.parent / "pycache")
    command = [sys.executable, "-m", "benchmarks.throughput", "--task", task, str(spec_file), str(out_file)]
    if PYSPY and task in PROFILE:  # the samples of the threads holding the GIL: where its CPU goes
        command = [PYSPY, "record", "--gil", "-r", "200", "-f", "raw", "-o", str(tmp / f"{task}.pyspy"), "--", *command]
    start = time.perf_counter()
    with open(tmp / f"{task}.log", "w") as log_file:
        done = subprocess.run(  # our own interpreter, on our own code
            command,
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode:
        tail = (tmp / f"{task}.log").read_text()[-3000:]
        raise RuntimeError(f"throughput: task {task} failed ({done.returncode}):\n{tail}")
    out = json.loads(out_file.read_text())
    return out["seconds"], out["cpu_seconds"], wall, out["result"]


def run_one(sb: Any, crm: str, tmp: Path, inflight: dict[str, InFlight]) -> dict[str, Any]:
    from cosell_sync.state import StateStore

    sb.reset()
    sb.partner_center.seed(REFERRALS, seed=16)
    pc_total = _open_referrals(sb.partner_center)
    crm_emulator = sb.salesforce if crm == "salesforce" else sb.dynamics365
    crm_emulator.seed(opportunities=OPPORTUNITIES, flagged=FLAGGED, seed=16)
    run_dir = tmp / crm
    run_dir.mkdir(parents=True, exist_ok=True)
    for conn_id, conn in sb.connections().items():
        if conn_id == "partner_center_default":  # a fresh rotation store: the reset sandbox knows no rotated token
            conn["extra"]["token_store_path"] = str(run_dir / "tokens.json")
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    state_url = f"sqlite:///{run_dir / 'state.db'}"
    StateStore(state_url).migrate()
    os.environ["AIRFLOW_CONN_COSELL_STATE"] = json.dumps({"conn_type": "generic", "host": state_url})
    spec: dict[str, Any] = {
        "crm": crm,
        "dag_id": f"cosell_sync_{crm}",
        "run_id": f"manual__throughput_{crm}",
        "mapping_path": None,
        "staging": f"file://{run_dir / 'staging'}",
        "until": None,
        "referral_ids": None,
        "directions": ["pc_to_crm", "crm_to_pc"],
        "dry_run": False,
        "backfill": False,
    }
    _latency(sb, LATENCY_MS)
    for counter in inflight.values():
        counter.reset()
    tasks: dict[str, float] = {}
    task_cpu: dict[str, float] = {}
    processes: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}
    results: dict[str, Any] = {}
    sandbox_cpu = time.process_time()
    load_before = os.getloadavg()
    try:
        for task in TASKS:
            began = time.time()
            tasks[task], task_cpu[task], processes[task], results[task] = _task_process(task, spec, run_dir)
            windows[task] = (began, time.time())
            if task == "prepare":
                spec = results[task]
    finally:
        _latency(sb, 0)
        sandbox_cpu = time.process_time() - sandbox_cpu
    report = results["commit_state"]
    rows = kind_rows(sb, crm, inflight, windows)
    crm_extracted = int(results["extract_crm"]["opportunities"])
    floor = floor_table(rows, pc_listed=pc_total, crm_extracted=crm_extracted, crm=crm)
    calls = Counter()
    per_task: dict[str, Counter[str]] = {task: Counter() for task in TASKS}
    for row in rows:
        calls[row["system"]] += row["calls"]
        for task, n in row["tasks"].items():
            per_task[task][row["system"]] += n
    peaks = {name: counter.peak for name, counter in inflight.items() if name in ("partner_center", crm, "token")}
    # The emulators' own work (beyond the injected latency), per task: a real service answers
    # from its own machines; here it shares this machine's two cores with the tasks.
    sandbox_busy: dict[str, dict[str, float]] = {task: {} for task in TASKS}
    for name, counter in inflight.items():
        for at, spent in counter.busy:
            task = task_at(at, windows)
            if task in sandbox_busy:
                sandbox_busy[task][name] = sandbox_busy[task].get(name, 0.0) + spent
    throttled = {
        row["system"]: row["status"].get("429", 0)
        for row in rows
        if row["status"].get("429") and row["system"] in ("partner_center", crm)
    }
    return {
        "referrals": REFERRALS,
        "opportunities": OPPORTUNITIES,
        "flagged": FLAGGED,
        "latency_ms": LATENCY_MS,
        "task_seconds": sum(tasks.values()),
        "calls": sum(calls.values()),
        "floor_calls": sum(floor.values()),
        "calls_by_system": dict(calls),
        "floor_by_system": floor,
        "tasks": tasks,
        "task_cpu_seconds": sum(task_cpu.values()),  # the tasks' own CPU: less noisy than their wall times
        # the machine's 1/5/15-minute load averages as the run began and ended (2 cores; others share them)
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "task_processes_seconds": processes,  # each task's process, interpreter start-up and imports included
        "cpu_seconds": {"tasks": task_cpu, "sandbox": sandbox_cpu},  # the emulators run in this process
        "sandbox_busy_seconds": sandbox_busy,  # per task and emulator: handling time beyond the latency
        "calls_by_task": {task: dict(c) for task, c in per_task.items()},
        "step_results": {k: v for k, v in results.items() if k not in ("commit_state", "prepare")},
        "writes": report.get("writes"),
        "created": {d: report[d]["created"] for d in ("pc_to_crm", "crm_to_pc")},
        "failed": {d: report[d]["failed"] for d in ("pc_to_crm", "crm_to_pc")},
        "concurrency": {"peak_in_flight": peaks, "throttled_429": throttled},
        "by_kind": rows,
        **({"salesforce_write_kinds": sf_write_kinds(rows)} if crm == "salesforce" else {}),
    }


def _line(crm: str, f: dict[str, Any]) -> str:
    ratio = f["calls"] / f["floor_calls"] if f["floor_calls"] else float("nan")
    slowest = sorted(f["tasks"].items(), key=lambda kv: -kv[1])[:3]
    return (
        f"throughput {crm}: {f['referrals']:,} referrals + {f['opportunities']:,} opportunities "
        f"({f['flagged']:,} flagged), {f['latency_ms']} ms/request: task time {f['task_seconds']:.1f}s "
        f"(target <= {TARGET_SECONDS:.0f} s; " + ", ".join(f"{k} {v:.1f}s" for k, v in slowest) + "), "
        f"task CPU {f['task_cpu_seconds']:.1f}s, load {f['load_average']['after'][0]:.1f}; "
        f"{f['calls']:,} calls vs floor {f['floor_calls']:,} = {ratio:.2f}x (target <= {TARGET_RATIO}x); "
        f"peak in flight {f['concurrency']['peak_in_flight']}, 429s {f['concurrency']['throttled_429'] or 0}"
    )


def bench_throughput(sb: Any = None) -> dict[str, dict[str, Any]]:
    """The first sync of BENCH_TP_* records per CRM (see the module's docstring); ``sb``: a
    running sandbox to use (it is reset), else one of its own."""
    from cosell_sandbox.runtime import Sandbox

    if os.environ.get("BENCH_THROUGHPUT", "1") == "0":
        return {}
    saved = dict(os.environ)  # the connections it sets are its own sandbox's: put back after
    tmp = Path(tempfile.mkdtemp(prefix="cosell-throughput-"))
    os.environ.setdefault("AIRFLOW_HOME", str(tmp / "airflow"))
    own = sb is None
    if own:
        sb = Sandbox(tmp / "sandbox").start()
    try:
        inflight = {
            "token": InFlight(sb.entra),
            "partner_center": InFlight(sb.partner_center),
            "salesforce": InFlight(sb.salesforce),
            "dynamics365": InFlight(sb.dynamics365),
        }
        figures = {}
        try:
            for crm in CRMS:
                figures[crm] = run_one(sb, crm, tmp, inflight)
                print(_line(crm, figures[crm]), flush=True)
        finally:
            for counter in inflight.values():
                counter.app.dispatch = counter._dispatch
        return figures
    finally:
        if own:
            sb.stop()
        os.environ.clear()
        os.environ.update(saved)


def _as_a_worker_forks_it() -> None:
    """Load what an Airflow worker holds when it starts a task, before the task's clock starts.

    Airflow's supervisor forks each task's process from the executor's worker (a LocalExecutor
    worker, a Celery worker), which has imported Airflow (``import airflow`` initialises its
    settings, configuration and secrets masker) and the Task SDK (the supervisor is part of it),
    and the task's start is recorded right after that fork. A fresh interpreter here would
    otherwise count that start-up as the step's time. (The DAG parse, our own modules' import,
    which Airflow's task time does include, is not in the step's time either: ``run_task``
    imports them before its clock. benchmarks/README.md says both.)"""
    import airflow
    import airflow.sdk  # noqa: F401
    from airflow.sdk.execution_time import supervisor  # noqa: F401


def main(argv: list[str]) -> int:
    if argv[:1] == ["--task"]:  # one task of the run, in its own process (see _task_process)
        import logging

        logging.getLogger("cosell_sync").setLevel(logging.WARNING)
        task, spec_file, out_file = argv[1:4]
        _as_a_worker_forks_it()
        if task in PROFILE and not PYSPY:  # BENCH_TP_PROFILE=load_partner_center,...: a cProfile of those tasks
            import cProfile

            with cProfile.Profile() as prof:
                seconds, cpu, result = run_task(task, json.loads(Path(spec_file).read_text()))
            prof.dump_stats(str(Path(out_file).with_suffix(".prof")))
        else:
            seconds, cpu, result = run_task(task, json.loads(Path(spec_file).read_text()))
        out = {"seconds": seconds, "cpu_seconds": cpu, "result": result}
        Path(out_file).write_text(json.dumps(out, default=str))
        return 0
    out = bench_throughput()
    path = os.environ.get("BENCH_TP_OUT")
    if path:
        Path(path).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
