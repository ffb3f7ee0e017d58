"""The ``boolean`` field type: mapping checks, normalization on both sides, planning, and the
values each side writes. The shipped ``share_with_microsoft`` field maps a CRM checkbox (Yes/No
column) onto a referral's consent.consentToShareReferralWithMicrosoftSellers: unchecked is a
private deal (Microsoft Learn, "Create a referral", "Deal types")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import yaml

from cosell_sync.engine.mapping import DEFAULTS, KEEP, MappingError, load_mapping, parse_mapping
from cosell_sync.engine.normalize import as_boolean, crm_frame, referrals_frame, side_value
from cosell_sync.engine.plan import plan
from cosell_sync.sides.dynamics365 import DynamicsSide
from cosell_sync.sides.partner_center import referral_assignments
from cosell_sync.sides.salesforce import SalesforceSide
from tests.helpers import DV_ORG_CHOICES, dynamics_org_mapping, with_paths

SF = load_mapping("salesforce")
DV = dynamics_org_mapping()
CONSENT = "consent.consentToShareReferralWithMicrosoftSellers"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CHOICES = {**DV_ORG_CHOICES, "cosell_syncstatus": {"Synced": 1, "Pending": 2, "Error": 3}}


def _doc(crm: str = "salesforce") -> dict:
    return yaml.safe_load((DEFAULTS / f"{crm}.yaml").read_text(encoding="utf-8"))


def referral(rid: str, **over) -> dict:
    doc = {
        "id": rid,
        "name": f"Deal {rid}",
        "status": "Active",
        "substatus": "Accepted",
        "direction": "Outgoing",
        "updatedDateTime": (T0 + timedelta(minutes=5)).isoformat(),
        "customerProfile": {"name": "Contoso", "address": {"country": "US"}},
        "details": {"dealValue": 1000, "currency": "USD", "closingDateTime": "2027-01-31T00:00:00Z"},
        "inviteContext": {"assistanceRequestCode": "QuotesOrLicensing"},
        "consent": {"consentToContact": True, "consentToShareReferralWithMicrosoftSellers": True},
    }
    return with_paths(doc, over)


def sf_opp(oid: str, **over) -> dict:
    rec = {
        "Id": oid,
        "Name": f"Deal {oid}",
        "Amount": 1000,
        "CurrencyIsoCode": "USD",
        "CloseDate": "2027-01-31",
        "StageName": "Qualification",
        "PC_How_Can_Microsoft_Help__c": "QuotesOrLicensing",
        "PC_Share_With_Microsoft__c": True,
        "PC_Referral_Id__c": None,
        "PC_Sync_With_Partner_Center__c": True,
        "SystemModstamp": T0.isoformat(),
        "IsClosed": False,
        "Account": {"Name": "Contoso", "BillingCountry": "US"},
    }
    rec.update(over)
    return rec


# -- the mapping ----------------------------------------------------------------------------------


def test_shipped_mappings_map_the_share_flag_as_a_boolean():
    for mapping, column in ((SF, "PC_Share_With_Microsoft__c"), (DV, "cosell_sharewithmicrosoft")):
        fm = mapping.fields["share_with_microsoft"]
        assert (fm.referral, fm.crm, fm.type) == (CONSENT, column, "boolean")
        assert (fm.direction, fm.authority, fm.sync, fm.blank) == ("both", "crm", "always", "keep")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"values": {"referral": {"read": {"x": "y"}, "write": {"y": "x"}}}}, r"share\.values: value maps"),
        ({"max_length": 5}, r"share\.max_length: is only for text types"),
        ({"multiline": True}, r"share\.multiline: is only for type string"),
        ({"referral": "consent.a/consent.b"}, r"share\.referral: a composite path"),
    ],
)
def test_a_boolean_field_takes_no_text_or_enum_options(extra, message):
    doc = _doc()
    doc["fields"]["share"] = {"referral": CONSENT, "crm": "X__c", "type": "boolean", **extra}
    with pytest.raises(MappingError, match=message):
        parse_mapping(doc, "mine.yaml")


def test_an_unknown_type_names_boolean_among_the_types():
    doc = _doc()
    doc["fields"]["share"] = {"referral": CONSENT, "crm": "X__c", "type": "bool"}
    with pytest.raises(MappingError, match=r"mine\.yaml: fields\.share\.type: 'bool' is not one of .*boolean"):
        parse_mapping(doc, "mine.yaml")


# -- reading values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("FALSE", False),
        (" True ", True),
        ("1", True),
        ("0", False),
        ("yes", None),
        ("", None),
        (2, None),
        (-1, None),
        (float("nan"), None),
        ([True], None),
        ({"value": True}, None),
    ],
)
def test_as_boolean(raw, expected):
    assert as_boolean(raw) is expected


@pytest.mark.parametrize("raw", [True, False, 1, 0, "true", "False", "TRUE", "0"])
def test_both_sides_read_the_spellings_of_a_boolean_as_true_or_false(raw):
    expected = raw in (True, 1, "true", "TRUE")
    pc = referrals_frame([referral("r1", consent__consentToShareReferralWithMicrosoftSellers=raw)], SF)
    sf = crm_frame([sf_opp("006A", PC_Share_With_Microsoft__c=raw)], SF, "Id")
    dv = crm_frame(
        [{"opportunityid": "o1", "name": "Deal", "cosell_sharewithmicrosoft": raw, "statecode": 0}], DV, "opportunityid"
    )
    for normalized in (pc, sf, dv):
        assert normalized.errors.empty, normalized.errors
        value = normalized.frame.loc[0, "share_with_microsoft"]
        assert type(value) is bool and value is expected


@pytest.mark.parametrize("raw", ["yes", "Y", 2, -1, 0.5, "truee", [True], {"v": 1}])
def test_anything_else_is_a_bad_value_naming_the_field(raw):
    pc = referrals_frame([referral("r1", consent__consentToShareReferralWithMicrosoftSellers=raw), referral("r2")], SF)
    assert list(pc.frame["referral_id"]) == ["r2"]  # the other record carries on
    [error] = pc.errors.to_dict("records")
    assert error["key"] == "r1" and error["side"] == "referral" and error["field"] == CONSENT
    assert error["message"] == "must be true or false"
    sf = crm_frame([sf_opp("006A", PC_Share_With_Microsoft__c=raw)], SF, "Id")
    [error] = sf.errors.to_dict("records")
    assert (error["key"], error["side"], error["field"]) == ("006A", "crm", "PC_Share_With_Microsoft__c")
    assert sf.frame.empty


def test_a_scalar_bad_value_says_true_or_false():
    sf = crm_frame([sf_opp("006A", PC_Share_With_Microsoft__c="maybe")], SF, "Id")
    assert sf.errors.loc[0, "message"] == "must be true or false"
    assert sf.errors.loc[0, "value"] == "'maybe'"


def test_a_consent_object_that_is_not_an_object_is_a_shape_error():
    pc = referrals_frame([referral("r1", consent="yes")], SF)
    assert pc.errors.loc[0, "message"] == "consent must be an object, not text"


def test_no_value_is_no_opinion_and_clear_when_the_mapping_says_so():
    doc = referral("r1")
    del doc["consent"]
    assert referrals_frame([doc], SF).frame.loc[0, "share_with_microsoft"] == KEEP
    cleared = _doc()
    cleared["fields"]["share_with_microsoft"]["blank"] = "clear"
    mapping = parse_mapping(cleared, "clear.yaml")
    assert referrals_frame([doc], mapping).frame.loc[0, "share_with_microsoft"] is None


# -- planning and writing ------------------------------------------------------------------------


def _links(base: dict) -> pd.DataFrame:
    return pd.DataFrame([{"referral_id": "r1", "crm_id": "006A", "base": base, "synced_at": T0}])


def _base() -> dict:
    base = crm_frame([sf_opp("006A", PC_Referral_Id__c="r1")], SF, "Id").frame.iloc[0].to_dict()
    return {f: base[f] for f in SF.fields}


@pytest.mark.parametrize(("pc_value", "crm_value", "target", "new"), [(True, False, "partner_center", False)])
def test_an_unchecked_box_reaches_the_referral_as_false(pc_value, crm_value, target, new):
    pc = referrals_frame([referral("r1", consent__consentToShareReferralWithMicrosoftSellers=pc_value)], SF).frame
    crm = crm_frame([sf_opp("006A", PC_Referral_Id__c="r1", PC_Share_With_Microsoft__c=crm_value)], SF, "Id").frame
    base = _base()
    base["share_with_microsoft"] = True
    p = plan(pc, crm, _links(base), SF)
    changes = p.changes[p.changes["field"] == "share_with_microsoft"].to_dict("records")
    assert [(c["target"], c["old"], c["new"]) for c in changes] == [(target, True, new)]


def test_a_change_in_partner_center_reaches_the_box_and_the_seller_wins_a_conflict():
    base = _base()
    base["share_with_microsoft"] = True
    # Only Partner Center changed: the box follows.
    pc = referrals_frame([referral("r1", consent__consentToShareReferralWithMicrosoftSellers=False)], SF).frame
    crm = crm_frame([sf_opp("006A", PC_Referral_Id__c="r1", PC_Share_With_Microsoft__c=True)], SF, "Id").frame
    p = plan(pc, crm, _links(base), SF)
    changes = p.changes[p.changes["field"] == "share_with_microsoft"].to_dict("records")
    assert [(c["target"], c["new"]) for c in changes] == [("crm", False)]
    # Both changed (to different values): the CRM has authority.
    base["share_with_microsoft"] = None
    crm = crm_frame([sf_opp("006A", PC_Referral_Id__c="r1", PC_Share_With_Microsoft__c=True)], SF, "Id").frame
    p = plan(pc, crm, _links(base), SF)
    changes = p.changes[p.changes["field"] == "share_with_microsoft"].to_dict("records")
    assert [(c["target"], c["new"]) for c in changes] == [("partner_center", True)]
    # Nothing changed: nothing to write.
    base["share_with_microsoft"] = False
    crm = crm_frame([sf_opp("006A", PC_Referral_Id__c="r1", PC_Share_With_Microsoft__c=0)], SF, "Id").frame
    p = plan(pc, crm, _links(base), SF)
    assert p.changes[p.changes["field"] == "share_with_microsoft"].empty


@pytest.mark.parametrize("flag", [True, False])
def test_each_side_writes_a_json_boolean(flag):
    fm = SF.fields["share_with_microsoft"]
    assert side_value(fm, "referral", flag) is flag
    assert referral_assignments(fm, flag) == [(["consent", "consentToShareReferralWithMicrosoftSellers"], flag)]
    assert SalesforceSide(None, SF)._write_value(fm, flag) is flag  # type: ignore[arg-type]
    dv = DynamicsSide(None, load_mapping("dynamics365"), CHOICES)  # type: ignore[arg-type]
    assert dv.column_value(dv.mapping.fields["share_with_microsoft"], flag) is flag
    assert dv.column_value(dv.mapping.fields["share_with_microsoft"], KEEP) is None


def test_a_canonical_value_that_is_not_a_boolean_is_refused_when_written():
    dv = DynamicsSide(None, load_mapping("dynamics365"), CHOICES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"share_with_microsoft: 'perhaps' is not true or false"):
        dv.column_value(dv.mapping.fields["share_with_microsoft"], "perhaps")
    with pytest.raises(ValueError, match=r"PC_Share_With_Microsoft__c: 'perhaps' is not true or false"):
        SalesforceSide(None, SF)._write_value(SF.fields["share_with_microsoft"], "perhaps")  # type: ignore[arg-type]
