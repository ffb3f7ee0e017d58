"""Run leases in the state DB (isolated runs): acquire, re-enter, refuse, expire, renew, release, fence.

Each test runs on SQLite and on PostgreSQL (a fresh database per test; tests/unit/conftest.py),
without Airflow.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from cosell_sync.state import SCHEMA_VERSION, LeaseHeldError, LeaseLostError, StateStore
from cosell_sync.state import schema as schema_module
from cosell_sync.state import values as values_module

SF, DYN = "salesforce", "dynamics365"
SCHED, EVENTS = "cosell_sync_salesforce", "cosell_referral_events.salesforce"
TTL = timedelta(minutes=30)
T0 = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """The store's clock, moved by hand: ``clock.now += timedelta(...)``."""

    class Clock:
        now = T0

    c = Clock()
    monkeypatch.setattr(values_module, "now", lambda: c.now)
    return c


def test_a_v2_database_gets_the_lease_table_and_keeps_its_data(db_url: str, monkeypatch: pytest.MonkeyPatch):
    with StateStore(db_url) as st:
        with monkeypatch.context() as m:
            m.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:2])
            m.setattr(schema_module, "SCHEMA_VERSION", 2)
            assert st.migrate() == 2
        assert "cosell_leases" not in sa.inspect(st.engine).get_table_names()
        st.upsert_links(SF, pd.DataFrame([{"referral_id": "R1", "crm_id": "C1", "base": {"name": "d"}}]), "run-1")
        assert st.migrate() == SCHEMA_VERSION
        assert "cosell_leases" in sa.inspect(st.engine).get_table_names()
        assert st.get_links(SF)["referral_id"].tolist() == ["R1"]
        assert st.get_lease(SF) is None


def test_acquire_is_reentrant_for_its_run_and_renews(store: StateStore, clock):
    first = store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    assert (first.dag_id, first.run_id, first.epoch, first.expires_at) == (SCHED, "scheduled__1", 1, T0 + TTL)
    assert first.live(T0) and first.holder() == f"{SCHED} run scheduled__1"
    clock.now = T0 + timedelta(minutes=10)
    again = store.acquire_lease(SF, SCHED, "scheduled__1", TTL)  # a retried or cleared task of the run
    assert again.epoch == 1 and again.acquired_at == T0 and again.expires_at == clock.now + TTL
    assert store.get_lease(SF) == again


def test_another_run_is_refused_while_the_lease_is_live(store: StateStore, clock):
    held = store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    clock.now = T0 + TTL - timedelta(seconds=1)
    with pytest.raises(LeaseHeldError, match=rf"{SCHED} run scheduled__1") as info:
        store.acquire_lease(SF, EVENTS, "asset_triggered__1", TTL)
    assert info.value.lease == held
    # the same run id under another DAG is another run
    with pytest.raises(LeaseHeldError):
        store.acquire_lease(SF, EVENTS, "scheduled__1", TTL)
    assert store.get_lease(SF) == held
    # one lease per CRM: the other CRM is free
    assert store.acquire_lease(DYN, "cosell_sync_dynamics365", "scheduled__9", TTL).epoch == 1


def test_an_expired_lease_passes_to_the_next_run_and_the_old_holder_has_lost_it(store: StateStore, clock):
    store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    clock.now = T0 + TTL  # its holder died: nothing renewed it
    taken = store.acquire_lease(SF, EVENTS, "asset_triggered__1", TTL)
    assert (taken.dag_id, taken.run_id, taken.epoch, taken.acquired_at) == (EVENTS, "asset_triggered__1", 2, T0 + TTL)
    with pytest.raises(LeaseLostError, match=r"no longer holds the salesforce lease.*asset_triggered__1"):
        store.renew_lease(SF, SCHED, "scheduled__1", 1, TTL)
    with pytest.raises(LeaseHeldError):  # a later task of the old run never steals a live lease
        store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    assert store.get_lease(SF) == taken


def test_renew_extends_and_takes_back_an_expired_lease_nobody_took(store: StateStore, clock):
    store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    clock.now = T0 + timedelta(minutes=20)
    renewed = store.renew_lease(SF, SCHED, "scheduled__1", 1, TTL)
    assert renewed.expires_at == clock.now + TTL and renewed.epoch == 1
    clock.now += TTL + timedelta(minutes=5)  # expired, but no other run came
    assert store.renew_lease(SF, SCHED, "scheduled__1", 1, TTL).live(clock.now)
    with pytest.raises(LeaseLostError):  # a wrong epoch is a lost lease
        store.renew_lease(SF, SCHED, "scheduled__1", 7, TTL)
    with pytest.raises(LeaseLostError, match="nobody holds it"):
        store.renew_lease(DYN, SCHED, "scheduled__1", 1, TTL)
    with pytest.raises(ValueError, match="positive"):
        store.renew_lease(SF, SCHED, "scheduled__1", 1, timedelta(0))


def test_only_the_holder_releases_and_a_released_lease_is_free(store: StateStore, clock):
    store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    assert store.release_lease(SF, EVENTS, "asset_triggered__1") is False
    assert store.release_lease(SF, SCHED, "scheduled__2") is False
    assert store.get_lease(SF).live(clock.now)
    clock.now = T0 + timedelta(minutes=1)
    assert store.release_lease(SF, SCHED, "scheduled__1") is True
    assert store.release_lease(SF, SCHED, "scheduled__1") is False  # once
    released = store.get_lease(SF)
    assert not released.live(clock.now) and released.released_at == clock.now
    # a released lease nobody took: its holder's renewal without revive leaves it released
    assert store.renew_lease(SF, SCHED, "scheduled__1", 1, TTL, revive=False).released_at == clock.now
    assert not store.get_lease(SF).live(clock.now)
    # ... and the holder taking it back keeps the epoch (nobody read or committed in between)
    assert store.acquire_lease(SF, SCHED, "scheduled__1", TTL).epoch == 1
    assert store.release_lease(SF, SCHED, "scheduled__1")
    taken = store.acquire_lease(SF, EVENTS, "asset_triggered__1", TTL)  # no waiting for the expiry
    assert taken.epoch == 2 and taken.live(clock.now)


