"""The Dataverse emulator's table definitions, over HTTPS with plain ``requests``: ``EntityDefinitions``
(``$filter``/``$select``, by LogicalName and MetadataId), ``Attributes`` and their typed casts with the
option sets, ``Keys``, and choice-column writes checked against the same options."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from cosell_sandbox.dynamics365.choices import DEFAULT_CHOICE_BASE, HELP_LABELS

API = "/api/data/v9.2"
CUSTOM_BASE = 100_000_000  # another publisher's prefix than the emulator's default
HELP = list(HELP_LABELS)


class Api:
    def __init__(self, sandbox: Any) -> None:
        conn = sandbox.connections()["dynamics365_default"]
        self.origin = conn["host"]
        self.ca = conn["extra"]["ca_bundle"]
        resp = requests.post(
            f"{conn['extra']['authority']}/{conn['extra']['tenant_id']}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": conn["login"],
                "client_secret": conn["password"],
                "scope": f"{self.origin}/.default",
            },
            verify=self.ca,
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        self.token = resp.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            **kwargs.pop("headers", {}),
        }
        return requests.request(
            method, f"{self.origin}{API}/{path}", headers=headers, verify=self.ca, timeout=30, **kwargs
        )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)


@pytest.fixture
def api(pc: Any) -> Api:
    return Api(pc)


def ok(resp: requests.Response) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()


def error_of(resp: requests.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


def labels(options: list[dict[str, Any]]) -> dict[int, str]:
    out = {}
    for option in options:
        label = option["Label"]
        assert label["LocalizedLabels"][0]["LanguageCode"] == 1033
        assert label["LocalizedLabels"][0]["Label"] == label["UserLocalizedLabel"]["Label"]
        out[option["Value"]] = label["UserLocalizedLabel"]["Label"]
    return out


def test_entity_definitions_filter_and_select(api: Api) -> None:
    body = ok(api.get("EntityDefinitions", params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute"}))
    by_name = {e["LogicalName"]: e for e in body["value"]}
    assert set(by_name) == {"opportunity", "account", "contact", "transactioncurrency"}
    assert set(by_name["account"]) == {"LogicalName", "EntitySetName", "PrimaryIdAttribute", "MetadataId"}
    assert by_name["transactioncurrency"]["EntitySetName"] == "transactioncurrencies"

    one = ok(
        api.get(
            "EntityDefinitions",
            params={"$filter": "LogicalName eq 'opportunity'", "$select": "LogicalName,EntitySetName"},
        )
    )["value"]
    assert [(e["LogicalName"], e["EntitySetName"]) for e in one] == [("opportunity", "opportunities")]
    by_set = ok(api.get("EntityDefinitions", params={"$filter": "EntitySetName eq 'contacts'"}))["value"]
    assert [e["LogicalName"] for e in by_set] == ["contact"]
    full = by_set[0]
    assert full["PrimaryIdAttribute"] == "contactid" and full["SchemaName"] == "Contact"
    assert full["DisplayName"]["UserLocalizedLabel"]["Label"] == "Contact" and full["IsCustomEntity"] is False
    either = ok(
        api.get(
            "EntityDefinitions",
            params={"$filter": "LogicalName eq 'account' or LogicalName eq 'contact'", "$select": "LogicalName"},
        )
    )["value"]
    assert sorted(e["LogicalName"] for e in either) == ["account", "contact"]
    both = ok(
        api.get(
            "EntityDefinitions",
            params={"$filter": "LogicalName eq 'account' and IsPrivate eq false", "$select": "LogicalName"},
        )
    )["value"]
    assert [e["LogicalName"] for e in both] == ["account"]
    assert ok(api.get("EntityDefinitions", params={"$filter": "LogicalName eq 'nosuch'"}))["value"] == []

    status, code, message = error_of(api.get("EntityDefinitions", params={"$select": "LogicalName,Nope"}))
    assert (status, code) == (400, "0x80060888") and "Nope" in message and "EntityMetadata" in message
    status, _, _ = error_of(api.get("EntityDefinitions", params={"$top": "1"}))
    assert status == 400


def test_entity_definition_by_name_and_metadata_id(api: Api) -> None:
    by_name = ok(api.get("EntityDefinitions(LogicalName='opportunity')"))
    assert by_name["EntitySetName"] == "opportunities" and by_name["PrimaryNameAttribute"] == "name"
    assert by_name["ObjectTypeCode"] == 3 and by_name["LogicalCollectionName"] == "opportunities"
    again = ok(api.get(f"EntityDefinitions({by_name['MetadataId']})", params={"$select": "LogicalName"}))
    assert again == {
        "@odata.context": again["@odata.context"],
        "LogicalName": "opportunity",
        "MetadataId": by_name["MetadataId"],
    }
    listed = ok(api.get("EntityDefinitions", params={"$select": "LogicalName"}))["value"]
    assert by_name["MetadataId"] in {e["MetadataId"] for e in listed}  # stable across requests

    status, code, message = error_of(api.get("EntityDefinitions(LogicalName='cosell_nosuch')"))
    assert (status, code) == (404, "0x80041102") and "'cosell_nosuch'" in message
    status, _, _ = error_of(api.get("EntityDefinitions(00000000-0000-0000-0000-000000000001)"))
    assert status == 404


def test_attributes(api: Api) -> None:
    base = "EntityDefinitions(LogicalName='opportunity')/Attributes"
    attributes = {a["LogicalName"]: a for a in ok(api.get(base))["value"]}
    assert "parentaccountid" in attributes and "_parentaccountid_value" not in attributes
    name = attributes["name"]
    assert name["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata"
    assert (name["AttributeType"], name["AttributeTypeName"], name["MaxLength"]) == (
        "String",
        {"Value": "StringType"},
        300,
    )
    assert name["IsPrimaryName"] is True and attributes["opportunityid"]["IsPrimaryId"] is True
    assert attributes["parentaccountid"]["Targets"] == ["account"]
    assert (
        attributes["cosell_howcanmicrosofthelp"]["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    )
    assert attributes["statecode"]["AttributeType"] == "State" and attributes["statuscode"]["AttributeType"] == "Status"
    assert attributes["cosell_referralid"]["IsCustomAttribute"] is True

    one = ok(api.get(f"{base}(LogicalName='cosell_referralid')", params={"$select": "LogicalName,AttributeType"}))
    assert one["LogicalName"] == "cosell_referralid" and one["AttributeType"] == "String" and "MetadataId" in one
    assert one["MetadataId"] == attributes["cosell_referralid"]["MetadataId"]
    filtered = ok(api.get(base, params={"$select": "LogicalName", "$filter": "LogicalName eq 'salesstage'"}))["value"]
    assert [a["LogicalName"] for a in filtered] == ["salesstage"]
    # MaxLength is a StringAttributeMetadata property: not selectable on the untyped collection.
    status, code, _ = error_of(api.get(base, params={"$select": "LogicalName,MaxLength"}))
    assert (status, code) == (400, "0x80060888")
    status, _, message = error_of(api.get(f"{base}(LogicalName='nosuch')"))
    assert status == 404 and "nosuch" in message


def test_picklist_casts_and_option_sets(pc: Any, api: Api) -> None:
    pc.dynamics365.configure(choice_value_base=CUSTOM_BASE)
    base = "EntityDefinitions(LogicalName='opportunity')/Attributes"
    cast = "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    picklists = ok(
        api.get(f"{base}/{cast}", params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"})
    )
    by_name = {p["LogicalName"]: p for p in picklists["value"]}
    assert set(by_name) == {"salesstage", "cosell_howcanmicrosofthelp", "cosell_syncstatus"}
    assert labels(by_name["salesstage"]["OptionSet"]["Options"]) == {
        0: "Qualify",
        1: "Develop",
        2: "Propose",
        3: "Close",
    }
    assert labels(by_name["cosell_syncstatus"]["OptionSet"]["Options"]) == {
        CUSTOM_BASE: "Synced",
        CUSTOM_BASE + 1: "Pending",
        CUSTOM_BASE + 2: "Error",
    }

    help_path = f"{base}(LogicalName='cosell_howcanmicrosofthelp')/{cast}"
    single = ok(api.get(help_path, params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}))
    assert single["LogicalName"] == "cosell_howcanmicrosofthelp"
    assert set(single["OptionSet"]) == {"@odata.type", "Options", "MetadataId"}
    assert labels(single["OptionSet"]["Options"]) == {CUSTOM_BASE + i: label for i, label in enumerate(HELP)}
    global_set = ok(api.get(help_path, params={"$select": "LogicalName", "$expand": "GlobalOptionSet"}))
    assert global_set["GlobalOptionSet"]["IsGlobal"] is True
    assert global_set["GlobalOptionSet"]["Name"] == "cosell_howcanmicrosofthelp"
    local = ok(
        api.get(
            f"{base}(LogicalName='cosell_syncstatus')/{cast}", params={"$expand": "GlobalOptionSet($select=Options)"}
        )
    )
    assert local["GlobalOptionSet"] is None
    named = ok(api.get("GlobalOptionSetDefinitions(Name='cosell_howcanmicrosofthelp')"))
    assert labels(named["Options"]) == {CUSTOM_BASE + i: label for i, label in enumerate(HELP)}

    state = ok(
        api.get(
            f"{base}(LogicalName='statecode')/Microsoft.Dynamics.CRM.StateAttributeMetadata",
            params={"$expand": "OptionSet"},
        )
    )
    assert {
        o["Value"]: (o["Label"]["UserLocalizedLabel"]["Label"], o["DefaultStatus"])
        for o in state["OptionSet"]["Options"]
    } == {
        0: ("Open", 1),
        1: ("Won", 3),
        2: ("Lost", 4),
    }
    status = ok(
        api.get(
            f"{base}(LogicalName='statuscode')/Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            params={"$expand": "OptionSet($select=Options)"},
        )
    )
    assert {o["Value"]: o["State"] for o in status["OptionSet"]["Options"]} == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2}

    # A cast to a type the attribute is not, and the option set of an untyped attribute.
    code, _, message = error_of(api.get(f"{base}(LogicalName='name')/{cast}"))
    assert code == 404 and "StringAttributeMetadata" in message
    code, _, _ = error_of(api.get(f"{base}(LogicalName='statecode')/{cast}"))
    assert code == 404
    code, _, _ = error_of(api.get(f"{base}(LogicalName='salesstage')", params={"$expand": "OptionSet"}))
    assert code == 400
    code, _, _ = error_of(api.get(f"{base}/Microsoft.Dynamics.CRM.NoSuchMetadata"))
    assert code == 404


def test_keys(api: Api) -> None:
    keys = ok(api.get("EntityDefinitions(LogicalName='opportunity')/Keys"))["value"]
    assert [(k["KeyAttributes"], k["EntityKeyIndexStatus"]) for k in keys] == [(["cosell_referralid"], "Active")]
    assert keys[0]["LogicalName"] == "cosell_referralid_key"
    assert ok(api.get("EntityDefinitions(LogicalName='account')/Keys"))["value"] == []
    expanded = ok(
        api.get("EntityDefinitions(LogicalName='opportunity')", params={"$select": "LogicalName", "$expand": "Keys"})
    )
    assert expanded["Keys"][0]["KeyAttributes"] == ["cosell_referralid"]


def test_choice_writes_use_the_option_sets(pc: Any, api: Api) -> None:
    default = api.request(
        "POST", "opportunities", json={"name": "Default base", "cosell_howcanmicrosofthelp": DEFAULT_CHOICE_BASE + 2}
    )
    assert default.status_code == 204, default.text
    wrong = api.request("POST", "opportunities", json={"name": "Wrong", "cosell_howcanmicrosofthelp": CUSTOM_BASE})
    status, code, message = error_of(wrong)
    assert (
        (status, code) == (400, "0x8004431a")
        and "outside the valid range" in message
        and str(DEFAULT_CHOICE_BASE) in message
    )

    # The setting lives in the control plane; it changes both the options served and the writes accepted.
    resp = requests.post(
        f"{api.origin}/_sandbox/config", json={"choice_value_base": CUSTOM_BASE}, verify=api.ca, timeout=30
    )
    assert resp.status_code == 200 and resp.json()["choice_value_base"] == CUSTOM_BASE
    good = api.request("POST", "opportunities", json={"name": "Custom base", "cosell_syncstatus": CUSTOM_BASE + 2})
    assert good.status_code == 204, good.text
    old = api.request(
        "POST", "opportunities", json={"name": "Old", "cosell_howcanmicrosofthelp": DEFAULT_CHOICE_BASE + 2}
    )
    assert error_of(old)[:2] == (400, "0x8004431a")
    stage = api.request("POST", "opportunities", json={"name": "Stage", "salesstage": 4})
    assert error_of(stage)[:2] == (400, "0x8004431a")  # a system choice: its own fixed options
    stored = {r["name"]: r for r in pc.dynamics365.rows("opportunities")}
    assert set(stored) == {"Default base", "Custom base"}
    assert stored["Custom base"]["cosell_syncstatus"] == CUSTOM_BASE + 2

    bad = requests.post(f"{api.origin}/_sandbox/config", json={"choice_value_base": "x"}, verify=api.ca, timeout=30)
    assert bad.status_code == 400
    pc.dynamics365.reset()
    assert pc.dynamics365.configure()["choice_value_base"] == DEFAULT_CHOICE_BASE  # reset restores the default


def test_seeded_help_values_follow_the_base(pc: Any) -> None:
    pc.dynamics365.configure(choice_value_base=CUSTOM_BASE)
    pc.dynamics365.seed(opportunities=20, flagged=20, seed=3)
    values = {r["cosell_howcanmicrosofthelp"] for r in pc.dynamics365.rows("opportunities")}
    assert values and values <= set(range(CUSTOM_BASE, CUSTOM_BASE + len(HELP)))


def test_formatted_values_carry_option_labels(pc: Any, api: Api) -> None:
    pc.dynamics365.configure(choice_value_base=CUSTOM_BASE)
    row = pc.dynamics365.create(
        "opportunities", {"name": "Labelled", "cosell_howcanmicrosofthelp": CUSTOM_BASE + 3, "salesstage": 2}
    )
    key = f"opportunities({row['opportunityid']})"
    select = {"$select": "name,salesstage,cosell_howcanmicrosofthelp,statecode,cosell_syncstatus"}
    plain = ok(api.get(key, params=select))
    assert not [k for k in plain if "FormattedValue" in k]
    annotation = "@OData.Community.Display.V1.FormattedValue"
    for prefer in (
        'odata.include-annotations="OData.Community.Display.V1.FormattedValue"',
        'odata.include-annotations="*"',
    ):
        body = ok(api.get(key, params=select, headers={"Prefer": prefer}))
        assert body["cosell_howcanmicrosofthelp"] == CUSTOM_BASE + 3
        assert body[f"cosell_howcanmicrosofthelp{annotation}"] == "Quotes or licensing"
        assert body[f"salesstage{annotation}"] == "Propose" and body[f"statecode{annotation}"] == "Open"
        assert f"cosell_syncstatus{annotation}" not in body  # null values carry no label
    listed = ok(
        api.get(
            "opportunities",
            params=select,
            headers={"Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'},
        )
    )["value"]
    assert [r[f"cosell_howcanmicrosofthelp{annotation}"] for r in listed] == ["Quotes or licensing"]
