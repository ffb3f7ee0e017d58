"""Issue 11, interleaving test: an event-driven run and a scheduled run on the same CRM,
the second started at every step boundary of the first, with seller and Microsoft edits
made between the first run's steps.

The second run must wait (the CRM's lease is held: it reads and writes nothing, as a DAG
run that is rescheduled), and run once the first committed. The final state must equal the
serial outcome computed from the merge rules and the mapping's authorities, every edit must
be synced (the other side held it at some point) or audited as the losing side of a
conflict, and the base of every field must never move back to a superseded value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import pytest

from cosell_sync import pipeline as runner
from cosell_sync.pipeline import SyncJob, lease
from cosell_sync.state import LeaseHeldError, StateStore
from tests.integration.sync_jobs import event_job, quiet_sides, scheduled_job

CRMS = ["salesforce", "dynamics365"]
EVENTS = "cosell_referral_events"
PC, CRM = "partner_center", "crm"
FIELDS = ("name", "deal_value", "close_date", "notes")
# Where run A can be interrupted: the boundary before each of its steps (and, 6, after its commit).
STEPS = ("extract_partner_center", "extract_crm", "plan_run", "load_crm", "load_partner_center", "commit")
BOUNDARIES = (
    "before_extract",
    "between_extracts",
    "after_extract",
    "after_plan",
    "after_load_crm",
    "before_commit",  # after load_partner_center
)
AFTER_COMMIT = len(STEPS)
LOAD_CRM_DONE, LOAD_PC_DONE = STEPS.index("load_crm") + 1, STEPS.index("load_partner_center") + 1
_runs = itertools.count(1)


def run_step(job: SyncJob, store: StateStore, name: str) -> Any:
    """One of the DAG's steps for ``job`` (its lease taken), under the lease like its task."""
    pc_side, crm_side = quiet_sides(job.crm, job.mapping)
    work = {
        "extract_partner_center": lambda: runner.extract_partner_center(job, pc_side, store),
        "extract_crm": lambda: runner.extract_crm(job, crm_side, store),
        "plan_run": lambda: runner.plan_run(job, store, pc_side, crm_side),
        "load_crm": lambda: runner.load_crm(job, crm_side),
        "load_partner_center": lambda: runner.load_partner_center(job, pc_side, crm_side),
        "commit": lambda: runner.commit(job, store),
    }[name]
    with lease.kept(job, store):
        return work()


def full_run(job: SyncJob, store: StateStore) -> dict:
    lease.acquire(job, store)
    report = None
    for name in STEPS:
        report = run_step(job, store, name)
    return report


# -- reading and editing both sides ---------------------------------------------------------------
def _text(value: Any) -> Any:
    return None if value in ("", None) else value


def read_pc(pc, crm: str, referral_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The referrals' canonical values, read from the emulator (checked against the product's
    normalization once the pairs are settled)."""
    out = {}
    with pc.partner_center.lock:
        for rid in referral_ids:
            doc = pc.partner_center.referrals[rid]
            details = doc["details"]
            out[rid] = {
                "name": doc["name"],
                "deal_value": None if details.get("dealValue") is None else float(details["dealValue"]),
                "close_date": _text((details.get("closingDateTime") or "")[:10]),
                "notes": _text(details.get("notes")),
            }
    return out


def read_crm(pc, crm: str, crm_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The opportunities' canonical values, read from the emulator (CRM id in lower case)."""
    columns = CRM_COLUMNS[crm]
    out = {}
    for crm_id in crm_ids:
        if crm == "salesforce":
            record = pc.salesforce.get_record("Opportunity", crm_id)
        else:
            record = pc.dynamics365.row("opportunities", crm_id)
        value = record[columns["deal_value"]]
        out[crm_id.lower()] = {
            "name": record[columns["name"]],
            "deal_value": None if value is None else float(value),
            "close_date": _text(str(record[columns["close_date"]] or "")[:10]),
            "notes": _text(record[columns["notes"]]),
        }
    return out


def microsoft_edit(pc, referral_id: str, values: dict[str, Any]) -> None:
    """A Microsoft seller edits the referral (canonical field -> value)."""
    emulator = pc.partner_center
    with emulator.lock:
        old = emulator.referrals[referral_id]
        new = {**old, "details": dict(old["details"])}
        for name, value in values.items():
            if name == "name":
                new["name"] = value
            elif name == "deal_value":
                new["details"]["dealValue"] = value
            elif name == "close_date":
                new["details"]["closingDateTime"] = f"{value}T00:00:00Z"
            elif name == "notes":
                new["details"]["notes"] = value
        emulator._commit_update(old, new, "Microsoft")