def test_acquire_leases_takes_all_or_none(store: StateStore, clock):
    store.acquire_lease(DYN, "cosell_sync_dynamics365", "scheduled__1", TTL)
    wanted = {SF: EVENTS, DYN: "cosell_referral_events.dynamics365"}
    with pytest.raises(LeaseHeldError, match="dynamics365 lease is held by cosell_sync_dynamics365 run scheduled__1"):
        store.acquire_leases(wanted, "asset_triggered__1", TTL)
    assert store.get_lease(SF) is None  # nothing taken
    store.release_lease(DYN, "cosell_sync_dynamics365", "scheduled__1")
    taken = store.acquire_leases(wanted, "asset_triggered__1", TTL)
    assert {crm: (lease.dag_id, lease.epoch) for crm, lease in taken.items()} == {
        SF: (EVENTS, 1),
        DYN: ("cosell_referral_events.dynamics365", 2),
    }


def test_commit_run_is_fenced_by_the_lease(store: StateStore, clock):
    links = pd.DataFrame([{"referral_id": "R1", "crm_id": "C1", "base": {"name": "new"}}])
    old = store.acquire_lease(SF, SCHED, "scheduled__1", TTL)
    clock.now = T0 + TTL
    store.acquire_lease(SF, EVENTS, "asset_triggered__1", TTL)  # the old holder's lease expired
    failures = {"pc_to_crm": [{"record_key": "R2", "payload": {}, "error": "400"}]}
    with pytest.raises(LeaseLostError):
        store.commit_run(
            dag_id=SCHED,
            run_id="scheduled__1",
            crm=SF,
            links=links,
            failures=failures,
            summary={"created": 1},
            watermarks={"crm": T0},
            lease_epoch=old.epoch,
        )
    assert store.get_links(SF).empty  # nothing landed: no link, failure, summary or watermark
    assert store.dead_letter(SF).empty
    assert store.get_run(SCHED, "scheduled__1") is None
    assert store.get_watermark(SCHED, "crm") is None
    store.commit_run(dag_id=EVENTS, run_id="asset_triggered__1", crm=SF, links=links, lease_epoch=2)
    assert store.get_links(SF)["base"].tolist() == [{"name": "new"}]
    # without a lease epoch (a caller that takes none) the commit is not checked
    store.commit_run(dag_id=SCHED, run_id="other", crm=DYN, links=links)


def test_concurrent_acquirers_get_one_lease(db_url: str, store: StateStore):
    stores = [StateStore(db_url) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []
    refused: list[str] = []

    def contend(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            stores[i].acquire_lease(SF, SCHED, f"run-{i}", TTL)
            won.append(f"run-{i}")
        except LeaseHeldError as exc:
            refused.append(exc.lease.run_id)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for st in stores:
        st.close()
    assert len(won) == 1 and len(refused) == len(stores) - 1
    assert set(refused) == set(won) and store.get_lease(SF).run_id == won[0]


LEASE_PROCS, LEASE_ROUNDS = 3, 8


def _leased_increment_worker(url: str, proc: int, barrier, results) -> None:
    """Each round: take the lease (waiting while another run holds it), read R1's base, commit it
    plus one under the lease's epoch, release."""
    try:
        with StateStore(url) as st:
            barrier.wait(timeout=60)
            waited = 0
            for i in range(LEASE_ROUNDS):
                run_id = f"p{proc}-run{i}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        lease = st.acquire_lease(SF, SCHED, run_id, TTL)
                        break
                    except LeaseHeldError:
                        waited += 1
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.005)
                n = st.get_links(SF, referral_ids=["R1"])["base"].iloc[0]["n"]
                row = {"referral_id": "R1", "crm_id": "C1", "base": {"n": n + 1}}
                st.commit_run(dag_id=SCHED, run_id=run_id, crm=SF, links=pd.DataFrame([row]), lease_epoch=lease.epoch)
                assert st.release_lease(SF, SCHED, run_id)
        results.put((proc, waited))
    except BaseException as exc:
        results.put((proc, repr(exc)))


def test_leased_read_and_commit_from_three_processes_loses_no_update(db_url: str, store: StateStore):
    """Run isolation across processes: every run reads the base under the lease and commits on it, so
    no run's update is lost (without the lease, two runs reading the same base would lose one)."""
    store.upsert_links(SF, pd.DataFrame([{"referral_id": "R1", "crm_id": "C1", "base": {"n": 0}}]), "seed")
    store.acquire_lease(SF, SCHED, "seed", TTL)  # the lease row exists: every run takes it over
    assert store.release_lease(SF, SCHED, "seed")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(LEASE_PROCS), ctx.Queue()
    procs = [
        ctx.Process(target=_leased_increment_worker, args=(db_url, n, barrier, results)) for n in range(LEASE_PROCS)
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, int) for v in outcomes.values()), outcomes
    assert [p.exitcode for p in procs] == [0] * LEASE_PROCS
    assert store.get_links(SF)["base"].tolist() == [{"n": LEASE_PROCS * LEASE_ROUNDS}]
    lease = store.get_lease(SF)
    assert lease.epoch == 1 + LEASE_PROCS * LEASE_ROUNDS and not lease.live()  # each run took it over once
