"""Unit tests for cosell_sync.models.referral (no Airflow needed)."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from cosell_sync.models import (
    ALLOWED_TRANSITIONS,
    AssistanceRequestCode,
    Direction,
    ProfileType,
    Qualification,
    Referral,
    ReferralParseError,
    ReferralStatus,
    ReferralSubstatus,
    ReferralType,
    SalesStage,
    SolutionType,
    TargetType,
    TeamMember,
    parse_referral,
    parse_referrals,
    validate_transition,
)

REFERRAL_ID = "8e5b8b7a-3c1d-4f7e-9a2b-0c6d5e4f3a21"


def full_referral() -> dict[str, Any]:
    """A realistic referral as returned by GET /v1.0/engagements/referrals/{id}."""
    return {
        "id": REFERRAL_ID,
        "engagementId": "d1f0b6a2-7c39-4b5e-8a41-2f9e6c3d1b70",
        "organizationId": "0f3c2a1b-9d8e-4c7b-a6f5-e4d3c2b1a098",
        "organizationName": "Contoso Partners Ltd",
        "name": "Contoso - Azure migration for Fabrikam",
        "externalReferenceId": "CRM-OPP-004211",
        "createdDateTime": "2024-03-01T10:15:30.1234567Z",
        "updatedDateTime": "2024-03-05T08:00:01.7654321+00:00",
        "expirationDateTime": "2024-06-01T00:00:00Z",
        "acceptedDateTime": "2024-03-02T09:30:00.5000000Z",
        "closedDateTime": None,
        "status": "Active",
        "substatus": "Accepted",
        "statusReason": "",
        "type": "Shared",
        "qualification": "SalesQualified",
        "direction": "Incoming",
        "salesStage": "Develop",
        "customerProfile": {
            "name": "Fabrikam Inc",
            "size": "1000to9999employees",
            "address": {
                "addressLine1": "1 Microsoft Way",
                "addressLine2": "Building 4",
                "city": "Redmond",
                "state": "WA",
                "postalCode": "98052",
                "country": "US",
                "region": "United States",
            },
            "team": [
                {
                    "firstName": "Dana",
                    "lastName": "Smith",
                    "email": "dana.smith@fabrikam.example",
                    "phoneNumber": "+1 425 555 0100",
                    "contactPreference": {"disableEmails": False},
                },
                {
                    "firstName": "Lee",
                    "lastName": "Wong",
                    "email": "lee.wong@fabrikam.example",
                    "phoneNumber": "+1 425 555 0101",
                },
            ],
            "ids": [
                {"profileType": "Duns", "id": "123456789"},
                {"profileType": "External", "id": "FAB-001"},
            ],
        },
        "consent": {
            "consentToToShareInfoWithOthers": True,
            "consentToContact": True,
            "consentToShareReferralWithMicrosoftSellers": False,
        },
        "details": {
            "notes": "Customer wants to move 300 VMs before fiscal year end.",
            "dealValue": 250000.5,
            "currency": "USD",
            "closingDateTime": "2024-09-30T00:00:00Z",
            "requirements": {
                "industries": ["Manufacturing"],
                "products": ["Azure"],
                "services": ["Migration"],
                "solutions": [
                    {
                        "id": "sol-migrate-001",
                        "name": "Contoso Lift and Shift",
                        "type": "Name",
                        "publisherName": "Contoso Partners Ltd",
                        "solutionType": "Solution",
                        "price": 1200.0,
                        "quantity": 3,
                        "currency": "USD",
                    },
                    {"id": "sol-backup-002", "name": "Contoso Backup", "type": "Category"},
                ],
                "additionalRequirements": "Must run in West Europe.",
            },
        },
        "team": [
            {
                "firstName": "Alex",
                "lastName": "Partner",
                "email": "alex@contoso.example",
                "phoneNumber": "+44 20 7946 0000",
            }
        ],
        "inviteContext": {
            "notes": "Please help with architecture.",
            "assistanceRequestCode": "CustomerTechnicalArchitecture",
            "invitedBy": {
                "organizationId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                "organizationName": "Microsoft",
            },
        },
        "target": [
            {"type": "SolutionProfile", "id": "sol-migrate-001"},
            {"type": "BusinessProfileLocation", "id": "loc-uk-01"},
        ],
        "eTag": '"0x8DC3A1B2C3D4E5F"',
        "links": {
            "self": {
                "uri": f"https://api.partner.microsoft.com/v1.0/engagements/referrals/{REFERRAL_ID}",
                "method": "GET",
            },
            "relatedReferrals": {
                "uri": "https://api.partner.microsoft.com/v1.0/engagements/referrals?engagementId=d1f0",
                "method": "GET",
            },
        },
        "registrationStatus": "NotRegistered",
        "tags": ["azure", "migration"],
        "lastModifiedVia": "API",
        # Fields the models do not know about.
        "trackingInfo": {"sourceSystem": "MSX", "campaignId": "CMP-77"},
        "someNewField": {"nested": [1, 2, {"deep": "value"}]},
    }


def _expected_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    """What to_api() should return for ``doc``: identical except for documented normalisations."""
    expected = copy.deepcopy(doc)
    # Datetimes: 7th fractional digit dropped, "+00:00" rewritten as "Z", explicit null kept.
    expected["createdDateTime"] = "2024-03-01T10:15:30.123456Z"
    expected["updatedDateTime"] = "2024-03-05T08:00:01.765432Z"
    expected["acceptedDateTime"] = "2024-03-02T09:30:00.500000Z"
    return expected


def _parse_error(doc: Any) -> ReferralParseError:
    with pytest.raises(ReferralParseError) as info:
        parse_referral(doc)
    return info.value


def _with(path: str, value: Any) -> dict[str, Any]:
    """full_referral() with the dotted ``path`` replaced by ``value``."""
    doc = full_referral()
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return doc


# ---------------------------------------------------------------- round trip


def test_full_referral_round_trips_with_unknown_fields_preserved() -> None:
    doc = full_referral()
    out = Referral.model_validate(doc).to_api()
    assert out == _expected_round_trip(doc)
    assert out["trackingInfo"] == {"sourceSystem": "MSX", "campaignId": "CMP-77"}
    assert out["someNewField"] == {"nested": [1, 2, {"deep": "value"}]}
    # JSON-serialisable as is.
    assert json.loads(json.dumps(out)) == out


def test_round_trip_is_stable() -> None:
    once = parse_referral(full_referral()).to_api()
    twice = parse_referral(once).to_api()
    assert twice == once


def test_full_referral_parses_to_typed_values() -> None:
    r = parse_referral(full_referral())
    assert r.id == REFERRAL_ID
    assert r.status is ReferralStatus.ACTIVE
    assert r.substatus is ReferralSubstatus.ACCEPTED
    assert r.type is ReferralType.SHARED
    assert r.qualification is Qualification.SALES_QUALIFIED
    assert r.direction is Direction.INCOMING
    assert r.sales_stage is SalesStage.DEVELOP
    assert r.created_date_time == datetime(2024, 3, 1, 10, 15, 30, 123456, tzinfo=UTC)
    assert r.closed_date_time is None
    assert r.customer_profile is not None and r.customer_profile.address is not None
    assert r.customer_profile.address.address_line1 == "1 Microsoft Way"
    assert r.customer_profile.ids is not None
    assert r.customer_profile.ids[0].profile_type is ProfileType.DUNS
    assert r.consent is not None and r.consent.consent_to_share_info_with_others is True
    assert r.details is not None and r.details.deal_value == 250000.5
    assert r.details.closing_date_time == datetime(2024, 9, 30, tzinfo=UTC)
    assert r.details.requirements is not None and r.details.requirements.solutions is not None
    assert r.details.requirements.solutions[1].type is SolutionType.CATEGORY
    assert r.invite_context is not None
    assert r.invite_context.assistance_request_code is AssistanceRequestCode.CUSTOMER_TECHNICAL_ARCHITECTURE
    assert r.invite_context.invited_by is not None
    assert r.invite_context.invited_by.organization_name == "Microsoft"
    assert r.target is not None and r.target[1].type is TargetType.BUSINESS_PROFILE_LOCATION
    assert r.e_tag == '"0x8DC3A1B2C3D4E5F"'
    assert r.links is not None and r.links.self_ is not None
    assert r.links.self_.method == "GET"
    assert r.links.related_referrals is not None
    assert r.tags == ["azure", "migration"]
    assert r.model_extra == {
        "trackingInfo": {"sourceSystem": "MSX", "campaignId": "CMP-77"},
        "someNewField": {"nested": [1, 2, {"deep": "value"}]},
    }


def test_unknown_fields_preserved_in_nested_models() -> None:
    doc = full_referral()
    doc["customerProfile"]["address"]["countyCode"] = "KING"
    doc["details"]["requirements"]["solutions"][0]["licenseTerm"] = "P1Y"
    out = parse_referral(doc).to_api()
    assert out["customerProfile"]["address"]["countyCode"] == "KING"
    assert out["details"]["requirements"]["solutions"][0]["licenseTerm"] == "P1Y"


def test_to_api_excludes_unset_fields() -> None:
    out = parse_referral({"name": "Minimal", "details": {"dealValue": 10}}).to_api()
    assert out == {"name": "Minimal", "details": {"dealValue": 10.0}}


def test_to_api_keeps_explicit_nulls_but_not_unset() -> None:
    out = parse_referral({"name": "n", "closedDateTime": None}).to_api()
    assert out == {"name": "n", "closedDateTime": None}


def test_to_api_from_python_constructed_model_uses_camel_case() -> None:
    r = Referral(name="Built", status=ReferralStatus.NEW, external_reference_id="X-1")
    assert r.to_api() == {"name": "Built", "status": "New", "externalReferenceId": "X-1"}


def test_empty_document_is_valid() -> None:
    r = parse_referral({})
    assert r.id is None and r.name is None
    assert r.to_api() == {}


# ------------------------------------------------------------------ consent spelling


def test_consent_accepts_misspelt_api_key() -> None:
    r = parse_referral({"consent": {"consentToToShareInfoWithOthers": True}})
    assert r.consent is not None and r.consent.consent_to_share_info_with_others is True
    assert r.consent.model_extra == {}


def test_consent_accepts_correct_spelling_and_serialises_as_api_spelling() -> None:
    r = parse_referral({"consent": {"consentToShareInfoWithOthers": True}})
    assert r.consent is not None and r.consent.consent_to_share_info_with_others is True
    assert r.to_api() == {"consent": {"consentToToShareInfoWithOthers": True}}


def test_consent_with_both_spellings_keeps_api_spelling_only() -> None:
    r = parse_referral({"consent": {"consentToToShareInfoWithOthers": False, "consentToShareInfoWithOthers": True}})
    assert r.consent is not None and r.consent.consent_to_share_info_with_others is False
    assert r.to_api() == {"consent": {"consentToToShareInfoWithOthers": False}}


# --------------------------------------------------------------------- datetimes


@pytest.mark.parametrize(
    ("raw", "expected", "serialised"),
    [
        (
            "2024-03-01T10:15:30.1234567Z",
            datetime(2024, 3, 1, 10, 15, 30, 123456, tzinfo=UTC),
            "2024-03-01T10:15:30.123456Z",
        ),
        (
            "2024-03-01T10:15:30.1234567+00:00",
            datetime(2024, 3, 1, 10, 15, 30, 123456, tzinfo=UTC),
            "2024-03-01T10:15:30.123456Z",
        ),
        ("2024-03-01T10:15:30", datetime(2024, 3, 1, 10, 15, 30, tzinfo=UTC), "2024-03-01T10:15:30Z"),
        ("2024-03-01T12:15:30+02:00", datetime(2024, 3, 1, 10, 15, 30, tzinfo=UTC), "2024-03-01T10:15:30Z"),
    ],
)
def test_timestamps_parse_to_aware_utc_and_serialise_with_z(raw: str, expected: datetime, serialised: str) -> None:
    r = parse_referral({"createdDateTime": raw})
    assert r.created_date_time == expected
    assert r.created_date_time is not None and r.created_date_time.utcoffset() is not None
    assert r.to_api() == {"createdDateTime": serialised}


def test_naive_python_datetime_becomes_utc() -> None:
    r = Referral.model_validate({"created_date_time": datetime(2024, 1, 2, 3, 4, 5)})
    assert r.created_date_time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert r.to_api() == {"createdDateTime": "2024-01-02T03:04:05Z"}


# ------------------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("field", "raw", "attr", "expected"),
    [
        ("status", "new", "status", ReferralStatus.NEW),
        ("status", "ACTIVE", "status", ReferralStatus.ACTIVE),
        ("status", "none", "status", ReferralStatus.NONE),
        ("substatus", "received", "substatus", ReferralSubstatus.RECEIVED),
        ("qualification", "marketingqualified", "qualification", Qualification.MARKETING_QUALIFIED),
        ("direction", "outgoing", "direction", Direction.OUTGOING),
        ("type", "INDEPENDENT", "type", ReferralType.INDEPENDENT),
        ("salesStage", "propose", "sales_stage", SalesStage.PROPOSE),
    ],
)
def test_enum_values_are_matched_case_insensitively_and_normalised(
    field: str, raw: str, attr: str, expected: Any
) -> None:
    r = parse_referral({field: raw})
    assert getattr(r, attr) is expected
    assert r.to_api() == {field: expected.value}


def test_nested_enum_case_insensitive() -> None:
    r = parse_referral(
        {
            "inviteContext": {"assistanceRequestCode": "proofofconceptordemo"},
            "target": [{"type": "solutionprofile", "id": "x"}],
            "customerProfile": {"ids": [{"profileType": "duns", "id": "1"}]},
        }
    )
    out = r.to_api()
    assert out["inviteContext"]["assistanceRequestCode"] == "ProofOfConceptOrDemo"
    assert out["target"][0]["type"] == "SolutionProfile"
    assert out["customerProfile"]["ids"][0]["profileType"] == "Duns"


def test_enum_constructor_is_case_insensitive() -> None:
    assert ReferralStatus("closed") is ReferralStatus.CLOSED
    assert ReferralSubstatus(" Won ") is ReferralSubstatus.WON
    assert isinstance(ReferralStatus.NEW, str) and ReferralStatus.NEW == "New"
    with pytest.raises(ValueError):
        ReferralStatus("Bogus")


def test_currency_and_country_are_uppercased() -> None:
    r = parse_referral({"details": {"currency": "eur"}, "customerProfile": {"address": {"country": "gb"}}})
    assert r.details is not None and r.details.currency == "EUR"
    assert r.customer_profile is not None and r.customer_profile.address is not None
    assert r.customer_profile.address.country == "GB"


# --------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("path", "bad_value", "field", "reason_fragment"),
    [
        ("details.dealValue", "lots", "details.dealValue", "valid number"),
        ("details.dealValue", -1, "details.dealValue", "greater than or equal to 0"),
        ("status", "Bogus", "status", "'New'"),
        ("substatus", "Maybe", "substatus", "'Pending'"),
        ("customerProfile.address.country", "USA", "customerProfile.address.country", "2 ASCII letters"),
        ("customerProfile.address.country", "é1", "customerProfile.address.country", "2 ASCII letters"),
        ("details.currency", "dollars", "details.currency", "3 ASCII letters"),
        ("details.currency", "U$D", "details.currency", "3 ASCII letters"),
        ("customerProfile.team", {"firstName": "Dana"}, "customerProfile.team", "valid list"),
        ("team", "Alex", "team", "valid list"),
        ("details.closingDateTime", "not a date", "details.closingDateTime", "datetime"),
        ("createdDateTime", 1700000000, "createdDateTime", "ISO-8601"),
        ("customerProfile.team.0.email", 42, "customerProfile.team.0.email", "valid string"),
        (
            "consent.consentToToShareInfoWithOthers",
            "perhaps",
            "consent.consentToToShareInfoWithOthers",
            "bool",
        ),
        (
            "details.requirements.solutions.1.type",
            "Widget",
            "details.requirements.solutions.1.type",
            "'Name'",
        ),
        ("target.0.type", "Planet", "target.0.type", "'SolutionProfile'"),
        ("customerProfile", "Fabrikam", "customerProfile", "valid dictionary"),
        ("name", ["a"], "name", "valid string"),
    ],
)
def test_malformed_field_is_named_in_error(path: str, bad_value: Any, field: str, reason_fragment: str) -> None:
    err = _parse_error(_with(path, bad_value))
    assert err.field == field
    assert reason_fragment in err.reason
    assert err.referral_id == REFERRAL_ID
    assert err.additional_errors == 0
    assert f"field {field!r}" in str(err)
    assert str(err).startswith(f"Referral {REFERRAL_ID!r}: ")


def test_error_message_format_matches_spec() -> None:
    err = _parse_error({"id": "abc-123", "details": {"dealValue": "lots"}})
    assert str(err) == (
        "Referral 'abc-123': field 'details.dealValue': Input should be a valid number, "
        "unable to parse string as a number (got 'lots')"
    )
    assert isinstance(err, ValueError)


def test_top_level_list_is_rejected_at_root() -> None:
    err = _parse_error([full_referral()])
    assert err.field == "<root>"
    assert err.referral_id is None
    assert "list" in err.reason
    # The document is never echoed.
    assert "Fabrikam" not in str(err)


@pytest.mark.parametrize("doc", [None, "a string", 12, 3.5, True])
def test_other_non_dict_inputs_are_rejected_at_root(doc: Any) -> None:
    assert _parse_error(doc).field == "<root>"


def test_multiple_errors_report_first_and_count_of_the_rest() -> None:
    doc = full_referral()
    doc["status"] = "Bogus"
    doc["details"]["currency"] = "dollars"
    doc["customerProfile"]["address"]["country"] = "USA"
    err = _parse_error(doc)
    assert err.field == "status"  # fields are validated in model order
    assert err.additional_errors == 2
    assert "2 more errors" in str(err)


def test_long_values_are_truncated_in_message() -> None:
    doc = full_referral()
    doc["details"]["dealValue"] = "x" * 500
    err = _parse_error(doc)
    assert "x" * 100 not in str(err)
    assert len(str(err)) < 250
    assert err.value == "x" * 500  # the attribute keeps the real value


def test_bad_nested_object_does_not_echo_whole_document() -> None:
    doc = full_referral()
    doc["customerProfile"]["team"] = {"firstName": "Dana", "notes": "n" * 1000}
    err = _parse_error(doc)
    assert err.field == "customerProfile.team"
    assert "n" * 100 not in str(err)
    assert "Contoso" not in str(err)


def test_referral_id_missing_from_doc() -> None:
    err = _parse_error({"status": "Bogus"})
    assert err.referral_id is None
    assert str(err).startswith("Referral: field 'status'")


def test_parse_error_is_picklable() -> None:
    err = _parse_error({"id": "abc-123", "details": {"dealValue": "lots"}})
    clone = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object
    assert isinstance(clone, ReferralParseError)
    assert (clone.referral_id, clone.field, clone.reason) == (err.referral_id, err.field, err.reason)
    assert str(clone) == str(err)


# ------------------------------------------------------------------ parse_referrals


def test_parse_referrals_keeps_good_items_alongside_bad_ones() -> None:
    good_a = full_referral()
    bad_value = full_referral()
    bad_value["id"] = "bad-1"
    bad_value["details"]["dealValue"] = "lots"
    good_b = {"id": "good-2", "name": "Second", "status": "closed", "substatus": "won"}
    docs = [good_a, bad_value, ["not", "an", "object"], good_b]

    referrals, errors = parse_referrals(docs)

    assert [r.id for r in referrals] == [REFERRAL_ID, "good-2"]
    assert referrals[1].status is ReferralStatus.CLOSED
    assert [(e.referral_id, e.field) for e in errors] == [("bad-1", "details.dealValue"), (None, "<root>")]


def test_parse_referrals_accepts_generator_and_empty() -> None:
    referrals, errors = parse_referrals(d for d in [{"id": "a"}, {"id": "b"}])
    assert [r.id for r in referrals] == ["a", "b"] and errors == []
    assert parse_referrals([]) == ([], [])


# --------------------------------------------------------------- conveniences


def test_convenience_properties() -> None:
    r = parse_referral(full_referral())
    assert r.is_terminal is False
    assert isinstance(r.primary_contact, TeamMember)
    assert r.primary_contact.email == "dana.smith@fabrikam.example"
    assert r.solution_ids == ["sol-migrate-001", "sol-backup-002"]


def test_convenience_properties_on_sparse_referral() -> None:
    r = parse_referral({"status": "Closed", "customerProfile": {"team": []}})
    assert r.is_terminal is True
    assert r.primary_contact is None
    assert r.solution_ids == []
    assert parse_referral({}).primary_contact is None


def test_solution_ids_skip_solutions_without_id() -> None:
    r = parse_referral({"details": {"requirements": {"solutions": [{"name": "no id"}, {"id": "s-1"}]}}})
    assert r.solution_ids == ["s-1"]


# ---------------------------------------------------------------- validate_for_create


def _creatable() -> dict[str, Any]:
    return {
        "name": "New deal",
        "status": "New",
        "substatus": "Pending",
        "customerProfile": {"name": "Fabrikam", "address": {"country": "US"}},
        "details": {"dealValue": 0, "currency": "USD"},
    }


def test_validate_for_create_accepts_minimal_referral() -> None:
    r = parse_referral(_creatable())
    assert r.validate_for_create() is r


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("name"), "name"),
        (lambda d: d.update(name=""), "name"),
        (lambda d: d["customerProfile"].pop("name"), "customerProfile.name"),
        (lambda d: d["customerProfile"].pop("address"), "customerProfile.address.country"),
        (lambda d: d["customerProfile"]["address"].pop("country"), "customerProfile.address.country"),
        (lambda d: d["details"].pop("dealValue"), "details.dealValue"),
        (lambda d: d["details"].pop("currency"), "details.currency"),
        (lambda d: d.pop("status"), "status"),
        (lambda d: d.pop("substatus"), "substatus"),
    ],
)
def test_validate_for_create_names_missing_field(mutate: Any, field: str) -> None:
    doc = _creatable()
    mutate(doc)
    r = parse_referral(doc)
    with pytest.raises(ReferralParseError) as info:
        r.validate_for_create()
    assert info.value.field == field
    assert info.value.additional_errors == 0


def test_validate_for_create_reports_first_missing_and_count() -> None:
    with pytest.raises(ReferralParseError) as info:
        Referral(id="r-9").validate_for_create()
    assert info.value.field == "name"
    assert info.value.referral_id == "r-9"
    assert info.value.additional_errors == 6
    assert "6 more errors" in str(info.value)


def test_validate_for_create_rejects_mismatched_substatus() -> None:
    doc = _creatable()
    doc["substatus"] = "Won"
    with pytest.raises(ReferralParseError) as info:
        parse_referral(doc).validate_for_create()
    assert info.value.field == "substatus"


# ------------------------------------------------------------------- transitions


def test_allowed_transitions_table() -> None:
    expected = {
        ReferralStatus.NEW: {ReferralStatus.NEW, ReferralStatus.ACTIVE, ReferralStatus.CLOSED},
        ReferralStatus.ACTIVE: {ReferralStatus.ACTIVE, ReferralStatus.CLOSED},
        ReferralStatus.CLOSED: set(),
    }
    assert dict(ALLOWED_TRANSITIONS) == expected


@pytest.mark.parametrize(
    ("current", "new", "substatus"),
    [
        ("New", "New", "Pending"),
        ("New", "New", "Received"),
        ("New", "Active", "Accepted"),
        ("New", "Closed", "Declined"),
        ("New", "Closed", "Expired"),
        ("Active", "Active", "Accepted"),
        ("Active", "Closed", "Won"),
        ("Active", "Closed", "Lost"),
        (ReferralStatus.ACTIVE, ReferralStatus.CLOSED, ReferralSubstatus.WON),
        ("new", "ACTIVE", "accepted"),
    ],
)
def test_valid_transitions(current: Any, new: Any, substatus: Any) -> None:
    assert validate_transition(current, new, substatus) is None


@pytest.mark.parametrize(
    ("current", "new", "substatus", "message_fragment"),
    [
        ("Active", "New", "Pending", "cannot move"),
        ("Closed", "Active", "Accepted", "terminal"),
        ("Closed", "New", "Pending", "terminal"),
        ("Closed", "Closed", "Won", "terminal"),
        ("New", "Active", "Pending", "does not fit"),
        ("New", "New", "Accepted", "does not fit"),
        ("New", "Closed", "Accepted", "does not fit"),
        ("Active", "Active", "Won", "does not fit"),
        ("Active", "Closed", "Received", "does not fit"),
        ("New", "None", "None", "cannot move"),
        ("None", "New", "Pending", "no transitions"),
        ("Bogus", "New", "Pending", "unknown current status"),
        ("New", "Bogus", "Pending", "unknown new status"),
        ("New", "New", "Bogus", "unknown new substatus"),
        ("New", "New", None, "unknown new substatus"),
    ],
)
def test_invalid_transitions(current: Any, new: Any, substatus: Any, message_fragment: str) -> None:
    with pytest.raises(ValueError, match=message_fragment):
        validate_transition(current, new, substatus)


# ------------------------------------------------------------------ independence


def test_models_import_without_airflow() -> None:
    code = (
        "import sys, cosell_sync.models; "
        "sys.exit(1 if any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules) else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
