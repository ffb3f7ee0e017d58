"""Microsoft's official Dataverse SDK (``PowerPlatform-Dataverse-Client`` 1.1.0, unmodified) against
the sandbox's Dataverse emulator, authenticated by ``azure-identity`` against the Entra emulator.

Every test asserts the rows the emulator stores, not only what the SDK answers.

SDK calls that run against the emulator (each exercised below):

* ``ClientSecretCredential(tenant, client_id, secret, authority=<entra>, disable_instance_discovery=True)``
  and ``DataverseClient(<dataverse origin>, credential)`` as a context manager;
* ``client.records.create(table, dict)`` (POST; the entity set resolved through ``EntityDefinitions``);
* ``client.records.retrieve(table, id, select=[...])``, ``client.records.get(table, id)``;
* ``client.records.update(table, id, dict)`` (PATCH with ``If-Match: *``);
* ``client.records.delete(table, id)``;
* ``client.records.create(table, [dict, ...])`` (``CreateMultiple``), choice columns given by label:
  the SDK reads ``EntityDefinitions(LogicalName=...)/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata
  ?$select=LogicalName&$expand=OptionSet($select=Options)`` and writes the option values;
* ``client.records.retrieve(table, id, select=[...], include_annotations="OData.Community.Display.V1.FormattedValue")``
  (the option label beside the value);
* ``client.records.update(table, [id, ...], [dict, ...])`` and ``(table, [id, ...], dict)`` (``UpdateMultiple``);
* ``client.records.upsert(table, [UpsertItem(alternate_key={"cosell_referralid": ...}, record=...)])``
  (one item: PATCH ``opportunities(cosell_referralid='...')``; several: ``UpsertMultiple``);
* ``client.query.builder(table).select(...).where(col(...) == ...).order_by(...).page_size(n).execute(by_page=True)``
  (``Prefer: odata.maxpagesize``, following ``@odata.nextLink``), and ``client.records.list(...)``;
* ``client.batch.new()`` with ``batch.records.create/update/retrieve``, a ``batch.changeset()`` with
  ``cs.records.create/update/delete`` and a ``$n`` reference, then ``batch.execute()``;
* ``client.tables.get(table)`` (``EntityDefinitions?$filter=LogicalName eq '...'``; ``None`` for an unknown one),
  ``client.tables.list(select=[...])`` (``$filter=IsPrivate eq false``),
  ``client.tables.list_columns(table, select=[...], filter="AttributeType eq 'Picklist'")``,
  ``client.tables.get_column(table, column)`` and ``client.tables.get_alternate_keys(table)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

azure_identity = pytest.importorskip("azure.identity")
dataverse = pytest.importorskip("PowerPlatform.Dataverse.client")

from PowerPlatform.Dataverse.core.errors import HttpError  # noqa: E402
from PowerPlatform.Dataverse.models.filters import col  # noqa: E402
from PowerPlatform.Dataverse.models.upsert import UpsertItem  # noqa: E402

CUSTOM_BASE = 858_880_000


@pytest.fixture
def client(pc: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    conn = pc.connections()["dynamics365_default"]
    # requests (under both azure-core and the SDK) trusts the sandbox CA through REQUESTS_CA_BUNDLE.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", conn["extra"]["ca_bundle"])
    for name in ("HTTPS_PROXY", "https_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    assert os.environ["REQUESTS_CA_BUNDLE"]
    credential = azure_identity.ClientSecretCredential(
        conn["extra"]["tenant_id"],
        conn["login"],
        conn["password"],
        authority=conn["extra"]["authority"],
        disable_instance_discovery=True,
    )
    with dataverse.DataverseClient(conn["host"], credential) as dv:
        yield dv


def rows(pc: Any, entity_set: str) -> dict[str, dict[str, Any]]:
    table = {"accounts": "accountid", "opportunities": "opportunityid", "contacts": "contactid"}[entity_set]
    return {row[table]: row for row in pc.dynamics365.rows(entity_set)}


def test_create_retrieve_update_delete(pc: Any, client: Any) -> None:
    account_id = client.records.create("account", {"name": "Contoso Ltd", "address1_city": "Redmond"})
    stored = pc.dynamics365.row("accounts", account_id)
    assert stored["name"] == "Contoso Ltd" and stored["address1_city"] == "Redmond"

    record = client.records.retrieve("account", account_id, select=["name", "address1_city"])
    assert record is not None and record["name"] == "Contoso Ltd" and record["address1_city"] == "Redmond"
    assert record.etag == f'W/"{stored["versionnumber"]}"'

    client.records.update("account", account_id, {"address1_city": "Oslo"})
    updated = pc.dynamics365.row("accounts", account_id)
    assert updated["address1_city"] == "Oslo" and updated["versionnumber"] > stored["versionnumber"]

    opportunity_id = client.records.create(
        "opportunity",
        {
            "name": "Contoso - Azure migration",
            "estimatedvalue": 125000.5,
            "parentaccountid@odata.bind": f"/accounts({account_id})",
            "salesstage": 1,
        },
    )
    opportunity = pc.dynamics365.row("opportunities", opportunity_id)
    assert opportunity["_parentaccountid_value"] == account_id and opportunity["salesstage"] == 1

    client.records.delete("opportunity", opportunity_id)
    client.records.delete("account", account_id)
    assert rows(pc, "accounts") == {} and rows(pc, "opportunities") == {}
    assert client.records.retrieve("account", account_id) is None  # 404 -> None

    with pytest.raises(HttpError) as err:  # an option the column does not have
        client.records.create("opportunity", {"name": "Bad stage", "salesstage": 7})
    assert err.value.status_code == 400 and "outside the valid range" in str(err.value)
    assert rows(pc, "opportunities") == {}


def test_query_builder_pages(pc: Any, client: Any) -> None:
    pc.dynamics365.seed(opportunities=23, flagged=0, seed=7)
    expected = sorted(r["name"] for r in pc.dynamics365.rows("opportunities"))
    pages = list(
        client.query.builder("opportunity")
        .select("name", "estimatedvalue")
        .where(col("statecode") == 0)
        .order_by("name")
        .page_size(5)
        .execute_pages()
    )
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    names = [record["name"] for page in pages for record in page]
    assert names == expected

    pages_read = [
        e
        for e in pc.dynamics365.requests_matching("GET", "/api/data/v9.2/opportunities")
        if e.path.endswith("opportunities")
    ]
    assert len(pages_read) == 5
    assert all(
        e.headers.get("Prefer", e.headers.get("prefer", "")).find("odata.maxpagesize=5") >= 0 for e in pages_read
    )
    assert all("$skiptoken" in e.target for e in pages_read[1:])
    listed = client.records.list("opportunity", filter="statecode eq 0", select=["name"], page_size=10)
    assert sorted(r["name"] for r in listed) == expected


def test_create_multiple_and_update_multiple(pc: Any, client: Any) -> None:
    pc.dynamics365.configure(choice_value_base=CUSTOM_BASE)
    ids = client.records.create(
        "opportunity",
        [
            {
                "name": f"Fabrikam deal {i}",
                "cosell_howcanmicrosofthelp": "Proof of concept or demo",
                "salesstage": i % 4,
            }
            for i in range(4)
        ],
    )
    assert len(ids) == 4
    stored = rows(pc, "opportunities")
    assert set(stored) == set(ids)
    # The label was resolved to the org's option value (base 858,880,000: the third option).
    assert {r["cosell_howcanmicrosofthelp"] for r in stored.values()} == {CUSTOM_BASE + 2}
    labelled = client.records.retrieve(
        "opportunity",
        ids[0],
        select=["cosell_howcanmicrosofthelp"],
        include_annotations="OData.Community.Display.V1.FormattedValue",
    )
    assert labelled is not None
    assert (
        labelled["cosell_howcanmicrosofthelp@OData.Community.Display.V1.FormattedValue"] == "Proof of concept or demo"
    )
    create_multiple = pc.dynamics365.requests_matching(
        "POST", "/api/data/v9.2/opportunities/Microsoft.Dynamics.CRM.CreateMultiple"
    )
    assert len(create_multiple) == 1

    client.records.update("opportunity", ids[:2], [{"estimatedvalue": 1000.0}, {"estimatedvalue": 2000.0}])
    client.records.update("opportunity", ids[2:], {"cosell_syncstatus": "Pending"})
    stored = rows(pc, "opportunities")
    assert [stored[i]["estimatedvalue"] for i in ids[:2]] == [1000.0, 2000.0]
    assert [stored[i]["cosell_syncstatus"] for i in ids] == [None, None, CUSTOM_BASE + 1, CUSTOM_BASE + 1]
    update_multiple = pc.dynamics365.requests_matching(
        "POST", "/api/data/v9.2/opportunities/Microsoft.Dynamics.CRM.UpdateMultiple"
    )
    assert len(update_multiple) == 2


def test_upsert_by_alternate_key(pc: Any, client: Any) -> None:
    client.records.upsert(
        "opportunity",
        [UpsertItem(alternate_key={"cosell_referralid": "ref-001"}, record={"name": "Created by upsert"})],
    )
    stored = list(rows(pc, "opportunities").values())
    assert [(r["cosell_referralid"], r["name"]) for r in stored] == [("ref-001", "Created by upsert")]
    first_id = stored[0]["opportunityid"]

    client.records.upsert(
        "opportunity",
        [
            UpsertItem(alternate_key={"cosell_referralid": "ref-001"}, record={"name": "Updated by upsert"}),
            UpsertItem(alternate_key={"cosell_referralid": "ref-002"}, record={"name": "Second"}),
        ],
    )
    stored = {r["cosell_referralid"]: r for r in rows(pc, "opportunities").values()}
    assert set(stored) == {"ref-001", "ref-002"}
    assert stored["ref-001"]["opportunityid"] == first_id and stored["ref-001"]["name"] == "Updated by upsert"
    assert stored["ref-002"]["name"] == "Second"


def test_batch(pc: Any, client: Any) -> None:
    existing = client.records.create("account", {"name": "Existing"})
    batch = client.batch.new()
    batch.records.create("account", {"name": "Batch one"})
    batch.records.update("account", existing, {"address1_city": "Lisbon"})
    batch.records.retrieve("account", existing, select=["name"])
    with batch.changeset() as cs:
        ref = cs.records.create("account", {"name": "In changeset"})
        cs.records.update("account", ref, {"address1_city": "Paris"})
    result = batch.execute()
    assert not result.has_errors, [(r.status_code, r.error_message) for r in result.failed]
    stored = {r["name"]: r for r in rows(pc, "accounts").values()}
    assert set(stored) == {"Existing", "Batch one", "In changeset"}
    assert stored["Existing"]["address1_city"] == "Lisbon"
    assert stored["In changeset"]["address1_city"] == "Paris"
    retrieved = [r for r in result.responses if r.data and r.data.get("name") == "Existing"]
    assert len(retrieved) == 1

    # A failing changeset rolls back as a whole.
    batch = client.batch.new()
    with batch.changeset() as cs:
        cs.records.create("account", {"name": "Rolled back"})
        cs.records.update("account", existing, {"statecode": 7})
    result = batch.execute()
    assert result.has_errors
    assert "Rolled back" not in {r["name"] for r in rows(pc, "accounts").values()}


def test_table_metadata(pc: Any, client: Any) -> None:
    info = client.tables.get("opportunity")
    assert info is not None
    assert (info.logical_name, info.schema_name, info.entity_set_name) == (
        "opportunity",
        "Opportunity",
        "opportunities",
    )
    assert (info.primary_id_attribute, info.primary_name_attribute) == ("opportunityid", "name")
    assert client.tables.get("cosell_nosuchtable") is None

    tables = client.tables.list(select=["LogicalName", "EntitySetName"])
    assert {t["LogicalName"]: t["EntitySetName"] for t in tables} == {
        "opportunity": "opportunities",
        "account": "accounts",
        "contact": "contacts",
        "transactioncurrency": "transactioncurrencies",
    }

    picklists = client.tables.list_columns("opportunity", select=["LogicalName"], filter="AttributeType eq 'Picklist'")
    assert sorted(c["LogicalName"] for c in picklists) == [
        "cosell_howcanmicrosofthelp",
        "cosell_syncstatus",
        "salesstage",
    ]
    column = client.tables.get_column("opportunity", "cosell_referralid")
    assert column is not None and column["MaxLength"] == 100 and column["AttributeType"] == "String"

    keys = client.tables.get_alternate_keys("opportunity")
    assert [(k.key_attributes, k.status) for k in keys] == [(["cosell_referralid"], "Active")]
