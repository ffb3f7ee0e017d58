"""The /_sandbox/ endpoints every emulator shares (EmulatorApp in server.py), over HTTPS."""

from __future__ import annotations

import pytest
import requests

EMULATORS = ("entra", "partner_center", "dynamics365", "salesforce")


def control(pc, name: str, method: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(
        method, pc.origin(name) + "/_sandbox/" + path, json=body, verify=str(pc.pki.ca_cert), timeout=30
    )


@pytest.mark.parametrize("name", EMULATORS)
def test_every_emulator_has_the_shared_endpoints(pc, name):
    for method, path in (
        ("GET", "state"),
        ("GET", "config"),
        ("POST", "config"),
        ("GET", "limits"),
        ("POST", "limits"),
        ("GET", "faults"),
        ("GET", "requests"),
    ):
        resp = control(pc, name, method, path)
        assert resp.status_code == 200, (name, method, path, resp.text)
        assert isinstance(resp.json(), dict)
    assert control(pc, name, "POST", "age", {"seconds": 60}).json()["aged"] >= 0
    assert control(pc, name, "POST", "seed").status_code == 200
    assert control(pc, name, "POST", "reset").status_code == 204


@pytest.mark.parametrize("name", EMULATORS)
def test_a_control_request_the_emulator_cannot_take_is_400(pc, name):
    assert control(pc, name, "POST", "config", {"no_such_setting": 1}).status_code == 400
    assert control(pc, name, "POST", "limits", {"no_such_limit": 1}).status_code == 400
    assert control(pc, name, "POST", "seed", {"no_such_option": 1}).status_code == 400
    assert control(pc, name, "POST", "age", {}).status_code == 400
    resp = requests.post(pc.origin(name) + "/_sandbox/config", data=b"[1]", verify=str(pc.pki.ca_cert), timeout=30)
    assert resp.status_code == 400


def test_seed_and_age_over_http_reach_each_emulators_data(pc):
    assert len(control(pc, "partner_center", "POST", "seed", {"count": 3}).json()["ids"]) == 3
    assert len(control(pc, "dynamics365", "POST", "seed", {"opportunities": 2}).json()["opportunities"]) == 2
    assert len(control(pc, "salesforce", "POST", "seed", {"opportunities": 2}).json()["opportunities"]) == 2
    seeded = control(pc, "entra", "POST", "seed", {"clients": {"app-1": "s3cret"}, "users": {"u@example": "pw"}})
    assert seeded.json() == {"clients": ["app-1"], "users": ["u@example"]}
    assert pc.entra.clients["app-1"] == "s3cret"
    assert control(pc, "partner_center", "POST", "age", {"seconds": 60}).json() == {"aged": 3}
    assert control(pc, "salesforce", "POST", "age", {"seconds": 60}).json()["aged"] > 2


def test_limits_and_config_keep_each_emulators_shape(pc):
    assert control(pc, "salesforce", "POST", "limits", {"daily_api_requests": 50}).json()["limit"] == 50
    assert control(pc, "salesforce", "GET", "limits").json()["limit"] == 50
    assert control(pc, "dynamics365", "POST", "limits", {"requests": 100}).json()["requests"] == 100
    assert control(pc, "dynamics365", "GET", "config").json()["closed_opportunity_writes"] == "allow"
    state = control(pc, "partner_center", "POST", "config", {"nextlink_style": "clean"}).json()
    assert state["nextlinkStyle"] == "clean"
    assert control(pc, "entra", "POST", "config", {"token_lifetime": 60}).json()["token_lifetime"] == 60
