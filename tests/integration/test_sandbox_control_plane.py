"""The sandbox control plane over HTTPS: reset, seed, Microsoft-side edits, state, faults."""

from __future__ import annotations

import socket
import time

import pytest
import requests


@pytest.fixture
def cp(pc):
    ca = str(pc.pki.ca_cert)
    base = pc.origin("partner_center")

    def call(method: str, path: str, **kwargs):
        return requests.request(method, f"{base}/_sandbox/{path}", verify=ca, timeout=30, **kwargs)

    return call


def test_seed_state_and_reset(pc, cp):
    ids = cp("POST", "seed", json={"count": 50, "seed": 4}).json()["ids"]
    assert len(ids) == len(set(ids)) == 50
    state = cp("GET", "state").json()
    assert state["referrals"] == 50 and sum(state["byStatus"].values()) == 50
    assert len(state["byStatus"]) >= 4  # a realistic mix of statuses
    assert cp("POST", "reset").status_code == 204
    assert cp("GET", "state").json()["referrals"] == 0


def test_seeding_is_reproducible(pc, cp):
    def snapshot():
        docs = cp("GET", "referrals").json()["value"]
        return [(d["id"], d["name"], d["status"], d["substatus"], d["details"]["dealValue"]) for d in docs]

    cp("POST", "seed", json={"count": 5, "seed": 9})
    first = snapshot()
    cp("POST", "reset")
    cp("POST", "seed", json={"count": 5, "seed": 9})
    assert snapshot() == first
    cp("POST", "reset")
    cp("POST", "seed", json={"count": 5, "seed": 10})
    assert snapshot() != first


def test_microsoft_edits_change_state_and_fire_events(pc, cp):
    created = cp("POST", "referrals", json={"name": "Incoming from Microsoft"})
    assert created.status_code == 201
    rid = created.json()["id"]
    assert created.json()["direction"] == "Incoming" and created.json()["status"] == "New"
    accepted = cp("POST", f"referrals/{rid}/microsoft-edit", json={"action": "accept"}).json()
    assert (accepted["status"], accepted["substatus"]) == ("Active", "Accepted") and accepted["acceptedDateTime"]
    won = cp(
        "POST", f"referrals/{rid}/microsoft-edit", json={"action": "win", "changes": {"details": {"dealValue": 5}}}
    )
    assert won.json()["substatus"] == "Won" and won.json()["details"]["dealValue"] == 5
    terminal = cp("POST", f"referrals/{rid}/microsoft-edit", json={"action": "update"})
    assert terminal.status_code == 400 and "terminal" in terminal.json()["error"]["message"]
    names = [e["EventName"] for e in pc.partner_center.events_fired]
    assert names == ["referral-created", "referral-updated", "referral-updated"]
    assert cp("POST", f"referrals/{rid}/microsoft-edit", json=["not", "an", "object"]).status_code == 400


def test_latency_fault_is_injected_and_measured(pc, hook, cp):
    cp("POST", "seed", json={"count": 3})
    list(hook.list_referrals())  # token and connection warm
    cp("POST", "faults", json={"seed": 1, "latency_ms": [300, 300], "path_prefix": "/v1.0"})
    started = time.monotonic()
    list(hook.list_referrals())
    assert time.monotonic() - started >= 0.3
    faults = cp("GET", "faults").json()
    assert faults["injected"]["latency"] == 1
    assert cp("DELETE", "faults").status_code == 204
    assert cp("GET", "faults").json()["faults"]["latency_ms"] == [0, 0]


def test_requests_log_records_api_calls(pc, hook, cp):
    cp("DELETE", "requests")
    list(hook.list_referrals())
    logged = cp("GET", "requests").json()["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in logged] == [("GET", "/v1.0/engagements/referrals", 200)]


def test_unknown_path_and_wrong_method(pc, cp, hook):
    token = hook.get_token(hook.settings.referrals_scope)
    headers = {"Authorization": f"Bearer {token}"}
    ca = str(pc.pki.ca_cert)
    base = pc.origin("partner_center")
    missing = requests.get(f"{base}/v1.0/engagements/referrals/does-not-exist", headers=headers, verify=ca, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "itemNotFound"
    wrong = requests.delete(f"{base}/v1.0/engagements/referrals/x", headers=headers, verify=ca, timeout=10)
    assert wrong.status_code == 405 and "PATCH" in wrong.headers["Allow"]


def test_answers_go_out_without_waiting_for_the_clients_ack(pc, monkeypatch):
    """Headers and body are two writes: with Nagle's algorithm the body would wait for the
    client's delayed ACK (~40 ms a request on Linux, which no real API adds and which would
    swamp a 50 ms latency benchmark). The emulators' sockets send at once (TCP_NODELAY)."""
    server = next(s for s in pc._servers if s.app.name == "partner_center")
    accepted = []
    real = server.get_request

    def get_request():
        sock, addr = real()
        accepted.append(sock)
        return sock, addr

    monkeypatch.setattr(server, "get_request", get_request)
    with requests.Session() as session:  # keep the connection open while its socket is inspected
        answer = session.get(f"{pc.origin('partner_center')}/_sandbox/state", verify=str(pc.pki.ca_cert), timeout=30)
        assert answer.status_code == 200 and answer.content
        assert accepted and accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