CRM_COLUMNS = {
    "salesforce": {"name": "Name", "deal_value": "Amount", "close_date": "CloseDate", "notes": "Description"},
    "dynamics365": {
        "name": "name",
        "deal_value": "estimatedvalue",
        "close_date": "estimatedclosedate",
        "notes": "description",
    },
}


def seller_edit(pc, crm: str, crm_id: str, values: dict[str, Any]) -> None:
    """A CRM user edits the opportunity (canonical field -> value)."""
    columns = {CRM_COLUMNS[crm][k]: v for k, v in values.items()}
    if crm == "salesforce":
        pc.salesforce.user_edit("Opportunity", crm_id, columns)
    else:
        pc.dynamics365.edit("opportunities", crm_id, columns)


# -- the scenario and its serial outcome ------------------------------------------------------------
@dataclass
class Edit:
    pair: str  # referral id
    side: str  # PC or CRM
    field: str
    value: Any
    synced: bool = False  # the other side was seen holding it


@dataclass
class Pair:
    referral_id: str
    crm_id: str
    base0: dict[str, Any]
    chains: dict[str, list[Any]] = field(default_factory=dict)  # field -> the bases it may go through, in order
    losers: list[Edit] = field(default_factory=list)  # edits that must be audited as a lost conflict
    prior: tuple[Edit, ...] = ()  # the edits made before A started

    def chain(self, name: str) -> list[Any]:
        return self.chains.get(name, [self.base0[name]])


class Scenario:
    """Edits on three linked pairs and, from the mapping's rules, the outcome of running A then B.

    Before A starts, on every pair: Microsoft changes the close date (A writes it to the CRM) and
    the seller renames the opportunity (A writes the name to Partner Center).
    At boundary ``k`` of A, on pair ``same`` (same fields on both sides, and the fields A is
    writing): both sides change the deal value (the CRM wins by authority), the seller changes
    the close date A writes to the CRM, Microsoft renames the referral A writes the name to.
    On pair ``diff`` (different fields): Microsoft edits the notes, the seller the deal value.
    At boundary ``k + 1`` (after A's commit if ``k`` is the last), pair ``late`` gets the edits
    of ``same``.
    """

    def __init__(self, pc, crm: str, pairs: list[Pair], k: int) -> None:
        self.pc, self.crm, self.k = pc, crm, k
        self.same, self.diff, self.late = pairs
        self.pairs = pairs
        self.edits: list[Edit] = []
        today = date.today()
        self.day = lambda n: (today + timedelta(days=n)).isoformat()

    def _do(self, pair: Pair, side: str, values: dict[str, Any]) -> list[Edit]:
        if side == PC:
            microsoft_edit(self.pc, pair.referral_id, values)
        else:
            seller_edit(self.pc, self.crm, pair.crm_id, values)
        made = [Edit(pair.referral_id, side, k, v) for k, v in values.items()]
        self.edits += made
        return made

    def prior(self) -> None:
        for i, pair in enumerate(self.pairs):
            [m] = self._do(pair, PC, {"close_date": self.day(300 + 10 * self.k + i)})
            [n] = self._do(pair, CRM, {"name": f"Renamed by the seller {self.k}.{i}"})
            pair.chains = {"close_date": [pair.base0["close_date"], m.value], "name": [pair.base0["name"], n.value]}
            pair.prior = (m, n)

    def at(self, boundary: int) -> None:
        if boundary == self.k:
            self._same_fields(self.same, boundary, "a")
            [t] = self._do(self.diff, PC, {"notes": f"Microsoft's notes {self.k}"})
            [y] = self._do(self.diff, CRM, {"deal_value": 4000.0 + self.k})
            self.diff.chains |= {
                "notes": [self.diff.base0["notes"], t.value],
                "deal_value": [self.diff.base0["deal_value"], y.value],
            }
        if boundary == self.k + 1:
            self._same_fields(self.late, boundary, "b")

    def _same_fields(self, pair: Pair, boundary: int, tag: str) -> None:
        m, n = pair.prior
        [x1] = self._do(pair, PC, {"deal_value": 1000.0 + self.k})
        [nm] = self._do(pair, PC, {"name": f"Renamed by Microsoft {self.k}{tag}"})
        [x2] = self._do(pair, CRM, {"deal_value": 2000.0 + self.k})
        [c] = self._do(pair, CRM, {"close_date": self.day(100 + self.k)})
        # Both sides changed the deal value at once: a conflict, won by the CRM (authority crm).
        pair.chains["deal_value"] = [pair.base0["deal_value"], x2.value]
        pair.losers.append(x1)
        # The seller's close date: after A wrote Microsoft's to the CRM it is a later one-sided
        # change; before, both changed it since the base: a conflict, won by the CRM.
        if boundary >= LOAD_CRM_DONE:
            pair.chains["close_date"] = [pair.base0["close_date"], m.value, c.value]
        else:
            pair.chains["close_date"] = [pair.base0["close_date"], c.value]
            pair.losers.append(m)
        # Microsoft's name: after A wrote the seller's name to Partner Center it is a later
        # one-sided change; before, a conflict won by the CRM (authority crm).
        if boundary >= LOAD_PC_DONE:
            pair.chains["name"] = [pair.base0["name"], n.value, nm.value]
        else:
            pair.losers.append(nm)


