"""Issue 12, validation at normalize (cases 1 and 3): every bad value rejects its record with an
error naming the record and the field; the good records beside it are untouched. Pure, no Airflow."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from cosell_sync.engine.mapping import DEFAULTS, MappingError, load_mapping, parse_mapping
from cosell_sync.engine.normalize import (
    compile_path,
    crm_frame,
    incomplete_creates,
    iso_countries,
    iso_currencies,
    referrals_frame,
)
from tests.helpers import dynamics_org_mapping
from tests.unit.test_engine import dv_opp, referral, sf_opp

SF = load_mapping("salesforce")
DV = dynamics_org_mapping()
MAPPINGS = {"salesforce": SF, "dynamics365": DV}


def check(docs: list[dict], mapping=SF, *, bad: dict[str, tuple[str, str]], side: str = "referral"):
    """``bad``: record id -> (field, words the message holds). Every other record is good."""
    if side == "referral":
        result = referrals_frame(docs, mapping)
        good_ids = list(result.frame["referral_id"])
        all_ids = [d["id"] for d in docs]
    else:
        id_field = "Id" if mapping.crm == "salesforce" else "opportunityid"
        result = crm_frame(docs, mapping, id_field)
        good_ids = list(result.frame["crm_id"])
        all_ids = [d[id_field] for d in docs]
    assert good_ids == [k for k in all_ids if k not in bad], result.errors.to_dict("records")
    errors = result.errors
    assert set(errors["key"]) == set(bad), errors.to_dict("records")
    for key, (field, words) in bad.items():
        rows = errors[errors["key"] == key]
        assert field in set(rows["field"]), rows.to_dict("records")
        message = " | ".join(rows.loc[rows["field"] == field, "message"])
        assert words in message, (key, message)
    return result


# -- numbers ----------------------------------------------------------------------------------------


def test_non_finite_deal_values_are_rejected_not_taken_as_missing():
    # json.loads reads the non-standard Infinity/NaN literals as floats, as the extract does.
    parsed = json.loads('{"a": Infinity, "b": -Infinity, "c": NaN}')
    docs = [
        referral("good1"),
        referral("inf", details__dealValue=parsed["a"]),
        referral("neginf", details__dealValue=parsed["b"]),
        referral("nan", details__dealValue=parsed["c"]),
        referral("nantext", details__dealValue="NaN"),
        referral("inftext", details__dealValue="Infinity"),
        referral("good2", details__dealValue=None),  # no value at all is still "no value"
    ]
    result = check(
        docs,
        bad={
            "inf": ("details.dealValue", "must be a finite number"),
            "neginf": ("details.dealValue", "must be a finite number"),
            "nan": ("details.dealValue", "must be a finite number"),
            "nantext": ("details.dealValue", "must be a finite number"),
            "inftext": ("details.dealValue", "must be a finite number"),
        },
    )
    assert result.frame.set_index("referral_id").loc["good1", "deal_value"] == 1000.0
    assert result.frame.set_index("referral_id").loc["good2", "deal_value"] is None


@pytest.mark.parametrize(
    ("crm", "largest", "too_large"),
    [
        ("salesforce", 9_999_999_999_999_998, 10**16),
        ("dynamics365", 922_337_203_685_477, 922_337_203_685_478),
    ],
)
def test_amounts_the_crm_cannot_store_are_rejected(crm, largest, too_large):
    docs = [
        referral("fits", details__dealValue=largest),
        referral("big", details__dealValue=too_large),
        referral("huge", details__dealValue=1e300),
        referral("hugeint", details__dealValue=10**400),
    ]
    result = check(
        docs,
        MAPPINGS[crm],
        bad={
            "big": ("details.dealValue", "out of range"),
            "huge": ("details.dealValue", "out of range"),
            "hugeint": ("details.dealValue", "must be a finite number"),
        },
    )
    assert result.frame["deal_value"].iloc[0] == float(largest)


def test_crm_amounts_are_checked_too():
    records = [sf_opp("o1"), sf_opp("o2", Amount=math.nan), sf_opp("o3", Amount=5e16)]
    check(
        records,
        side="crm",
        bad={"o2": ("Amount", "must be a finite number"), "o3": ("Amount", "out of range")},
    )


# -- currency ---------------------------------------------------------------------------------------


def test_currency_codes_come_from_the_iso_4217_list():
    assert {"USD", "EUR", "JPY", "CHF"} <= iso_currencies() and "XYZ" not in iso_currencies()
    docs = [
        referral("usd"),
        referral("eur", details__currency="eur"),
        referral("xyz", details__currency="XYZ"),
        referral("abc", details__currency="ABC"),
    ]
    result = check(
        docs,
        bad={
            "xyz": ("details.currency", "ISO 4217"),
            "abc": ("details.currency", "ISO 4217"),
        },
    )
    assert list(result.frame["currency"]) == ["USD", "EUR"]
    check([sf_opp("o1"), sf_opp("o2", CurrencyIsoCode="QQQ")], side="crm", bad={"o2": ("CurrencyIsoCode", "ISO 4217")})


def test_country_codes_come_from_the_iso_3166_list():
    assert {"US", "DE", "JP", "XK"} <= iso_countries() and not {"EU", "UN", "ZZ", "UK", "AA"} & iso_countries()
    assert len(iso_countries()) == 250  # the 249 ISO 3166-1 countries and Kosovo
    address = "customerProfile.address.country"
    docs = [
        referral("us"),
        referral("lower", customerProfile__address={"country": "de", "postalCode": "1"}),
        referral("uk", customerProfile__address={"country": "UK", "postalCode": "1"}),
        referral("eu", customerProfile__address={"country": "EU", "postalCode": "1"}),
        referral("three", customerProfile__address={"country": "USA", "postalCode": "1"}),
    ]
    bad = {k: (address, "ISO 3166") for k in ("uk", "eu", "three")}
    result = check(docs, bad=bad)
    assert list(result.frame["customer_country"]) == ["US", "DE"]
    check(
        [sf_opp("o1"), sf_opp("o2", Account={**sf_opp("o2")["Account"], "BillingCountry": "XX"})],
        side="crm",
        bad={"o2": ("Account.BillingCountry", "ISO 3166")},
    )


# -- control characters -----------------------------------------------------------------------------


def test_control_characters_are_rejected_line_breaks_only_in_multiline_fields():
    docs = [
        referral("good", details__notes="line one\r\nline two\tand a tab"),
        referral("nul", customerProfile__name="Contoso\x00Ltd"),
        referral("esc", **{"customerProfile__address__postalCode": "98\x1b052"}),
        referral("lf", name="Deal\nwith a break"),
        referral("cr", customerProfile__name="Contoso\rLtd"),
        referral("c1", details__notes="csi \x9b here"),
        referral("del", **{"customerProfile__address__city": "Red\x7fmond"}),
        referral("nulnotes", details__notes="a\x00b"),
    ]
    result = check(
        docs,
        bad={
            "nul": ("customerProfile.name", "control character U+0000"),
            "esc": ("customerProfile.address.postalCode", "control character U+001B"),
            "lf": ("name", "line break"),
            "cr": ("customerProfile.name", "line break"),
            "c1": ("details.notes", "control character U+009B"),
            "del": ("customerProfile.address.city", "control character U+007F"),
            "nulnotes": ("details.notes", "control character U+0000"),
        },
    )
    assert result.frame["notes"].iloc[0] == "line one\r\nline two\tand a tab"


def test_control_characters_in_crm_records_are_rejected():
    account = {"Name": "Contoso\x1bLtd", "BillingCountry": "US", "BillingPostalCode": "98052"}
    records = [sf_opp("o1"), sf_opp("o2", Account=account), sf_opp("o3", Description="multi\nline is fine")]
    check(records, side="crm", bad={"o2": ("Account.Name", "control character U+001B")})


# -- lengths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crm", "limits"),
    [
        ("salesforce", {"name": 120, "details.notes": 32000, "customerProfile.name": 255, "postalCode": 20}),
        ("dynamics365", {"name": 300, "details.notes": 2000, "customerProfile.name": 160, "postalCode": 20}),
    ],
)
def test_text_longer_than_the_crm_stores_is_rejected(crm, limits):
    mapping = MAPPINGS[crm]
    docs = [
        referral("fits", name="n" * limits["name"], details__notes="x" * limits["details.notes"]),
        referral("longname", name="n" * (limits["name"] + 1)),
        referral("megabyte", details__notes="x" * 1_048_576),
        referral("notes", details__notes="x" * (limits["details.notes"] + 1)),
        referral("customer", customerProfile__name="c" * (limits["customerProfile.name"] + 1)),
        referral("postal", **{"customerProfile__address__postalCode": "9" * (limits["postalCode"] + 1)}),
    ]
    check(
        docs,
        mapping,
        bad={
            "longname": ("name", f"at most {limits['name']:,}"),
            "megabyte": ("details.notes", "1,048,576 characters"),
            "notes": ("details.notes", f"at most {limits['details.notes']:,}"),
            "customer": ("customerProfile.name", f"at most {limits['customerProfile.name']:,}"),
            "postal": ("customerProfile.address.postalCode", "at most 20"),
        },
    )


def test_a_crm_value_longer_than_its_own_field_is_rejected():
    """A description the CRM cannot hold (an import, a plugin) must not travel to Partner Center."""
    records = [sf_opp("o1"), sf_opp("o2", Description="d" * 40_000)]
    check(records, side="crm", bad={"o2": ("Description", "40,000 characters")})


# -- shapes -----------------------------------------------------------------------------------------


def test_wrong_json_shapes_are_rejected_naming_the_path():
    docs = [
        referral("good"),
        referral("teamtext", customerProfile__team="Ada Lovelace"),
        referral("teamobject", customerProfile__team={"firstName": "Ada"}),
        referral("teamitems", customerProfile__team=["Ada"]),
        referral("nulldetails", details=None),
        referral("textdetails", details="big deal"),
        referral("listdetails", details=[{"dealValue": 1}]),
        referral("solutionstext", details__requirements={"solutions": "SOL-1"}),
        referral("solutionitem", details__requirements={"solutions": [{"id": "SOL-1"}, "SOL-2"]}),
        referral("addresslist", customerProfile__address=[{"country": "US"}]),
        referral("nullprofile", customerProfile=None),
    ]
    check(
        docs,
        bad={
            "teamtext": ("customerProfile.team[0].firstName", "customerProfile.team must be a list, not text"),
            "teamobject": ("customerProfile.team[0].email", "customerProfile.team must be a list, not an object"),
            "teamitems": ("customerProfile.team[0].lastName", "customerProfile.team[0] must be an object, not text"),
            "nulldetails": ("details.dealValue", "details must be an object, not null"),
            "textdetails": ("details.currency", "details must be an object, not text"),
            "listdetails": ("details.notes", "details must be an object, not a list"),
            "solutionstext": ("details.requirements.solutions[].id", "solutions must be a list, not text"),
            "solutionitem": (
                "details.requirements.solutions[].id",
                "details.requirements.solutions[1] must be an object, not text",
            ),
            "addresslist": ("customerProfile.address.country", "customerProfile.address must be an object"),
            "nullprofile": ("customerProfile.name", "customerProfile must be an object, not null"),
        },
    )


def test_absent_objects_and_null_optional_objects_still_read_as_no_value():
    doc = referral("r1", inviteContext=None)
    del doc["details"]["requirements"]
    result = check([doc, referral("r2", customerProfile__team=[])], bad={})
    assert result.frame["solutions"].iloc[0] is None and result.frame["help_code"].iloc[0] is None


def test_crm_shapes_a_null_lookup_is_no_value_text_is_wrong():
    records = [sf_opp("o1", Contact=None), sf_opp("o2", Account="Contoso")]
    check(records, side="crm", bad={"o2": ("Account.Name", "Account must be an object, not text")})
    dv = [dv_opp(), {**dv_opp(), "opportunityid": "o2", "transactioncurrency": ["USD"]}]
    check(dv, DV, side="crm", bad={"o2": ("transactioncurrency.isocurrencycode", "must be an object, not a list")})


def test_the_lenient_getter_is_unchanged():
    get = compile_path("customerProfile.team[0].email")
    assert get({"customerProfile": {"team": "text"}}) is None
    assert compile_path("a[].id")({"a": [{"id": 1}, "x", {"id": 2}]}) == [1, 2]


# -- required fields --------------------------------------------------------------------------------


def test_missing_required_fields_block_only_a_create():
    docs = [
        referral("good"),
        referral("noname", customerProfile__name=None),
        referral("blankname", customerProfile__name="   "),
        referral("nocountry", customerProfile__address={"postalCode": "1"}),
        referral("linked", customerProfile__name=None, externalReferenceId="006000000000001"),
    ]
    result = referrals_frame(docs, SF)
    # They are not bad input: a linked referral without a customer keeps syncing its deal.
    assert list(result.frame["referral_id"]) == ["good", "noname", "blankname", "nocountry", "linked"]
    assert result.errors.empty
    lacking = result.create_errors.set_index(["key", "field"])["message"].to_dict()
    assert lacking == {
        ("noname", "customerProfile.name"): "is required to create a Salesforce record",
        ("blankname", "customerProfile.name"): "is required to create a Salesforce record",
        ("nocountry", "customerProfile.address.country"): "is required to create a Salesforce record",
        ("linked", "customerProfile.name"): "is required to create a Salesforce record",
    }
    # Planned creates: those lacking a required field become error rows, the rest are created.
    creates = pd.DataFrame({"referral_id": ["good", "noname", "nocountry"], "name": ["a", "b", "c"]})
    kept, errors = incomplete_creates(creates, "referral_id", result.create_errors)
    assert list(kept["referral_id"]) == ["good"]
    assert sorted(zip(errors["key"], errors["field"], strict=True)) == [
        ("nocountry", "customerProfile.address.country"),
        ("noname", "customerProfile.name"),
    ]


def test_an_opportunity_without_an_account_cannot_create_a_referral():
    result = crm_frame([sf_opp("o1"), sf_opp("o2", Account=None)], SF, "Id")
    assert list(result.frame["crm_id"]) == ["o1", "o2"] and result.errors.empty
    assert set(zip(result.create_errors["key"], result.create_errors["field"], strict=True)) == {
        ("o2", "Account.Name"),
        ("o2", "Account.BillingCountry"),
    }
    assert set(result.create_errors["message"]) == {"is required to create a Partner Center record"}
    dv = crm_frame([{**dv_opp(), "account": None}], DV, "opportunityid")
    assert set(dv.create_errors["field"]) == {"account.name", "account.address1_country"}


# -- the mapping keys -------------------------------------------------------------------------------


def test_shipped_mappings_declare_required_and_lengths():
    for mapping in (SF, DV):
        assert mapping.fields["customer_name"].required == ("crm", "partner_center")
        assert mapping.fields["customer_country"].required == ("crm", "partner_center")
        assert mapping.fields["notes"].multiline and not mapping.fields["name"].multiline
    assert SF.fields["name"].max_length == {"crm": 120} and DV.fields["name"].max_length == {"crm": 300}
    assert SF.fields["notes"].max_length == {"crm": 32000} and DV.fields["notes"].max_length == {"crm": 2000}
    assert SF.fields["customer_postal_code"].max_length == {"crm": 20}


def _with(field: str, **keys) -> dict:
    doc = yaml.safe_load((DEFAULTS / "salesforce.yaml").read_text())
    doc["fields"][field].update(keys)
    return doc


@pytest.mark.parametrize(
    ("field", "keys", "message"),
    [
        ("customer_name", {"required": "yes"}, "fields.customer_name.required: 'yes' is not a target"),
        ("customer_name", {"required": ["crm", "erp"]}, "'erp' is not a target (expected crm, partner_center)"),
        ("customer_name", {"required": []}, "must be true, false or a list of targets"),
        ("customer_name", {"required": 3}, "must be true, false or a list of targets"),
        ("name", {"max_length": 0}, "fields.name.max_length: must be a positive whole number"),
        ("name", {"max_length": "120"}, "fields.name.max_length: must be a positive whole number"),
        ("name", {"max_length": {"crm": -1}}, "fields.name.max_length.crm: must be a positive whole number"),
        ("name", {"max_length": {"erp": 10}}, "fields.name.max_length.erp: is not a target"),
        ("name", {"max_length": {}}, "fields.name.max_length: must be a positive whole number or a mapping"),
        ("deal_value", {"max_length": 10}, "fields.deal_value.max_length: is only for text types"),
        ("notes", {"multiline": "yes"}, "fields.notes.multiline: must be true or false"),
        ("deal_value", {"multiline": True}, "fields.deal_value.multiline: is only for type string"),
    ],
)
def test_bad_validation_keys_are_mapping_errors(field, keys, message):
    with pytest.raises(MappingError) as caught:
        parse_mapping(_with(field, **keys), "custom.yaml")
    assert str(caught.value).startswith("mapping custom.yaml: ") and message in str(caught.value)


def test_validation_keys_parse():
    m = parse_mapping(_with("name", required=["partner_center"], max_length=99), "custom.yaml")
    assert m.fields["name"].required == ("partner_center",)
    assert m.fields["name"].max_length == {"crm": 99, "partner_center": 99}
    m = parse_mapping(_with("name", required=False, max_length={"partner_center": 5}), "custom.yaml")
    assert m.fields["name"].required == () and m.fields["name"].max_length == {"partner_center": 5}
    # Given for Partner Center, a referral's own name is checked against it.
    result = referrals_frame([referral("r1", name="123456")], m)
    assert (
        result.errors.loc[0, "field"] == "name" and "Partner Center stores at most 5" in result.errors.loc[0, "message"]
    )
