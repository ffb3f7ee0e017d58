"""The Salesforce emulator answers values the real API rejects per record (an out-of-range
number, a string too long) in the record's own result, never with a 500 for the call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from simple_salesforce import Salesforce

from cosell_sandbox.salesforce import SalesforceEmulator
from cosell_sandbox.server import EmulatorServer
from cosell_sandbox.tls import SandboxPKI

OPP = {"attributes": {"type": "Opportunity"}, "StageName": "Prospecting", "CloseDate": "2026-06-30"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPKI:
    return SandboxPKI.ensure(tmp_path_factory.mktemp("salesforce-ranges-pki"))


@pytest.fixture(scope="module")
def server(pki: SandboxPKI) -> Iterator[EmulatorServer]:
    srv = EmulatorServer(SalesforceEmulator(), pki.server_context()).start()
    yield srv
    srv.stop()


@pytest.fixture
def emu(server: EmulatorServer, pki: SandboxPKI, monkeypatch: pytest.MonkeyPatch) -> Iterator[SalesforceEmulator]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    app = server.app
    assert isinstance(app, SalesforceEmulator)
    app.reset()
    yield app
    app.reset()


@pytest.fixture
def sf(emu: SalesforceEmulator, server: EmulatorServer, pki: SandboxPKI) -> Salesforce:
    session = requests.Session()
    session.verify = str(pki.ca_cert)
    return Salesforce(instance_url=server.origin, session_id=emu.access_token, session=session)


def _records(n: int) -> list[dict[str, Any]]:
    return [{**OPP, "Name": f"Deal {i}", "Amount": 1000 + i} for i in range(n)]


@pytest.mark.parametrize("amount", [1e300, -1e300, 1e18, 1.7976931348623157e308])
def test_out_of_range_amount_is_answered_per_record(sf: Salesforce, emu: SalesforceEmulator, amount: float) -> None:
    records = _records(200)
    records[42]["Amount"] = amount
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": records})
    assert len(results) == 200
    assert results[42]["success"] is False and "id" not in results[42]
    (error,) = results[42]["errors"]
    assert error["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    assert error["fields"] == ["Amount"]
    assert error["message"].startswith("Amount: value outside of valid range on numeric field: ")
    assert all(r["success"] for i, r in enumerate(results) if i != 42)
    assert len(emu.list_records("Opportunity")) == 199


def test_out_of_range_amount_on_update_and_upsert(sf: Salesforce, emu: SalesforceEmulator) -> None:
    created = sf.restful("composite/sobjects", method="POST", json={"records": _records(3)})
    ids = [r["id"] for r in created]
    updates = [
        {"attributes": {"type": "Opportunity"}, "id": i, "Amount": a} for i, a in zip(ids, (5, 1e300, 6), strict=True)
    ]
    results = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": False, "records": updates})
    assert [r["success"] for r in results] == [True, False, True]
    assert results[1]["id"] == ids[1]
    assert results[1]["errors"][0]["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    stored = emu.get_record("Opportunity", ids[1])
    assert stored is not None and stored["Amount"] == 1001.0
    # the all-or-none form rolls back the others, still answering 200 per record
    results = sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": True, "records": updates})
    assert results[1]["errors"][0]["statusCode"] == "NUMBER_OUTSIDE_VALID_RANGE"
    assert {r["errors"][0]["statusCode"] for i, r in enumerate(results) if i != 1} == {
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    }


def test_string_too_long_is_answered_per_record(sf: Salesforce, emu: SalesforceEmulator) -> None:
    records = _records(5)
    records[3]["Name"] = "x" * 121
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": records})
    assert [r["success"] for r in results] == [True, True, True, False, True]
    assert results[3]["errors"][0]["statusCode"] == "STRING_TOO_LONG"
    assert results[3]["errors"][0]["fields"] == ["Name"]