# -- checks -----------------------------------------------------------------------------------------
class Checker:
    def __init__(self, crm: str, store: StateStore, scenario: Scenario) -> None:
        self.crm, self.store, self.scenario = crm, store, scenario
        self.reached: dict[tuple[str, str], int] = {}  # (pair, field) -> index in its chain

    def sides_now(self) -> tuple[dict, dict]:
        pairs, pc = self.scenario.pairs, self.scenario.pc
        return (
            read_pc(pc, self.crm, [p.referral_id for p in pairs]),
            read_crm(pc, self.crm, [p.crm_id for p in pairs]),
        )

    def mark_synced(self) -> None:
        """Edits whose value the other side holds now were synced."""
        pc_now, crm_now = self.sides_now()
        by_pair = {p.referral_id: p for p in self.scenario.pairs}
        for e in self.scenario.edits:
            other = crm_now[by_pair[e.pair].crm_id.lower()] if e.side == PC else pc_now[e.pair]
            if other[e.field] == e.value:
                e.synced = True

    def bases(self, when: str, *, last: bool = False) -> None:
        """Each field's base is on its chain of agreed values, never behind where it was
        (``last``: at the chain's end)."""
        links = self.store.get_links(self.crm, referral_ids=[p.referral_id for p in self.scenario.pairs])
        base_of = dict(zip(links["referral_id"], links["base"], strict=True))
        for pair in self.scenario.pairs:
            for name in FIELDS:
                chain = pair.chain(name)
                value = base_of[pair.referral_id][name]
                assert value in chain, f"{when}: base of {name} of {pair.referral_id} is {value!r}, not one of {chain}"
                index = chain.index(value)
                key = (pair.referral_id, name)
                assert index >= self.reached.get(key, 0), (
                    f"{when}: base of {name} of {pair.referral_id} moved back to {value!r} from "
                    f"{chain[self.reached[key]]!r}"
                )
                self.reached[key] = index
                if last:
                    assert index == len(chain) - 1, f"{when}: base of {name} of {pair.referral_id} is {value!r}"

    def final(self) -> None:
        pc_now, crm_now = self.sides_now()
        for pair in self.scenario.pairs:
            expected = {name: pair.chain(name)[-1] for name in FIELDS}
            assert pc_now[pair.referral_id] == expected, ("partner center", pair.referral_id)
            assert crm_now[pair.crm_id.lower()] == expected, ("crm", pair.crm_id)
        self.mark_synced()
        conflicts = self.store.audit(crm=self.crm, action="conflict", limit=None)
        losers = {id(e) for p in self.scenario.pairs for e in p.losers}
        for e in self.scenario.edits:
            if id(e) not in losers:
                assert e.synced, f"{e} was neither synced nor audited as a lost conflict"
                continue
            winner = CRM if e.side == PC else PC
            rows = conflicts[(conflicts["referral_id"] == e.pair) & (conflicts["field"] == e.field)]
            lost = [
                r for r in rows.itertuples() if f"{e.side}={e.value!r}" in r.detail and f"{winner} wins" in r.detail
            ]
            assert lost, f"{e} lost without a conflict in the audit: {rows.to_dict('records')}"


# -- the test ---------------------------------------------------------------------------------------
def seed(pc, crm: str) -> None:
    pc.partner_center.seed(8, seed=71)
    emulator = pc.salesforce if crm == "salesforce" else pc.dynamics365
    emulator.seed(opportunities=4, accounts=2, flagged=2, seed=71)


