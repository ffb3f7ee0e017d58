"""Pydantic models for the Microsoft Partner Center co-sell *Referral* resource.

The models mirror the JSON resource returned by the Partner Center Referrals API
(``/v1.0/engagements/referrals``).  They are deliberately tolerant:

* almost every field is optional, because real responses omit things;
* unknown fields are accepted and preserved (``extra="allow"``), so a referral read from
  the API can be written back without losing data the models do not know about;
* enum values are matched case-insensitively and normalised to the documented spelling.

They are strict where a wrong value would silently corrupt a sync: wrong JSON types, bad
enum values, unparseable timestamps, malformed currency/country codes and negative deal
values are rejected.  :func:`parse_referral` turns pydantic's ``ValidationError`` into a
compact :class:`ReferralParseError` naming the offending field by its JSON path.

This module must not import Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = [
    "ALLOWED_SUBSTATUSES",
    "ALLOWED_TRANSITIONS",
    "Address",
    "AssistanceRequestCode",
    "Consent",
    "CustomerProfile",
    "Direction",
    "InviteContext",
    "InvitedBy",
    "Link",
    "Links",
    "ProfileId",
    "ProfileType",
    "Qualification",
    "Referral",
    "ReferralDetails",
    "ReferralParseError",
    "ReferralStatus",
    "ReferralSubstatus",
    "ReferralType",
    "Requirements",
    "SalesStage",
    "Solution",
    "SolutionType",
    "Target",
    "TargetType",
    "TeamMember",
    "parse_referral",
    "parse_referrals",
    "validate_transition",
]

#: Maximum length of a value echoed back in an error message.
_MAX_ECHO = 60
_ROOT = "<root>"

_E = TypeVar("_E", bound=StrEnum)


# --------------------------------------------------------------------------- enums


class _CaseInsensitiveStrEnum(StrEnum):
    """``StrEnum`` that also accepts case-insensitive (and whitespace-padded) spellings.

    ``ReferralStatus("new") is ReferralStatus.NEW``.  Pydantic honours ``_missing_`` so the
    same applies when validating models.
    """

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if isinstance(value, str):
            folded = value.strip().casefold()
            for member in cls:
                if member.value.casefold() == folded:
                    return member
        return None


class ReferralStatus(_CaseInsensitiveStrEnum):
    NONE = "None"
    NEW = "New"
    ACTIVE = "Active"
    CLOSED = "Closed"


class ReferralSubstatus(_CaseInsensitiveStrEnum):
    NONE = "None"
    PENDING = "Pending"
    RECEIVED = "Received"
    ACCEPTED = "Accepted"
    WON = "Won"
    LOST = "Lost"
    DECLINED = "Declined"
    EXPIRED = "Expired"


class ReferralType(_CaseInsensitiveStrEnum):
    INDEPENDENT = "Independent"
    SHARED = "Shared"


class Qualification(_CaseInsensitiveStrEnum):
    NONE = "None"
    DIRECT = "Direct"
    MARKETING_QUALIFIED = "MarketingQualified"
    SALES_QUALIFIED = "SalesQualified"


class Direction(_CaseInsensitiveStrEnum):
    INCOMING = "Incoming"
    OUTGOING = "Outgoing"


class SalesStage(_CaseInsensitiveStrEnum):
    QUALIFY = "Qualify"
    DEVELOP = "Develop"
    PROPOSE = "Propose"
    CLOSE = "Close"


class AssistanceRequestCode(_CaseInsensitiveStrEnum):
    UNKNOWN = "Unknown"
    GENERAL_OR_OTHER = "GeneralOrOther"
    CUSTOMER_TECHNICAL_ARCHITECTURE = "CustomerTechnicalArchitecture"
    PROOF_OF_CONCEPT_OR_DEMO = "ProofOfConceptOrDemo"
    QUOTES_OR_LICENSING = "QuotesOrLicensing"
    POST_SALES_CUSTOMER_SUCCESS = "PostSalesCustomerSuccess"
    WORKLOAD_SPECIFIC_VALUE_PROPOSITION = "WorkloadSpecificValueProposition"


class ProfileType(_CaseInsensitiveStrEnum):
    DUNS = "Duns"
    EXTERNAL = "External"


class TargetType(_CaseInsensitiveStrEnum):
    BUSINESS_PROFILE_LOCATION = "BusinessProfileLocation"
    SOLUTION_PROFILE = "SolutionProfile"


class SolutionType(_CaseInsensitiveStrEnum):
    NONE = "None"
    CATEGORY = "Category"
    NAME = "Name"


# --------------------------------------------------------------- annotated scalars


def _reject_non_string_datetime(value: Any) -> Any:
    # pydantic would otherwise read numbers as Unix timestamps; the API only sends ISO strings.
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError("datetime_type", "Input should be an ISO-8601 datetime string")
    return value


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _format_datetime(value: datetime) -> str:
    return _to_utc(value).isoformat().replace("+00:00", "Z")


#: Timezone-aware UTC datetime; naive input is taken as UTC; serialised to JSON as ISO-8601 with ``Z``.
#: Partner Center sends 7 fractional digits; the 7th (sub-microsecond) digit is dropped.
UtcDateTime = Annotated[
    datetime,
    BeforeValidator(_reject_non_string_datetime),
    AfterValidator(_to_utc),
    PlainSerializer(_format_datetime, return_type=str, when_used="json"),
]


def _ascii_letters_upper(length: int, what: str) -> Any:
    def check(value: str) -> str:
        code = value.strip()
        if len(code) != length or not code.isascii() or not code.isalpha():
            raise PydanticCustomError(
                "code_format",
                "{what} should be {length} ASCII letters",
                {"what": what, "length": length},
            )
        return code.upper()

    return AfterValidator(check)


CurrencyCode = Annotated[str, _ascii_letters_upper(3, "ISO 4217 currency code")]
CountryCode = Annotated[str, _ascii_letters_upper(2, "ISO 3166-1 alpha-2 country code")]


# ------------------------------------------------------------------------- models


class _ApiModel(BaseModel):
    """Base: snake_case attributes, camelCase JSON, unknown fields kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
    )

    def to_api(self) -> dict[str, Any]:
        """JSON-ready dict with camelCase keys; fields never set are left out, unknown fields kept."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Address(_ApiModel):
    address_line1: str | None = None
    address_line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: CountryCode | None = None
    region: str | None = None


class TeamMember(_ApiModel):
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone_number: str | None = None
    # Documented loosely (seen as a string and as an object such as {"disableEmails": false}).
    contact_preference: Any = None


class ProfileId(_ApiModel):
    profile_type: ProfileType | None = None
    id: str | None = None


class CustomerProfile(_ApiModel):
    name: str | None = None
    size: str | None = None
    address: Address | None = None
    team: list[TeamMember] | None = None
    ids: list[ProfileId] | None = None


_CONSENT_SHARE_API = "consentToToShareInfoWithOthers"  # sic: the real API's spelling
_CONSENT_SHARE_CORRECT = "consentToShareInfoWithOthers"


class Consent(_ApiModel):
    consent_to_share_info_with_others: bool | None = Field(
        default=None,
        validation_alias=AliasChoices(_CONSENT_SHARE_API, _CONSENT_SHARE_CORRECT, "consent_to_share_info_with_others"),
        serialization_alias=_CONSENT_SHARE_API,
    )
    consent_to_contact: bool | None = None
    consent_to_share_referral_with_microsoft_sellers: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_duplicate_spelling(cls, data: Any) -> Any:
        # If both spellings are sent, the API's own (misspelt) key wins and the other is
        # discarded, so it does not reappear as an unknown extra field on serialisation.
        if isinstance(data, Mapping) and _CONSENT_SHARE_API in data and _CONSENT_SHARE_CORRECT in data:
            data = {k: v for k, v in data.items() if k != _CONSENT_SHARE_CORRECT}
        return data


class Solution(_ApiModel):
    id: str | None = None
    name: str | None = None
    type: SolutionType | None = None
    publisher_name: str | None = None
    solution_type: str | None = None
    price: float | None = None
    quantity: float | None = None
    currency: str | None = None


class Requirements(_ApiModel):
    industries: list[str] | None = None
    products: list[str] | None = None
    services: list[str] | None = None
    solutions: list[Solution] | None = None
    additional_requirements: str | None = None


class ReferralDetails(_ApiModel):
    notes: str | None = None
    deal_value: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    currency: CurrencyCode | None = None
    closing_date_time: UtcDateTime | None = None
    requirements: Requirements | None = None


class InvitedBy(_ApiModel):
    organization_id: str | None = None
    organization_name: str | None = None


class InviteContext(_ApiModel):
    notes: str | None = None
    assistance_request_code: AssistanceRequestCode | None = None
    invited_by: InvitedBy | None = None


class Target(_ApiModel):
    type: TargetType | None = None
    id: str | None = None


class Link(_ApiModel):
    uri: str | None = None
    method: str | None = None


class Links(_ApiModel):
    # ``self`` in JSON; trailing underscore to avoid confusion with the method receiver.
    self_: Link | None = Field(default=None, alias="self")
    related_referrals: Link | None = None


class Referral(_ApiModel):
    """A Partner Center co-sell referral."""

    id: str | None = None
    engagement_id: str | None = None
    organization_id: str | None = None
    organization_name: str | None = None
    name: str | None = None
    external_reference_id: str | None = None

    created_date_time: UtcDateTime | None = None
    updated_date_time: UtcDateTime | None = None
    expiration_date_time: UtcDateTime | None = None
    accepted_date_time: UtcDateTime | None = None
    closed_date_time: UtcDateTime | None = None

    status: ReferralStatus | None = None
    substatus: ReferralSubstatus | None = None
    status_reason: str | None = None
    type: ReferralType | None = None
    qualification: Qualification | None = None
    direction: Direction | None = None
    sales_stage: SalesStage | None = None

    customer_profile: CustomerProfile | None = None
    consent: Consent | None = None
    details: ReferralDetails | None = None
    team: list[TeamMember] | None = None
    invite_context: InviteContext | None = None
    target: list[Target] | None = None
    e_tag: str | None = None
    links: Links | None = None

    registration_status: str | None = None
    tags: list[str] | None = None
    last_modified_via: str | None = None

    # ------------------------------------------------------------ conveniences

    @property
    def is_terminal(self) -> bool:
        """True when the referral is Closed (no further changes are permitted)."""
        return self.status is ReferralStatus.CLOSED

    @property
    def primary_contact(self) -> TeamMember | None:
        """First member of ``customerProfile.team``, if any."""
        if self.customer_profile and self.customer_profile.team:
            return self.customer_profile.team[0]
        return None

    @property
    def solution_ids(self) -> list[str]:
        """Ids of ``details.requirements.solutions`` (solutions without an id are skipped)."""
        if not (self.details and self.details.requirements and self.details.requirements.solutions):
            return []
        return [s.id for s in self.details.requirements.solutions if s.id is not None]

    def validate_for_create(self) -> Self:
        """Check the minimum needed to POST a new referral; return ``self`` if it passes.

        Required: ``name``, ``customerProfile.name``, ``customerProfile.address.country``,
        ``details.dealValue``, ``details.currency``, ``status`` and ``substatus``; the
        substatus must also fit the status (see :data:`ALLOWED_SUBSTATUSES`).

        :raises ReferralParseError: naming the first missing field path.
        """
        profile = self.customer_profile
        address = profile.address if profile else None
        details = self.details
        required: list[tuple[str, object]] = [
            ("name", self.name),
            ("customerProfile.name", profile.name if profile else None),
            ("customerProfile.address.country", address.country if address else None),
            ("details.dealValue", details.deal_value if details else None),
            ("details.currency", details.currency if details else None),
            ("status", self.status),
            ("substatus", self.substatus),
        ]
        missing = [path for path, value in required if value is None or value == ""]
        if missing:
            raise ReferralParseError(
                missing[0],
                "is required to create a referral",
                referral_id=self.id,
                additional_errors=len(missing) - 1,
            )
        assert self.status is not None and self.substatus is not None
        allowed = ALLOWED_SUBSTATUSES.get(self.status)
        if allowed is not None and self.substatus not in allowed:
            raise ReferralParseError(
                "substatus",
                f"substatus {self.substatus.value!r} does not fit status {self.status.value!r} "
                f"(expected one of: {_names(allowed)})",
                referral_id=self.id,
            )
        return self


# ------------------------------------------------------------------------- errors

_MISSING: Any = object()


def _truncate(text: str, limit: int = _MAX_ECHO) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ReferralParseError(ValueError):
    """A referral document (or referral) failed validation.

    :ivar referral_id: the referral's ``id`` if known.
    :ivar field: dotted camelCase JSON path of the offending field, e.g. ``details.dealValue``
        or ``customerProfile.team.0.email``; ``<root>`` for the document itself.
    :ivar reason: what is wrong with it.
    :ivar value: the offending value if known (not echoed in full in the message).
    :ivar additional_errors: how many further problems were found besides this one.
    """

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        referral_id: str | None = None,
        value: Any = _MISSING,
        additional_errors: int = 0,
    ) -> None:
        self.referral_id = referral_id
        self.field = field
        self.reason = reason
        self.value = None if value is _MISSING else value
        self._has_value = value is not _MISSING
        self.additional_errors = additional_errors
        super().__init__(self._render())

    def _render(self) -> str:
        who = f"Referral {_truncate(self.referral_id)!r}" if self.referral_id is not None else "Referral"
        message = f"{who}: field {self.field!r}: {self.reason}"
        if self._has_value:
            message += f" (got {_truncate(repr(self.value))})"
        if self.additional_errors:
            plural = "s" if self.additional_errors != 1 else ""
            message += f" [and {self.additional_errors} more error{plural}]"
        return message

    def __reduce__(self) -> Any:
        # Keep the error picklable despite keyword-only constructor arguments.
        return (_rebuild_parse_error, (self.field, self.reason, self.__dict__.copy()))


def _rebuild_parse_error(field: str, reason: str, state: dict[str, Any]) -> ReferralParseError:
    err = ReferralParseError(field, reason)
    err.__dict__.update(state)
    err.args = (err._render(),)
    return err


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or _ROOT


def _referral_id_of(doc: Any) -> str | None:
    if isinstance(doc, Mapping):
        raw = doc.get("id")
        if raw is not None and raw != "":
            return raw if isinstance(raw, str) else _truncate(repr(raw))
    return None


def _error_from_validation(exc: ValidationError, referral_id: str | None) -> ReferralParseError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    value = _MISSING if first["type"] == "missing" else first.get("input", _MISSING)
    return ReferralParseError(
        _loc_to_path(first["loc"]),
        first["msg"],
        referral_id=referral_id,
        value=value,
        additional_errors=len(errors) - 1,
    )


# ------------------------------------------------------------------------ parsing


def parse_referral(doc: Any) -> Referral:
    """Validate one JSON-decoded referral document.

    :raises ReferralParseError: for the first problem found (the message says how many more).
    """
    referral_id = _referral_id_of(doc)
    if not isinstance(doc, Mapping):
        raise ReferralParseError(
            _ROOT,
            f"expected a JSON object, got {type(doc).__name__}",
            referral_id=referral_id,
        )
    try:
        return Referral.model_validate(dict(doc))
    except ValidationError as exc:
        raise _error_from_validation(exc, referral_id) from None


def parse_referrals(docs: Iterable[Any]) -> tuple[list[Referral], list[ReferralParseError]]:
    """Validate many documents; bad ones are collected as errors, never raised."""
    good: list[Referral] = []
    bad: list[ReferralParseError] = []
    for doc in docs:
        try:
            good.append(parse_referral(doc))
        except ReferralParseError as err:
            bad.append(err)
    return good, bad


# ---------------------------------------------------------------- status machine

#: Status -> statuses it may move to.  ``Closed`` is terminal: no change at all is allowed.
ALLOWED_TRANSITIONS: Mapping[ReferralStatus, frozenset[ReferralStatus]] = {
    ReferralStatus.NEW: frozenset({ReferralStatus.NEW, ReferralStatus.ACTIVE, ReferralStatus.CLOSED}),
    ReferralStatus.ACTIVE: frozenset({ReferralStatus.ACTIVE, ReferralStatus.CLOSED}),
    ReferralStatus.CLOSED: frozenset(),
}

#: Status -> substatuses that fit it.
ALLOWED_SUBSTATUSES: Mapping[ReferralStatus, frozenset[ReferralSubstatus]] = {
    ReferralStatus.NEW: frozenset({ReferralSubstatus.PENDING, ReferralSubstatus.RECEIVED}),
    ReferralStatus.ACTIVE: frozenset({ReferralSubstatus.ACCEPTED}),
    ReferralStatus.CLOSED: frozenset(
        {
            ReferralSubstatus.WON,
            ReferralSubstatus.LOST,
            ReferralSubstatus.DECLINED,
            ReferralSubstatus.EXPIRED,
        }
    ),
}


def _names(members: Iterable[StrEnum]) -> str:
    return ", ".join(sorted(m.value for m in members)) or "(none)"


def _coerce(enum_cls: type[_E], value: Any, what: str) -> _E:
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {_truncate(repr(value))}; expected one of: {_names(enum_cls)}") from None


def validate_transition(
    current_status: ReferralStatus | str,
    new_status: ReferralStatus | str,
    new_substatus: ReferralSubstatus | str,
) -> None:
    """Check that a referral in ``current_status`` may be updated to ``new_status``/``new_substatus``.

    Strings are accepted and matched case-insensitively.

    :raises ValueError: if the move is not permitted or the substatus does not fit the new status.
    """
    current = _coerce(ReferralStatus, current_status, "current status")
    new = _coerce(ReferralStatus, new_status, "new status")
    substatus = _coerce(ReferralSubstatus, new_substatus, "new substatus")

    if current not in ALLOWED_TRANSITIONS:
        raise ValueError(f"no transitions are defined from status {current.value!r}")
    allowed = ALLOWED_TRANSITIONS[current]
    if not allowed:
        raise ValueError(
            f"referral is {current.value!r}, which is terminal; no further changes are permitted "
            f"(attempted {new.value}/{substatus.value})"
        )
    if new not in allowed:
        raise ValueError(
            f"cannot move a referral from status {current.value!r} to {new.value!r}; allowed: {_names(allowed)}"
        )
    fitting = ALLOWED_SUBSTATUSES[new]
    if substatus not in fitting:
        raise ValueError(
            f"substatus {substatus.value!r} does not fit status {new.value!r}; expected one of: {_names(fitting)}"
        )
