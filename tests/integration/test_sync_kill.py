"""Issue 11, the kill test: a first sync survives SIGKILLs at random points of every step.

A first sync of 1,500 referrals and 800 opportunities (400 flagged) runs step by step, each
step (the DAG's task) in an OS process of its own (forked by ``cosell_sandbox.step_runner``),
under the run's CRM lease taken the way the DAG's ``prepare`` takes it. At seeded random
points across extract, plan, load and commit the task process is SIGKILLed: after a seeded
number of requests reached the sandbox (half the time before the request is handled, half
after it was handled and before the answer left, so the write landed and its answer is lost),
or, for the steps that make no request (plan, commit), after a seeded delay. Each time, the
killed task is tried again the way Airflow retries it (same run, same staging folder), until a
try completes; then the run goes on with the next step.

After the run:

* no duplicate referral, opportunity, account or contact (counted by natural key);
* links on both sides: every referral created for a flagged opportunity holds the opportunity's
  id and the opportunity holds the referral's id; every linked referral has exactly one
  opportunity holding its id; the state DB holds the same pairs;
* the final state equals that of a clean run from the same seed (an id-independent projection
  of every record on both sides and of the state DB's links);
* a further run makes no write call (POST, PATCH, PUT, DELETE, or a write in a ``$batch``).

The numbers (kills per step, duplicates, records that differ from the clean run, time per
step) are printed (``pytest -s``). ``COSELL_KILL_SCALE=n`` kills n times as often (a longer
run); ``COSELL_KILL_REFERRALS`` / ``COSELL_KILL_OPPORTUNITIES`` change the data set's size.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cosell_sandbox.dynamics365 import clock as dataverse_emulator
from cosell_sandbox.partner_center import clock as partner_center_emulator
from cosell_sync.sides.partner_center import microsoft_side
from cosell_sync.state import StateStore

REFERRALS = int(os.environ.get("COSELL_KILL_REFERRALS", "1500"))
OPPORTUNITIES = int(os.environ.get("COSELL_KILL_OPPORTUNITIES", "800"))
FLAGGED = OPPORTUNITIES // 2
SEED = 1111
RUN_ID = "manual__kill_test_first_sync"  # the same in the clean and the killed run: audit texts compare
STEPS = ("extract_partner_center", "extract_crm", "plan_run", "load_crm", "load_partner_center", "commit")
TIMED = {"plan_run", "commit"}  # no request to count: killed after a delay
#: Kills per CRM and step, each at its own seeded random point: 20 per CRM, spread over every
#: step, within about 3 minutes for both CRMs on 2 cores. ``COSELL_KILL_SCALE`` multiplies them
#: (a longer run).
SCALE = int(os.environ.get("COSELL_KILL_SCALE", "1"))
KILLS = {
    crm: {
        "extract_partner_center": 3,
        "extract_crm": 3,
        "plan_run": 3,
        "load_crm": 5,
        "load_partner_center": 3,
        "commit": 3,
    }
    for crm in ("salesforce", "dynamics365")
}
ROOT = Path(__file__).resolve().parents[2]


# -- the step server -------------------------------------------------------------------------------
class StepServer:
    """``python -m cosell_sandbox.step_runner``: forks one process per step."""

    def __init__(self, log_path: Path) -> None:
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cosell_sandbox.step_runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )
        ready = self._answer()
        assert "ready" in ready, ready

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the step server exited ({self.proc.poll()}); see {self.log.name}")
        return json.loads(line)

    def _send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def run(self, step: str, spec: dict, env: dict[str, str], killer: Killer, **kill: Any) -> dict[str, Any]:
        """Run ``step`` in a new process, killed at a request (``at``, ``after``: see
        :class:`Killer`) or ``kill_after`` seconds, if it still runs by then."""
        kill_after = kill.pop("kill_after", None)
        self._send({"cmd": "run", "step": step, "spec": spec, "env": env, "kill_after": kill_after})
        pid = self._answer()["pid"]
        killer.arm(pid, **kill)
        try:
            self._send({"cmd": "go"})
            return self._answer()
        finally:
            killer.disarm()

    def close(self) -> None:
        try:
            self._send({"cmd": "quit"})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> StepServer:
    server = StepServer(tmp_path_factory.mktemp("kill") / "steps.log")
    yield server
    server.close()


class Killer:
    """Counts the requests the sandbox receives from the armed task process, and SIGKILLs it
    at the ``at``-th: before handling it (the request never happened) or after (it happened,
    its answer is lost). ``trace``: (emulator, method) of each request of the try."""

    def __init__(self, apps: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.at, self.after, self.fired = 0, False, False
        self.trace: list[tuple[str, str]] = []
        for app in apps:
            monkeypatch.setattr(app, "dispatch", self._wrap(app, app.dispatch))

    def arm(self, pid: int, at: int = 0, after: bool = False) -> None:
        with self.lock:
            self.pid, self.at, self.after, self.fired, self.trace = pid, at, after, False, []

    def disarm(self) -> None:
        with self.lock:
            self.pid = None

    def _wrap(self, app: Any, dispatch: Any) -> Any:
        def killing_dispatch(request):
            if request.path.startswith("/_sandbox/"):
                return dispatch(request)
            with self.lock:
                pid, hit = self.pid, False
                if pid is not None:
                    self.trace.append((app.name, request.method))
                    hit = len(self.trace) == self.at and not self.fired
                    self.fired = self.fired or hit
            if hit and not self.after:
                os.kill(pid, signal.SIGKILL)
                return None, "killed"
            answer = dispatch(request)
            if hit:
                os.kill(pid, signal.SIGKILL)
            return answer

        return killing_dispatch


# -- the sandbox's state, without ids ----------------------------------------------------------------
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SF_ID = re.compile(r"\b[0-9A-Za-z]{18}\b")
DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2})[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")
VOLATILE = {"eTag", "versionnumber"}
AUDIT_FIELDS = {"PC_Audit__c", "cosell_audit"}


def snapshot(pc, crm: str) -> dict[str, list[dict[str, Any]]]:
    """Every record on both sides (referrals, and the CRM's opportunities, accounts, contacts)."""
    out = {"referrals": [dict(d) for d in pc.partner_center.referrals.values()]}
    if crm == "salesforce":
        for obj, kind in (
            ("Opportunity", "opportunities"),
            ("Account", "accounts"),
            ("Contact", "contacts"),
            ("OpportunityContactRole", "roles"),
        ):
            out[kind] = pc.salesforce.list_records(obj)
    else:
        for kind in ("opportunities", "accounts", "contacts", "transactioncurrencies"):
            out[kind] = pc.dynamics365.rows(kind)
    return out


ID_FIELDS = {
    "referrals": "id",
    "opportunities": ("Id", "opportunityid"),
    "accounts": ("Id", "accountid"),
    "contacts": ("Id", "contactid"),
    "roles": ("Id",),
    "transactioncurrencies": ("transactioncurrencyid",),
}
LINK_FIELD = {"salesforce": "PC_Referral_Id__c", "dynamics365": "cosell_referralid"}
FLAG_FIELD = {"salesforce": "PC_Sync_With_Partner_Center__c", "dynamics365": "cosell_syncwithpartnercenter"}


def record_id(kind: str, record: dict[str, Any]) -> str:
    fields = ID_FIELDS[kind]
    for name in (fields,) if isinstance(fields, str) else fields:
        if record.get(name):
            return str(record[name])
    raise KeyError(kind)


def natural_key(kind: str, r: dict[str, Any]) -> str:
    """What a record is, without its id: the same record has the same key in every run."""
    if kind == "referrals":
        return f"referral:{r.get('name')}|{r.get('direction')}"
    if kind == "opportunities":
        return f"opportunity:{r.get('Name') or r.get('name')}"
    if kind == "accounts":
        return f"account:{r.get('Name') or r.get('name')}"
    if kind == "contacts":
        email = r.get("Email") or r.get("emailaddress1")
        return f"contact:{email or (r.get('FirstName') or r.get('firstname'), r.get('LastName') or r.get('lastname'))}"
    if kind == "transactioncurrencies":
        return f"currency:{r.get('isocurrencycode')}"
    return f"{kind}:?"


def id_tags(snap: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Every record id (lower case) -> the record's natural key."""
    tags = {}
    for kind, records in snap.items():
        if kind == "roles":
            continue
        for r in records:
            tags[record_id(kind, r).lower()] = natural_key(kind, r)
    return tags


def project(value: Any, tags: dict[str, str], key: str = "") -> Any:
    """``value`` with ids replaced by the natural keys of their records (unknown UUIDs by a
    placeholder), times cut to their day, ETags and version numbers left out, and a CRM audit
    field's repeated lines (a retried write audited again, identically) taken once."""
    if isinstance(value, dict):
        return {k: project(v, tags, k) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [project(v, tags) for v in value]
    if isinstance(value, str):
        if value.lower() in tags:
            return tags[value.lower()]
        text = UUID.sub(lambda m: tags.get(m.group(0).lower(), "<uuid>"), value)
        text = SF_ID.sub(lambda m: tags.get(m.group(0).lower(), m.group(0)), text)
        text = DATETIME.sub(r"\1", text)
        if key in AUDIT_FIELDS:
            lines = text.split("\n")
            text = "\n".join(line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1])
        return text
    return value


def repeated_audit_lines(snap: dict[str, list[dict[str, Any]]]) -> int:
    """Lines of the CRM audit fields that repeat the line before them (a write audited twice)."""
    repeats = 0
    for o in snap["opportunities"]:
        for key in AUDIT_FIELDS & set(o):
            lines = DATETIME.sub(r"\1", str(o[key] or "")).split("\n")
            repeats += sum(1 for i in range(1, len(lines)) if lines[i] == lines[i - 1])
    return repeats


def projection(snap: dict[str, list[dict[str, Any]]], links: Any, crm: str) -> dict[str, Counter]:
    """Per kind, the multiset of projected records; ``links``: the state DB's, projected too, their
    base without the fields that only seed a new record (``sync: create``: never merged, so
    their base is never read)."""
    from cosell_sync.engine.mapping import load_mapping

    merged = {name for name, fm in load_mapping(crm).fields.items() if fm.sync != "create"}
    tags = id_tags(snap)
    out = {
        kind: Counter(json.dumps(project(r, tags), sort_keys=True, default=str) for r in records)
        for kind, records in snap.items()
    }
    out["state_links"] = Counter(
        json.dumps(
            project({"referral": r, "crm": c, "base": {k: v for k, v in b.items() if k in merged}}, tags),
            sort_keys=True,
            default=str,
        )
        for r, c, b in zip(links["referral_id"], links["crm_id"], links["base"], strict=True)
    )
    return out


def duplicates(snap: dict[str, list[dict[str, Any]]], clean: dict[str, list[dict[str, Any]]], crm: str) -> dict:
    """Records beyond the clean run's, per kind and natural key; and link values held twice."""
    out: dict[str, int] = {}
    for kind in ("referrals", "opportunities", "accounts", "contacts"):
        now = Counter(natural_key(kind, r) for r in snap[kind])
        before = Counter(natural_key(kind, r) for r in clean[kind])
        out[kind] = sum(max(0, n - before[k]) for k, n in now.items())
    ext = Counter(str(r.get("externalReferenceId")).lower() for r in snap["referrals"] if r.get("externalReferenceId"))
    held = Counter(str(r.get(LINK_FIELD[crm])).lower() for r in snap["opportunities"] if r.get(LINK_FIELD[crm]))
    out["referrals_per_opportunity"] = sum(n - 1 for n in ext.values() if n > 1)
    out["opportunities_per_referral"] = sum(n - 1 for n in held.values() if n > 1)
    return out


def link_problems(snap: dict[str, list[dict[str, Any]]], seeded: set[str], store: StateStore, crm: str) -> list[str]:
    """Links that are not held on both sides (and in the state DB)."""
    link_field, flag_field = LINK_FIELD[crm], FLAG_FIELD[crm]
    referrals = {str(r["id"]).lower(): r for r in snap["referrals"]}
    opps = {record_id("opportunities", o).lower(): o for o in snap["opportunities"]}
    holders: dict[str, list[str]] = {}
    for oid, o in opps.items():
        if o.get(link_field):
            holders.setdefault(str(o[link_field]).lower(), []).append(oid)
    problems = []
    for rid, r in referrals.items():
        if microsoft_side(r):  # a co-sell request to Microsoft: part of its engagement, not a deal
            continue
        ext = str(r.get("externalReferenceId") or "").lower()
        held_by = holders.get(rid, [])
        if rid not in seeded:  # created by the sync, for a flagged opportunity
            if ext not in opps or str(opps[ext].get(link_field) or "").lower() != rid:
                problems.append(f"referral {r.get('name')!r} created for {ext!r}: the opportunity does not hold it")
        elif ext or held_by:  # a seeded referral the sync imported
            if len(held_by) != 1 or held_by[0] != ext:
                problems.append(f"imported referral {r.get('name')!r}: held by {held_by}, externalReferenceId {ext!r}")
        elif r.get("status") in ("New", "Active"):
            problems.append(f"open referral {r.get('name')!r} was not imported")
    for o in opps.values():
        closed = o.get("IsClosed") if crm == "salesforce" else o.get("statecode") not in (0, None)
        if o.get(flag_field) and not closed and not o.get(link_field):
            problems.append(f"flagged open opportunity {natural_key('opportunities', o)!r} has no referral")
    links = store.get_links(crm)
    pairs = {(str(r).lower(), str(c).lower()) for r, c in zip(links["referral_id"], links["crm_id"], strict=True)}
    held = {(str(o[link_field]).lower(), oid) for oid, o in opps.items() if o.get(link_field)}
    if pairs != held:
        problems.append(f"state DB links differ from the CRM's: {len(pairs - held)} missing there, {len(held - pairs)}")
    return problems


WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE", "MERGE"}
BATCH_WRITE = re.compile(rb"^(POST|PATCH|PUT|DELETE|MERGE) ", re.MULTILINE)


def write_calls(apps: list[Any], since: float) -> list[str]:
    """The write requests the sandbox received since ``since`` (a ``$batch`` counts when it holds one)."""
    calls = []
    for app in apps:
        for r in app.requests_matching():
            if r.at < since or r.method not in WRITE_METHODS or r.path.startswith("/_sandbox/"):
                continue
            if r.path.endswith("$batch") and not BATCH_WRITE.search(r.body):
                continue
            calls.append(f"{app.name}: {r.method} {r.path} -> {r.status}")
    return calls


# -- runs ---------------------------------------------------------------------------------------------
def seed(pc, crm: str, at: datetime) -> set[str]:
    """Seed both sides as of ``at`` (the emulators' clocks stopped there, so two seedings give
    the same data); the ids of the referrals Microsoft shared (the rest the sync creates)."""

    class Stopped(datetime):
        @classmethod
        def now(cls, tz=None):
            return at if tz else at.replace(tzinfo=None)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(partner_center_emulator, "datetime", Stopped)
        m.setattr(dataverse_emulator, "_now", lambda: at)
        m.setattr(pc.salesforce, "clock", lambda: at.timestamp())
        seeded = {str(r).lower() for r in pc.partner_center.seed(REFERRALS, seed=SEED)}
        if crm == "salesforce":
            pc.salesforce.seed(opportunities=OPPORTUNITIES, flagged=FLAGGED, seed=SEED)
        else:
            pc.dynamics365.seed(opportunities=OPPORTUNITIES, accounts=20, flagged=FLAGGED, seed=SEED)
    return seeded


def child_env(folder: Path) -> dict[str, str]:
    """The connections of this test (the sandbox's), a state DB and a refresh-token store in ``folder``."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
    pc_conn = json.loads(env["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"])
    pc_conn["extra"]["token_store_path"] = str(folder / "tokens.json")
    env["AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"] = json.dumps(pc_conn)
    env["AIRFLOW_CONN_COSELL_STATE"] = json.dumps({"conn_type": "generic", "host": f"sqlite:///{folder}/state.db"})
    return env


def prepare(steps: StepServer, killer: Killer, crm: str, folder: Path, run_id: str) -> dict[str, Any]:
    spec = {"crm": crm, "dag_id": f"cosell_sync_{crm}", "run_id": run_id, "staging": f"file://{folder / 'staging'}"}
    outcome = steps.run("prepare", spec, child_env(folder), killer)
    assert outcome["code"] == 0, outcome.get("traceback") or outcome
    return outcome["result"]


def run_clean(steps: StepServer, killer: Killer, crm: str, folder: Path, run_id: str) -> dict[str, dict]:
    """Every step once, nothing killed; per step its seconds, the requests it made and (for the
    loads) how many of them it made up to its last create (POST)."""
    spec, env, out = prepare(steps, killer, crm, folder, run_id), child_env(folder), {}
    for step in STEPS:
        outcome = steps.run(step, spec, env, killer)
        assert outcome["code"] == 0, (step, outcome.get("traceback") or outcome)
        posts = [i + 1 for i, (app, method) in enumerate(killer.trace) if method == "POST" and app != "entra"]
        out[step] = {
            "seconds": outcome["seconds"],
            "requests": len(killer.trace),
            "creating": max(posts, default=len(killer.trace)),
            "result": outcome["result"],
        }
    return out


def run_killed(
    steps: StepServer, killer: Killer, crm: str, folder: Path, clean: dict[str, dict], rng: random.Random
) -> tuple[Counter, Counter, list[str]]:
    """The first sync, SIGKILLed ``KILLS[crm][step]`` times in each step, each time at a seeded
    random request of the try (plan and commit: after a seeded random delay) and retried. A try
    that ends before its kill point is run again ("Clear task") with a new point drawn from what
    that try did. The first kill of load_partner_center falls among its creates. Kills and
    seconds per step, and a line per kill."""
    started = time.monotonic()
    spec, env = prepare(steps, killer, crm, folder, RUN_ID), child_env(folder)
    done: Counter = Counter()
    seconds_in: Counter = Counter()
    lines: list[str] = []
    for step in STEPS:
        budget = KILLS[crm][step] * SCALE
        requests, seconds = clean[step]["requests"], clean[step]["seconds"]
        if step == "load_partner_center":
            requests = clean[step]["creating"]
        tries = 0
        while True:
            tries += 1
            kill: dict[str, Any] = {}
            if done[step] < budget:
                if step in TIMED:
                    kill["kill_after"] = rng.uniform(0.05, 0.9) * seconds
                else:
                    kill["at"], kill["after"] = rng.randint(1, max(1, requests)), rng.random() < 0.5
            outcome = steps.run(step, spec, env, killer, **kill)
            seconds_in[step] += outcome["seconds"]
            if outcome["signal"] == signal.SIGKILL:
                done[step] += 1
                if "at" in kill:
                    where = f"at request {kill['at']} ({'after' if kill['after'] else 'before'} it was handled)"
                else:
                    where = f"after {kill['kill_after']:.2f}s"
                lines.append(f"{step}: try {tries} killed {where}")
                requests = clean[step]["requests"]
                continue
            assert outcome["code"] == 0, (step, outcome.get("traceback") or outcome)
            if done[step] < budget and tries < 3 * budget + 3:
                requests, seconds = len(killer.trace), outcome["seconds"]  # cleared: run it again
                lines.append(f"{step}: try {tries} ended before its kill point; cleared")
                continue
            break
    seconds_in["total"] = time.monotonic() - started
    return done, seconds_in, lines


@pytest.mark.timeout(900)
@pytest.mark.parametrize("crm", ["salesforce", "dynamics365"])
def test_a_first_sync_killed_at_random_points_ends_as_a_clean_run(pc, conns, tmp_path, steps, monkeypatch, crm):
    started, seeded_at = time.monotonic(), datetime.now(UTC)
    apps = [pc.partner_center, pc.salesforce if crm == "salesforce" else pc.dynamics365]
    killer = Killer([*apps, pc.entra], monkeypatch)

    # The clean run: the state a first sync from this seed ends in.
    seed(pc, crm, seeded_at)
    clean = run_clean(steps, killer, crm, tmp_path / "clean", RUN_ID)
    clean_seconds = time.monotonic() - started
    clean_store = StateStore(f"sqlite:///{tmp_path / 'clean' / 'state.db'}")
    clean_snap = snapshot(pc, crm)
    expected = projection(clean_snap, clean_store.get_links(crm), crm)

    # The same first sync from the same seed, killed again and again.
    pc.reset()
    seeded = seed(pc, crm, seeded_at)
    rng = random.Random(f"{SEED}-{crm}")
    kills, seconds, lines = run_killed(steps, killer, crm, tmp_path / "killed", clean, rng)
    store = StateStore(f"sqlite:///{tmp_path / 'killed' / 'state.db'}")
    snap = snapshot(pc, crm)
    got = projection(snap, store.get_links(crm), crm)
    dups = duplicates(snap, clean_snap, crm)
    lost = {kind: sum((expected[kind] - got[kind]).values()) for kind in expected}  # clean records not matched
    surplus = {kind: sum((got[kind] - expected[kind]).values()) for kind in expected}
    problems = link_problems(snap, seeded, store, crm)
    repeats = repeated_audit_lines(snap)

    # A further run writes nothing.
    further_started = time.time()
    run_clean(steps, killer, crm, tmp_path / "killed", "manual__kill_test_further")
    writes = write_calls(apps, further_started)
    further = time.time() - further_started

    total = time.monotonic() - started
    print(
        f"\n[kill test {crm}] {REFERRALS} referrals, {OPPORTUNITIES} opportunities ({FLAGGED} flagged)\n"
        f"  kills: {sum(kills.values())} ({', '.join(f'{s} {n}' for s, n in kills.items() if n)})\n"
        f"  duplicates: {sum(dups.values())} {dups}\n"
        f"  records differing from the clean run (lost updates): {sum(lost.values())} {lost}; "
        f"records the clean run does not have: {sum(surplus.values())}\n"
        f"  link problems: {len(problems)}; write calls by a further run: {len(writes)}; "
        f"audit lines repeated by retried writes: {repeats}\n"
        f"  runtime {total:.0f}s: clean run {clean_seconds:.0f}s, killed run {seconds['total']:.0f}s "
        f"({', '.join(f'{s} {seconds[s]:.0f}s' for s in STEPS)}), further run {further:.0f}s"
    )
    for line in lines:
        print(f"    {line}")
    assert sum(kills.values()) >= sum(KILLS[crm].values()) * SCALE, kills
    assert all(kills[s] for s in STEPS), kills
    assert not any(dups.values()), dups
    assert not problems, problems[:20]
    for kind in expected:
        missing, extra = expected[kind] - got[kind], got[kind] - expected[kind]
        assert not missing and not extra, (kind, list(missing)[:3], list(extra)[:3])
    assert not writes, writes[:20]
