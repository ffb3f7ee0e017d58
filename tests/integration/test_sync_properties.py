"""Issue 11, property test: seeded random sequences of edits on both sides, new records,
injected faults and sync runs, against the sandbox.

Inputs (``random.Random(seed)`` over fixed seeds): seller and Microsoft edits of the deal
value, notes, close date and stage; new incoming referrals and newly flagged opportunities;
faults on the emulators (429, 5xx, a request processed whose answer is lost); edits made
in the middle of a run (Microsoft between the run's extract and its Partner Center write: a
412; the seller between the CRM extract and the CRM write); and runs through the DAG's step
functions, under the CRM's lease as ``runner.sync`` takes it.

Invariants after every run: no duplicate referral, opportunity, account or contact; every
edit is synced (the other side holds it), audited as the losing side of a conflict,
overwritten by a later edit on its own side, or still pending for a reason (faults were on
and the record is in the dead letter or the run failed; or the pair was edited during the
run). Once the faults stop, one run converges (both sides and the base agree, nothing is
pending, the dead letter is empty) and the run after it sends no write request.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pytest

from cosell_sandbox.server import FaultConfig, Headers, Request
from cosell_sync import pipeline as runner
from cosell_sync.pipeline import SyncJob, lease
from cosell_sync.state import StateStore
from tests.integration.sync_jobs import quiet_sides, scheduled_job

PC, CRM = "partner_center", "crm"
WRITES = {"POST", "PATCH", "PUT", "DELETE"}
STEPS = ("extract_partner_center", "extract_crm", "plan_run", "load_crm", "load_partner_center", "commit")
# Fields edited, per CRM (Dynamics has no open stage of its own: an open opportunity has no opinion).
EDITED = {
    "salesforce": ("deal_value", "notes", "close_date", "stage"),
    "dynamics365": ("deal_value", "notes", "close_date"),
}
COLUMNS = {
    "salesforce": {
        "deal_value": "Amount",
        "notes": "Description",
        "close_date": "CloseDate",
        "stage": "StageName",
        "link": "PC_Referral_Id__c",
        "flag": "PC_Sync_With_Partner_Center__c",
    },
    "dynamics365": {
        "deal_value": "estimatedvalue",
        "notes": "description",
        "close_date": "estimatedclosedate",
        "link": "cosell_referralid",
        "flag": "cosell_syncwithpartnercenter",
    },
}
SF_STAGES = {"Prospecting": "new", "Closed Won": "won", "Closed Lost": "lost"}  # any other open stage: active
SF_ACTIVE = ("Qualification", "Needs Analysis", "Negotiation/Review")
_runs = itertools.count(1)


def _text(value: Any) -> Any:
    return None if value in ("", None) else value


# -- the two sides, canonically ---------------------------------------------------------------------
def pc_values(doc: dict[str, Any]) -> dict[str, Any]:
    details = doc["details"]
    status = doc["status"]
    stage = {"New": "new", "Active": "active"}.get(status) or ("won" if doc.get("substatus") == "Won" else "lost")
    return {
        "deal_value": None if details.get("dealValue") is None else float(details["dealValue"]),
        "notes": _text(details.get("notes")),
        "close_date": _text((details.get("closingDateTime") or "")[:10]),
        "stage": stage,
    }


class World:
    """The sandbox seen from the test: the CRM's records, canonical values, edits."""

    def __init__(self, pc, crm: str) -> None:
        self.pc, self.crm = pc, crm
        self.cols = COLUMNS[crm]

    # records
    def opportunities(self) -> list[dict[str, Any]]:
        if self.crm == "salesforce":
            return self.pc.salesforce.list_records("Opportunity")
        return self.pc.dynamics365.rows("opportunities")

    def opportunity(self, crm_id: str) -> dict[str, Any]:
        if self.crm == "salesforce":
            return self.pc.salesforce.get_record("Opportunity", crm_id)
        return self.pc.dynamics365.row("opportunities", crm_id)

    def crm_id(self, record: dict[str, Any]) -> str:
        return str(record["Id"] if self.crm == "salesforce" else record["opportunityid"])

    def is_open(self, record: dict[str, Any]) -> bool:
        return not record.get("IsClosed") if self.crm == "salesforce" else record.get("statecode") == 0

    def crm_values(self, crm_id: str) -> dict[str, Any]:
        r, c = self.opportunity(crm_id), self.cols
        value = r[c["deal_value"]]
        out = {
            "deal_value": None if value is None else float(value),
            "notes": _text(r[c["notes"]]),
            "close_date": _text(str(r[c["close_date"]] or "")[:10]),
        }
        if self.crm == "salesforce":
            out["stage"] = SF_STAGES.get(r["StageName"], "active")
        return out

    def referral(self, referral_id: str) -> dict[str, Any]:
        return self.pc.partner_center.referrals[referral_id]

    # edits
    def microsoft_edit(self, referral_id: str, name: str, value: Any) -> None:
        emulator = self.pc.partner_center
        with emulator.lock:
            old = emulator.referrals[referral_id]
            new = copy.deepcopy(old)
            if name == "deal_value":
                new["details"]["dealValue"] = value
            elif name == "notes":
                new["details"]["notes"] = value
            elif name == "close_date":
                new["details"]["closingDateTime"] = f"{value}T00:00:00Z"
            elif name == "stage":
                assert value == "active" and old["status"] == "New"
                new.update(status="Active", substatus="Accepted")
            emulator._commit_update(old, new, "Microsoft")

    def seller_edit(self, crm_id: str, name: str, value: Any, rng: random.Random) -> None:
        if name == "stage":
            assert value == "active"
            column_value = rng.choice(SF_ACTIVE)
        else:
            column_value = value
        change = {self.cols[name]: column_value}
        if self.crm == "salesforce":
            self.pc.salesforce.user_edit("Opportunity", crm_id, change)
        else:
            self.pc.dynamics365.edit("opportunities", crm_id, change)

    def microsoft_shares(self, seed: int) -> None:
        """Microsoft shares a new incoming referral (the emulator's control API, in process)."""
        body = json.dumps({"seed": seed}).encode()
        request = Request("POST", "/_sandbox/referrals", Headers([("Content-Type", "application/json")]), body)
        response = self.pc.partner_center._microsoft_create(request)
        assert response.status == 201, response.body

    def flag(self, crm_id: str) -> None:
        change = {self.cols["flag"]: True}
        if self.crm == "salesforce":
            self.pc.salesforce.user_edit("Opportunity", crm_id, change)
        else:
            self.pc.dynamics365.edit("opportunities", crm_id, change)

    # faults and request logs
    def emulators(self) -> dict[str, Any]:
        crm_emulator = self.pc.salesforce if self.crm == "salesforce" else self.pc.dynamics365
        return {PC: self.pc.partner_center, CRM: crm_emulator}

    def clear_faults(self) -> None:
        for emulator in self.emulators().values():
            emulator.faults.clear()

    def clear_logs(self) -> None:
        for emulator in self.emulators().values():
            emulator.log.clear()

    def writes(self) -> list[str]:
        return [
            f"{name}: {e.method} {e.path} -> {e.status}"
            for name, emulator in self.emulators().items()
            for e in list(emulator.log)
            if e.method in WRITES and not e.path.startswith("/_sandbox/")
        ]

    # duplicates
    def counts(self) -> dict[str, Counter]:
        """Counters whose values must never exceed 1 (or the seed's own count, for accounts and
        contacts: the seeds may hold two with one name)."""
        refs = Counter(
            str(d.get("externalReferenceId")).lower()
            for d in self.pc.partner_center.referrals.values()
            if d.get("externalReferenceId")
        )
        opps = Counter(str(r.get(self.cols["link"])).lower() for r in self.opportunities() if r.get(self.cols["link"]))
        if self.crm == "salesforce":
            accounts = Counter(r["Name"].casefold() for r in self.pc.salesforce.list_records("Account"))
            contacts = Counter(
                str(r["Email"]).casefold() for r in self.pc.salesforce.list_records("Contact") if r.get("Email")
            )
        else:
            accounts = Counter(r["name"].casefold() for r in self.pc.dynamics365.rows("accounts"))
            rows = self.pc.dynamics365.rows("contacts")
            contacts = Counter(str(r["emailaddress1"]).casefold() for r in rows if r.get("emailaddress1"))
        return {"referrals": refs, "opportunities": opps, "accounts": accounts, "contacts": contacts}