def settled_pairs(pc, crm: str, store: StateStore, staging) -> list[Pair]:
    """The first sync (and a second, so nothing is left to settle); three linked open pairs."""
    for _ in range(2):
        full_run(scheduled_job(crm, store, staging), store)
    links = store.get_links(crm)
    open_refs = [
        r for r in links.itertuples() if pc.partner_center.referrals[r.referral_id]["status"] in ("New", "Active")
    ]
    assert len(open_refs) >= 3, links
    chosen = open_refs[:3]
    pc_now = read_pc(pc, crm, [r.referral_id for r in chosen])
    crm_now = read_crm(pc, crm, [r.crm_id for r in chosen])
    pairs = []
    for r in chosen:
        held = pc_now[r.referral_id]
        assert held == crm_now[str(r.crm_id).lower()] == {f: r.base[f] for f in FIELDS}, (held, r.base)
        pairs.append(Pair(r.referral_id, str(r.crm_id), dict(held)))
    return pairs


def logged(pc) -> int:
    return sum(len(e.log) for e in (pc.partner_center, pc.salesforce, pc.dynamics365))


def current_pairs(pc, crm: str, pairs: list[Pair]) -> list[Pair]:
    """The same pairs, their agreed values (after the last run converged) as the new base."""
    pc_now = read_pc(pc, crm, [p.referral_id for p in pairs])
    return [Pair(p.referral_id, p.crm_id, dict(pc_now[p.referral_id])) for p in pairs]


def interleave(pc, crm: str, store: StateStore, staging, pairs: list[Pair], k: int, order: str) -> None:
    """Run A with B started at A's boundary ``k``; edits before A, at ``k`` and at ``k + 1``."""
    ids = [p.referral_id for p in pairs]

    def event(crm: str, store: StateStore, staging, ids: list[str]) -> SyncJob:
        return event_job(crm, staging, ids)

    def scheduled(crm: str, store: StateStore, staging, ids: list[str]) -> SyncJob:
        return scheduled_job(crm, store, staging)

    first, second = (event, scheduled) if order == "event_first" else (scheduled, event)
    scenario = Scenario(pc, crm, pairs, k)
    checker = Checker(crm, store, scenario)
    checker.bases("before any edit", last=True)

    scenario.prior()
    a = first(crm, store, staging, ids)
    assert lease.acquire(a, store) is not None
    for boundary, step in enumerate(STEPS):
        checker.mark_synced()
        if boundary >= k:  # B is started now (and rescheduled at every later boundary): it must wait
            b = second(crm, store, staging, ids)
            before, held = logged(pc), store.get_lease(crm)
            with pytest.raises(LeaseHeldError, match=a.run_id):
                lease.acquire(b, store)
            assert b.lease_epoch is None and store.get_lease(crm) == held
            assert logged(pc) == before, "a waiting run sent requests"
            assert not b.folder.exists(), "a waiting run staged data"
        scenario.at(boundary)
        run_step(a, store, step)
    checker.bases(f"after A's commit ({a.run_id}, B started at {BOUNDARIES[k]})")
    assert not store.get_lease(crm).live()

    checker.mark_synced()
    scenario.at(AFTER_COMMIT)
    b = second(crm, store, staging, ids)  # B's reschedule finds the lease free
    assert lease.acquire(b, store) is not None
    for step in STEPS:
        run_step(b, store, step)
    checker.bases(f"after B's commit ({b.run_id}, B started at {BOUNDARIES[k]})", last=True)
    checker.final()


# Salesforce: both orders at every boundary. Dynamics 365 (slower): every boundary, the order
# alternating (event run first at even boundaries, scheduled run first at odd ones).
ORDERS = {
    "event_first": ["event_first"] * len(BOUNDARIES),
    "scheduled_first": ["scheduled_first"] * len(BOUNDARIES),
    "alternating": ["event_first", "scheduled_first"] * (len(BOUNDARIES) // 2),
}


@pytest.mark.parametrize(
    "crm, orders",
    [("salesforce", "event_first"), ("salesforce", "scheduled_first"), ("dynamics365", "alternating")],
)
def test_a_run_started_at_any_step_boundary_of_another_waits_and_the_outcome_is_serial(
    pc, conns, store, tmp_path, crm, orders
):
    seed(pc, crm)
    staging = tmp_path / "staging"
    pairs = settled_pairs(pc, crm, store, staging)
    for k, order in enumerate(ORDERS[orders]):
        interleave(pc, crm, store, staging, pairs, k, order)
        pairs = current_pairs(pc, crm, pairs)
