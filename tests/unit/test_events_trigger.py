"""The inbox watcher's trigger and the event DAG's CRM selection, without a scheduler.

The trigger fires once for events no run was told about, waits for a burst to settle,
never fires again for events it already signalled (the condition must not stay true), and
fires again after ``_rearm`` when an event slipped behind its signal.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from cosell_sync.event_dag import _rearm, configured_crms
from cosell_sync.state import StateStore
from cosell_sync.triggers.inbox import SIGNAL_DAG, SIGNAL_SIDE, InboxTrigger

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", json.dumps({"conn_type": "generic", "host": url}))
    with StateStore(url) as s:
        s.migrate()
        yield s


def event(n: int, at: datetime) -> dict:
    return {
        "dedup_key": f"k{n}",
        "event_name": "referral-updated",
        "referral_id": f"r{n}",
        "resource_uri": f"https://api.partnercenter.microsoft.com/engagements/v1/referrals/r{n}",
        "received_at": at,
    }


def first_event(trigger: InboxTrigger, timeout: float = 3.0):
    """The trigger's first event, or None when it does not fire within ``timeout``."""

    async def go():
        agen = trigger.run()
        try:
            return await asyncio.wait_for(agen.__anext__(), timeout)
        except TimeoutError:
            return None
        finally:
            await agen.aclose()
            await trigger.cleanup()

    return asyncio.run(go())


def fast() -> InboxTrigger:
    return InboxTrigger(poll_interval=0.05, settle=0.05, max_wait=0.5)


def test_fires_once_for_new_events_and_not_again_for_the_same(store):
    assert first_event(fast(), timeout=0.5) is None  # an empty inbox fires nothing
    store.inbox_add([event(1, T0), event(2, T0 + timedelta(seconds=1))])
    fired = first_event(fast())
    assert fired is not None and fired.payload["pending"] == 2
    assert store.get_watermark(SIGNAL_DAG, SIGNAL_SIDE) == T0 + timedelta(seconds=1)
    # The events are still pending (no run claimed them yet): the restarted trigger stays quiet.
    assert first_event(fast(), timeout=0.5) is None
    store.inbox_add([event(3, T0 + timedelta(seconds=2))])
    assert first_event(fast()).payload["pending"] == 3


def test_a_burst_settles_into_one_signal(store):
    trigger = InboxTrigger(poll_interval=0.05, settle=0.2, max_wait=2.0)

    async def go():
        store.inbox_add([event(0, datetime.now(UTC))])
        agen = trigger.run()
        task = asyncio.ensure_future(agen.__anext__())
        for n in range(1, 5):  # more events while the trigger waits for quiet
            await asyncio.sleep(0.05)
            await asyncio.to_thread(store.inbox_add, [event(n, datetime.now(UTC))])
        fired = await asyncio.wait_for(task, 5)
        await agen.aclose()
        await trigger.cleanup()
        return fired

    fired = asyncio.run(go())
    assert fired.payload["pending"] == 5  # one signal for the whole burst


def test_rearm_lets_an_event_stamped_behind_the_signal_fire(store):
    store.inbox_add([event(1, T0 + timedelta(seconds=5))])
    assert first_event(fast()) is not None
    claimed = store.inbox_claim("run-1")
    store.inbox_add([event(2, T0)])  # stored late by a slower receiver, stamped before the signal
    store.inbox_done("run-1")
    assert first_event(fast(), timeout=0.5) is None
    _rearm(store, claimed_at=claimed[0]["claimed_at"])
    assert first_event(fast()).payload["pending"] == 1


def test_rearm_leaves_a_signal_given_after_the_claim(store):
    """An event that arrives while a run syncs is signalled by the trigger, which queues the
    next run (it claims the event): the run must not move that signal back, or the trigger
    fires again for the same event and an empty run is queued ahead of the next event's."""
    store.inbox_add([event(1, T0)])
    claimed = store.inbox_claim("run-1")
    store.inbox_add([event(2, T0 + timedelta(seconds=5))])  # arrives during run-1
    assert first_event(fast()).payload["pending"] == 1  # signalled: a next run is queued
    store.inbox_done("run-1")
    _rearm(store, claimed_at=claimed[0]["claimed_at"])
    assert first_event(fast(), timeout=0.5) is None  # not signalled twice
    _rearm(store)  # without the claim's time: moved back, as before
    assert first_event(fast()).payload["pending"] == 1


def test_configured_crms_skips_crms_without_a_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", json.dumps({"conn_type": "salesforce"}))
    monkeypatch.setenv("AIRFLOW__COSELL__EVENT_CRMS", "dynamics365,salesforce")
    assert configured_crms() == ["salesforce"]
    # Dynamics 365 under its id, or under the deprecated one (with a warning)
    dynamics = json.dumps({"conn_type": "dynamics365", "host": "https://org.crm.dynamics.com"})
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", dynamics)
    with pytest.warns(DeprecationWarning, match="dynamics365_default"):
        assert configured_crms() == ["dynamics365", "salesforce"]
    monkeypatch.delenv("AIRFLOW_CONN_DYNAMICS_DEFAULT")
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", dynamics)
    assert configured_crms() == ["dynamics365", "salesforce"]
    monkeypatch.setenv("AIRFLOW__COSELL__EVENT_CRMS", "salesforce,hubspot")
    with pytest.raises(ValueError, match="unknown CRM 'hubspot'"):
        configured_crms()