@dataclass
class Edit:
    referral_id: str
    crm_id: str
    side: str
    field: str
    value: Any
    at_run: int  # the run it was made before (or during)
    mid_run: bool = False
    state: str = "pending"  # synced | lost | overwritten | pending


class Property:
    def __init__(self, pc, crm: str, store: StateStore, staging, seed: int) -> None:
        self.world = World(pc, crm)
        self.crm, self.store, self.staging, self.seed = crm, store, staging, seed
        self.rng = random.Random(seed)
        self.edits: list[Edit] = []
        self.run_no = 0
        self.faults_on = False
        self.log: list[str] = []  # what happened, for failure messages
        self.initial: dict[str, Counter] = {}
        self.armed: list[Any] = []
        self.injected: Counter = Counter()  # faults injected, by kind

    # -- inputs ---------------------------------------------------------------------------------
    def pairs(self) -> list[tuple[str, str]]:
        """Linked pairs both of whose records are open: the ones edited."""
        out = []
        for r in self.store.get_links(self.crm).itertuples():
            ref = self.world.pc.partner_center.referrals.get(r.referral_id)
            opp = self.world.opportunity(str(r.crm_id))
            if ref and ref["status"] in ("New", "Active") and opp and self.world.is_open(opp):
                out.append((r.referral_id, str(r.crm_id)))
        return out

    def value_for(self, name: str) -> Any:
        rng = self.rng
        if name == "deal_value":
            return float(rng.randrange(1_000, 900_000, 250))
        if name == "notes":
            return f"note {self.seed}.{rng.randrange(10**6)}"
        if name == "close_date":
            return (date.today() + timedelta(days=rng.randrange(20, 400))).isoformat()
        return "active"

    def both_sides(self) -> None:
        """Microsoft and the seller change the same field of one pair (a conflict)."""
        pairs = self.pairs()
        if pairs:
            pair, name = self.rng.choice(pairs), self.rng.choice(EDITED[self.crm][:3])
            self.edit(pair=pair, side=PC, name=name)
            self.edit(pair=pair, side=CRM, name=name)

    def edit(
        self,
        *,
        mid_run: bool = False,
        pair: tuple[str, str] | None = None,
        side: str | None = None,
        name: str | None = None,
    ) -> None:
        pairs = self.pairs()
        if not pairs:
            return
        rid, cid = pair or self.rng.choice(pairs)
        side = side or self.rng.choice([PC, CRM])
        name = name or self.rng.choice(EDITED[self.crm])
        value = self.value_for(name)
        now = pc_values(self.world.referral(rid)) if side == PC else self.world.crm_values(cid)
        if name == "stage" and (now["stage"] != "new" or (side == PC and self.world.referral(rid)["status"] != "New")):
            return  # only New -> Active is edited (a close would end the pair's syncing)
        if now[name] == value:
            return
        for e in self.edits:  # a pending edit of the same field on the same side is overwritten
            if e.state == "pending" and (e.referral_id, e.side, e.field) == (rid, side, name):
                e.state = "overwritten"
        if side == PC:
            self.world.microsoft_edit(rid, name, value)
        else:
            self.world.seller_edit(cid, name, value, self.rng)
        self.edits.append(Edit(rid, cid, side, name, value, self.run_no + 1, mid_run))
        self.log.append(f"edit {side} {name}={value!r} on {rid}{' (mid-run)' if mid_run else ''}")

    def new_records(self) -> None:
        if self.rng.random() < 0.5:
            self.world.microsoft_shares(self.rng.randrange(10**6))
            self.log.append("Microsoft shares a referral")
        else:
            candidates = [
                self.world.crm_id(r)
                for r in self.world.opportunities()
                if self.world.is_open(r) and not r.get(self.world.cols["flag"]) and not r.get(self.world.cols["link"])
            ]
            if candidates:
                crm_id = self.rng.choice(candidates)
                self.world.flag(crm_id)
                self.log.append(f"seller flags {crm_id}")

    def faults(self) -> None:
        """Faults on one or both emulators: throttling, 5xx, answers lost after processing."""
        self._disarm()
        chosen = self.rng.choice([[PC], [CRM], [PC, CRM]])
        for name in chosen:
            config = FaultConfig(
                seed=self.rng.randrange(10**6),
                rate_429=0.08,
                retry_after=0.0,
                rate_5xx=0.08,
                drop_after_rate=0.08,
                max_faults=self.rng.randrange(3, 12),
            )
            self.world.emulators()[name].faults.configure(config)
            self.armed.append(self.world.emulators()[name])
        self.faults_on = True
        self.log.append(f"faults on {chosen}")

    def no_faults(self) -> None:
        if self.faults_on:
            self.log.append("faults off")
        self._disarm()
        self.faults_on = False

    def _disarm(self) -> None:
        for emulator in self.armed:
            self.injected.update({k: v for k, v in emulator.faults.injected.items() if v and k != "latency"})
        self.armed = []
        self.world.clear_faults()

    # -- a run ----------------------------------------------------------------------------------
    def job(self) -> SyncJob:
        return scheduled_job(self.crm, self.store, self.staging, prefix=f"scheduled__prop{self.seed}")

    def run(self, *, interfere: bool = False) -> dict | None:
        """One run, its steps as the DAG's tasks; ``interfere``: Microsoft edits a referral the
        run is about to write (a 412), the seller an opportunity it is about to write."""
        self.run_no += 1
        job = self.job()
        touched: set[str] = set()
        failed = None
        report = None
        lease.acquire(job, self.store)
        try:
            for step in STEPS:
                pc_side, crm_side = quiet_sides(self.crm, job.mapping)
                with lease.kept(job, self.store):
                    if step == "extract_partner_center":
                        runner.extract_partner_center(job, pc_side, self.store)
                    elif step == "extract_crm":
                        runner.extract_crm(job, crm_side, self.store)
                    elif step == "plan_run":
                        runner.plan_run(job, self.store, pc_side, crm_side)
                    elif step == "load_crm":
                        if interfere:
                            touched |= self._interfere(job, "crm")
                        runner.load_crm(job, crm_side)
                    elif step == "load_partner_center":
                        if interfere:
                            touched |= self._interfere(job, "partner_center")
                        runner.load_partner_center(job, pc_side, crm_side)
                    else:
                        report = runner.commit(job, self.store)
        except Exception as exc:  # a task that failed for good: the run's lease is released
            if not self.faults_on:
                raise
            failed = f"{type(exc).__name__}: {exc}"
            lease.release(job, self.store)
        self.log.append(f"run {self.run_no} ({job.run_id}): {'failed: ' + failed if failed else report}")
        self.check(touched, failed is not None)
        return report

    def _interfere(self, job: SyncJob, target: str) -> set[str]:
        updates = runner.load_plan(job).updates(target)
        if not len(updates):
            return set()
        row = updates.iloc[self.rng.randrange(len(updates))]
        pair = (str(row["referral_id"]), str(row["crm_id"]))
        if pair not in self.pairs():
            return set()
        self.edit(mid_run=True, pair=pair, side=PC if target == "partner_center" else CRM)
        return {pair[0]}

    # -- invariants -----------------------------------------------------------------------------
    def check(self, touched: set[str], failed: bool) -> None:
        story = "\n".join(self.log)
        counts = self.world.counts()
        for kind, counter in counts.items():
            allowed = self.initial.get(kind, Counter())
            over = {k: n for k, n in counter.items() if n > max(1, allowed.get(k, 0))}
            assert not over, f"seed {self.seed}: duplicate {kind}: {over}\n{story}"
        links = self.store.get_links(self.crm)
        assert links["referral_id"].is_unique and links["crm_id"].str.lower().is_unique, links

        conflicts = self.store.audit(crm=self.crm, action="conflict", limit=None)
        dead = self.store.dead_letter(self.crm)
        dead_keys = {str(k).lower() for k in dead["record_key"]}
        for e in self.edits:
            if e.state != "pending":
                continue
            other = self.world.crm_values(e.crm_id) if e.side == PC else pc_values(self.world.referral(e.referral_id))
            if other[e.field] == e.value:
                e.state = "synced"
                continue
            winner = CRM if e.side == PC else PC
            rows = conflicts[(conflicts["referral_id"] == e.referral_id) & (conflicts["field"] == e.field)]
            if any(f"{e.side}={e.value!r}" in r.detail and f"{winner} wins" in r.detail for r in rows.itertuples()):
                e.state = "lost"
                continue
            excused = (
                (e.at_run == self.run_no and e.mid_run)
                or e.referral_id in touched
                or (self.faults_on and (failed or {e.referral_id.lower(), e.crm_id.lower()} & dead_keys))
            )
            assert excused, (
                f"seed {self.seed}, after run {self.run_no}: {e} is neither synced nor a lost conflict "
                f"(Partner Center: {pc_values(self.world.referral(e.referral_id))}, "
                f"CRM: {self.world.crm_values(e.crm_id)}, base: "
                f"{self.store.get_links(self.crm, referral_ids=[e.referral_id])['base'].tolist()}, "
                f"dead letter: {dead.to_dict('records')})\n{story}"
            )

    def converged(self) -> None:
        story = "\n".join(self.log)
        pending = [e for e in self.edits if e.state == "pending"]
        assert not pending, f"seed {self.seed}: pending after the faults stopped: {pending}\n{story}"
        dead = self.store.dead_letter(self.crm)
        assert not len(dead), f"seed {self.seed}: dead letter after convergence: {dead.to_dict('records')}\n{story}"
        links = self.store.get_links(self.crm)
        for r in links.itertuples():
            ref = self.world.referral(r.referral_id)
            if ref["status"] == "Closed":
                continue
            pc_now, crm_now = pc_values(ref), self.world.crm_values(str(r.crm_id))
            for name in EDITED[self.crm]:
                assert pc_now[name] == crm_now[name] == r.base[name], (
                    f"seed {self.seed}: {name} of {r.referral_id}: Partner Center {pc_now[name]!r}, "
                    f"CRM {crm_now[name]!r}, base {r.base[name]!r}\n{story}"
                )


