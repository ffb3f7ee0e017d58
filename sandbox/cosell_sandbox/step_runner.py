"""A fork server that runs sync steps (the DAG's tasks) in their own OS processes.

Tests that SIGKILL a task in the middle of a step need every step in a process of its own,
the way Airflow runs each task. Starting a fresh interpreter per step costs seconds (Airflow's
SDK, pandas and the hooks are imported each time); this server imports them once and
``fork``\\s a child per step, so a child starts in milliseconds and can be killed for real
(``os.kill(pid, SIGKILL)``) at any moment.

Run it as ``python -m cosell_sandbox.step_runner``. It speaks JSON lines on stdin/stdout
(everything else a child prints goes to stderr):

* ``{"cmd": "run", "step": ..., "spec": {...}, "env": {...}, "kill_after": s|null}``
  forks the child, which sets ``env`` and waits; the answer is ``{"pid": ...}``.
* ``{"cmd": "go"}`` lets the child run the step. ``kill_after`` (seconds) makes the server
  SIGKILL the child that long after ``go`` if it is still running (the server kills it before
  reaping it, so the pid cannot have been reused). The answer, once the child is gone:
  ``{"pid", "signal", "code", "result", "error", "seconds", "cpu"}``.

``step`` is ``prepare`` (the DAG's prepare: window and lease; its result is the run's spec)
or one of the runner's step functions (``extract_partner_center``, ``extract_crm``,
``plan_run``, ``load_crm``, ``load_partner_center``, ``commit``), run through
:func:`cosell_sync.dag_factory.run_step` as the DAG's tasks are (under the run's lease when
the spec holds one; outside Airflow every try counts as a retry).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

STEPS = ("extract_partner_center", "extract_crm", "plan_run", "load_crm", "load_partner_center", "commit")
#: Which side a step's ``side`` parameter is.
SIDE_OF = {
    "extract_partner_center": "pc",
    "load_partner_center": "pc",
    "extract_crm": "crm",
    "load_crm": "crm",
    "plan_run": "crm",
    "commit": "crm",
}


def preload() -> None:
    """Import what every step needs, once, before any fork."""
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    import cosell_sync.dag_factory
    import cosell_sync.hooks.dynamics365
    import cosell_sync.hooks.partner_center
    import cosell_sync.hooks.salesforce
    import cosell_sync.pipeline
    import cosell_sync.sides.dynamics365
    import cosell_sync.sides.salesforce  # noqa: F401


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The DAG's ``prepare`` for a manual run: the window from the watermarks, and the CRM's
    lease unless ``spec["lease"]`` is false. Returns the spec every later step gets."""
    from cosell_sync.dag_factory import check_mapping, state_store
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.pipeline import window

    store = state_store()
    since_pc, since_crm = window(store, spec["dag_id"], full_resync=bool(spec.get("full_resync")))
    out = {
        "mapping_path": None,
        "until": None,
        "referral_ids": None,
        "directions": ["pc_to_crm", "crm_to_pc"],
        "dry_run": False,
        "backfill": False,
        "lease_ttl": 1800.0,
        **{k: v for k, v in spec.items() if k not in ("lease", "full_resync")},
        "since_pc": since_pc.isoformat() if since_pc else None,
        "since_crm": since_crm.isoformat() if since_crm else None,
    }
    out["choices"] = check_mapping(out["crm"], load_mapping(out["crm"], out["mapping_path"]))
    if spec.get("lease", True) and not out["dry_run"]:
        taken = store.acquire_lease(out["crm"], out["dag_id"], out["run_id"], timedelta(seconds=out["lease_ttl"]))
        out["lease_epoch"] = taken.epoch
    return out


def run_step(step: str, spec: dict[str, Any]) -> Any:
    """One step in this process, as the DAG's task runs it."""
    if step == "prepare":
        return prepare(spec)
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    from cosell_sync import dag_factory
    from cosell_sync import pipeline as runner

    fn = getattr(runner, step)

    def body(job: Any, store: Any) -> Any:
        pc_side, crm_side = dag_factory.sync_sides(job.crm, job.mapping, spec.get("choices"))
        given = {
            "job": job,
            "store": store,
            "pc_side": pc_side,
            "crm_side": crm_side,
            "side": pc_side if SIDE_OF[step] == "pc" else crm_side,
        }
        params = inspect.signature(fn).parameters
        return fn(**{name: given[name] for name in params if name in given})

    return dag_factory.run_step(spec, body)


def _child(command: dict[str, Any], go: int, out_path: str) -> None:
    """In the forked child: wait for ``go``, run the step, leave the outcome in ``out_path``."""
    code = 0
    try:
        os.environ.update(command.get("env") or {})
        os.read(go, 1)
        os.close(go)
        outcome: dict[str, Any] = {"result": run_step(command["step"], command["spec"])}
    except BaseException as exc:  # the outcome of any failure is reported, not raised
        outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = 1
    try:
        with open(out_path + ".tmp", "w") as fh:
            json.dump(outcome, fh, default=str)
        os.replace(out_path + ".tmp", out_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, kill_after: float | None) -> tuple[int, float, float]:
    """Reap the child (killing it ``kill_after`` seconds from now if it still runs): its exit
    status, wall-clock seconds and CPU seconds."""
    start = time.monotonic()
    deadline = None if kill_after is None else start + kill_after
    while True:
        done, status, usage = os.wait4(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.002)
    return status, time.monotonic() - start, usage.ru_utime + usage.ru_stime


def serve(commands: Any, answers: Any, workdir: str) -> None:
    pending: dict[str, Any] | None = None
    for n, line in enumerate(commands):
        if not line.strip():
            continue
        command = json.loads(line)
        if command["cmd"] == "run":
            out_path = os.path.join(workdir, f"outcome-{n}.json")
            go_read, go_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(go_write)
                _child(command, go_read, out_path)
            os.close(go_read)
            pending = {"pid": pid, "go": go_write, "out": out_path, "kill_after": command.get("kill_after")}
            answers.write(json.dumps({"pid": pid}) + "\n")
            answers.flush()
        elif command["cmd"] == "go":
            assert pending is not None, "go without run"
            os.write(pending["go"], b"g")
            os.close(pending["go"])
            status, seconds, cpu = _wait(pending["pid"], pending["kill_after"])
            outcome: dict[str, Any] = {}
            if os.path.exists(pending["out"]):
                with open(pending["out"]) as fh:
                    outcome = json.load(fh)
                os.remove(pending["out"])
            answers.write(
                json.dumps(
                    {
                        "pid": pending["pid"],
                        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                        "seconds": seconds,
                        "cpu": cpu,
                        **outcome,
                    },
                    default=str,
                )
                + "\n"
            )
            answers.flush()
            pending = None
        elif command["cmd"] == "quit":
            return


def main() -> None:
    import tempfile

    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what steps print must not mix with answers
    preload()
    with tempfile.TemporaryDirectory(prefix="cosell-steps-") as workdir:
        answers.write(json.dumps({"ready": os.getpid()}) + "\n")
        answers.flush()
        serve(sys.stdin, answers, workdir)


if __name__ == "__main__":
    main()