def seed_sandbox(pc, crm: str, seed: int) -> None:
    pc.partner_center.seed(6, seed=seed)
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    emulator.seed(opportunities=6, accounts=3, flagged=2, seed=seed)


CASES = [("salesforce", 11), ("salesforce", 12), ("dynamics365", 13), ("dynamics365", 14)]
ROUNDS = 5


@pytest.mark.parametrize("crm, seed", CASES)
def test_random_edits_faults_and_runs_lose_nothing_duplicate_nothing_and_converge(
    pc, conns, store, tmp_path, crm, seed
):
    p = Property(pc, crm, store, tmp_path / "staging", seed)
    seed_sandbox(pc, crm, seed)
    p.initial = p.world.counts()
    p.run()  # the initial load
    for _ in range(ROUNDS):
        for _ in range(p.rng.randrange(2, 6)):
            p.edit()
        if p.rng.random() < 0.6:
            p.both_sides()
        if p.rng.random() < 0.4:
            p.new_records()
        if p.rng.random() < 0.5:
            p.faults()
        else:
            p.no_faults()
        p.run(interfere=p.rng.random() < 0.5)
    p.no_faults()
    p.run()
    p.converged()
    if any(e.mid_run and e.side == PC for e in p.edits):  # the 412 path was taken
        assert 412 in {e.status for e in pc.partner_center.requests_matching("PATCH")}, "\n".join(p.log)
    p.world.clear_logs()
    report = p.run()
    assert p.world.writes() == [], f"seed {seed}: writes after convergence ({report})\n" + "\n".join(p.log)
