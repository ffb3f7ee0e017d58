"""The Salesforce emulator's org: API versions, limits, picklists and the object schema
(Account, Contact, Opportunity, OpportunityContactRole) as ``describe`` reports it."""

from __future__ import annotations

import re
from typing import Any

from ..seed import HELP_CODES
from .soql import ChildRelationship, FieldDef, ObjectDef, Schema

API_VERSIONS: dict[str, str] = {
    "52.0": "Summer '21",
    "53.0": "Winter '22",
    "54.0": "Spring '22",
    "55.0": "Summer '22",
    "56.0": "Winter '23",
    "57.0": "Spring '23",
    "58.0": "Summer '23",
    "59.0": "Winter '24",
    "60.0": "Spring '24",
    "61.0": "Summer '24",
    "62.0": "Winter '25",
}
ORG_ID = "00D5g000004SbXcEAK"
USER_ID = "0055g00000BqKdWAAV"
USER_PREFIX = "005"
DEFAULT_DAILY_LIMIT = 15000
DEFAULT_BATCH_SIZE = 2000
MIN_BATCH_SIZE = 200
MAX_COLLECTION = 200
MAX_COLLECTION_RETRIEVE = 2000
UPDATED_WINDOW_DAYS = 30
DELETED_WINDOW_DAYS = 15
CURRENCIES = {
    "USD": "U.S. Dollar",
    "EUR": "Euro",
    "GBP": "British Pound",
    "CAD": "Canadian Dollar",
    "AUD": "Australian Dollar",
    "JPY": "Japanese Yen",
    "CHF": "Swiss Franc",
    "INR": "Indian Rupee",
    "BRL": "Brazilian Real",
    "ZAR": "South African Rand",
    "SGD": "Singapore Dollar",
}
STAGES = [
    "Prospecting",
    "Qualification",
    "Needs Analysis",
    "Value Proposition",
    "Id. Decision Makers",
    "Perception Analysis",
    "Proposal/Price Quote",
    "Negotiation/Review",
    "Closed Won",
    "Closed Lost",
]
STAGE_WEIGHTS = [14, 14, 12, 10, 8, 6, 10, 8, 10, 8]
SYNC_STATUS = ["Synced", "Pending", "Error"]
CONTACT_ROLES = [
    "Business User",
    "Decision Maker",
    "Economic Buyer",
    "Economic Decision Maker",
    "Evaluator",
    "Executive Sponsor",
    "Influencer",
    "Technical Buyer",
    "Other",
]
EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"
)
ID_OFFSET = 62**6 * 3 + 62**5 * 17 + 62**4 * 40  # ids look like 0065g0003HdAAAB...
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SESSION_INVALID = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
ROLLED_BACK = {
    "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
    "fields": [],
}
V = r"/services/data/v(?P<version>\d+\.\d)"


# ---------------------------------------------------------------------------
# schema


def _f(name: str, ftype: str, label: str, **kw: Any) -> FieldDef:
    return FieldDef(name=name, type=ftype, label=label, **kw)


def _ref(name: str, label: str, target: str, relationship: str, **kw: Any) -> FieldDef:
    """A lookup (18-character Id) to ``target``, reached in SOQL as ``relationship``."""
    return _f(name, "reference", label, length=18, reference_to=(target,), relationship_name=relationship, **kw)


def _picklist(name: str, label: str, values: Any, length: int = 255, **kw: Any) -> FieldDef:
    """A restricted picklist: a value outside ``values`` is refused."""
    return _f(name, "picklist", label, length=length, picklist=tuple(values), restricted=True, **kw)


def _checkbox(name: str, label: str, default: bool, **kw: Any) -> FieldDef:
    return _f(name, "boolean", label, default=default, **DEFAULTED, **kw)


# A value is required, and the service fills it in when a create leaves it out.
DEFAULTED: dict[str, Any] = {"nillable": False, "defaulted_on_create": True}
# The system sets these fields; nobody writes them.
SYSTEM: dict[str, Any] = {"createable": False, "updateable": False, **DEFAULTED}


def _system_head(label: str) -> list[FieldDef]:
    return [
        _f("Id", "id", f"{label} ID", length=18, **SYSTEM),
        _f("IsDeleted", "boolean", "Deleted", default=False, **SYSTEM),
    ]


def _system_tail(owner: bool = True) -> list[FieldDef]:
    ro = SYSTEM
    fields = []
    if owner:
        fields.append(_ref("OwnerId", "Owner ID", "User", "Owner", **DEFAULTED))
    fields += [
        _f("CreatedDate", "datetime", "Created Date", **ro),
        _ref("CreatedById", "Created By ID", "User", "CreatedBy", **ro),
        _f("LastModifiedDate", "datetime", "Last Modified Date", **ro),
        _ref("LastModifiedById", "Last Modified By ID", "User", "LastModifiedBy", **ro),
        _f("SystemModstamp", "datetime", "System Modstamp", **ro),
    ]
    return fields


def _objdef(
    name: str, label: str, plural: str, prefix: str, fields: list[FieldDef], children: list[ChildRelationship]
) -> ObjectDef:
    return ObjectDef(name, label, plural, prefix, {f.name: f for f in fields}, children)


def build_schema() -> Schema:
    """The objects and fields of the sandbox org (see SPEC section 4, "Default CRM fields")."""
    account = _objdef(
        "Account",
        "Account",
        "Accounts",
        "001",
        [
            *_system_head("Account"),
            _f("Name", "string", "Account Name", length=255, nillable=False, name_field=True),
            _f("BillingStreet", "textarea", "Billing Street", length=255),
            _f("BillingCity", "string", "Billing City", length=40),
            _f("BillingState", "string", "Billing State/Province", length=80),
            _f("BillingPostalCode", "string", "Billing Zip/Postal Code", length=20),
            _f("BillingCountry", "string", "Billing Country", length=80),
            *_system_tail(),
        ],
        [
            ChildRelationship("Contacts", "Contact", "AccountId"),
            ChildRelationship("Opportunities", "Opportunity", "AccountId"),
        ],
    )
    contact = _objdef(
        "Contact",
        "Contact",
        "Contacts",
        "003",
        [
            *_system_head("Contact"),
            _ref("AccountId", "Account ID", "Account", "Account"),
            _f("LastName", "string", "Last Name", length=80, nillable=False),
            _f("FirstName", "string", "First Name", length=40),
            _f("Name", "string", "Full Name", length=121, calculated=True, name_field=True, **SYSTEM),
            _f("Phone", "phone", "Business Phone", length=40),
            _f("Email", "email", "Email", length=80),
            *_system_tail(),
        ],
        [ChildRelationship("OpportunityContactRoles", "OpportunityContactRole", "ContactId")],
    )
    ro_bool = {**SYSTEM, "default": False}
    opportunity = _objdef(
        "Opportunity",
        "Opportunity",
        "Opportunities",
        "006",
        [
            *_system_head("Opportunity"),
            _ref("AccountId", "Account ID", "Account", "Account"),
            _f("Name", "string", "Name", length=120, nillable=False, name_field=True),
            _f("Description", "textarea", "Description", length=32000),
            _picklist("StageName", "Stage", STAGES, nillable=False),
            _f("Amount", "currency", "Amount", precision=18, scale=2),
            _f("CloseDate", "date", "Close Date", nillable=False),
            _f("IsClosed", "boolean", "Closed", calculated=False, **ro_bool),
            _f("IsWon", "boolean", "Won", **ro_bool),
            _picklist("CurrencyIsoCode", "Opportunity Currency", CURRENCIES, 3, default="USD", **DEFAULTED),
            *_system_tail(),
            _checkbox("PC_Sync_With_Partner_Center__c", "Sync With Partner Center", False, custom=True),
            _f("PC_Referral_Id__c", "string", "PC Referral Id", length=100, external_id=True, unique=True, custom=True),
            _f("PC_Referral_Link__c", "url", "PC Referral Link", length=255, custom=True),
            _picklist("PC_How_Can_Microsoft_Help__c", "How Can Microsoft Help", HELP_CODES, custom=True),
            _f("PC_Solutions__c", "string", "PC Solutions", length=255, custom=True),
            # Checked: the referral is shared with Microsoft sellers (partner-led or co-sell);
            # unchecked: a private deal (Microsoft Learn, "Create a referral", "Deal types").
            _checkbox("PC_Share_With_Microsoft__c", "Share With Microsoft", True, custom=True),
            # Microsoft's side of a co-sell engagement, as the sync last read it (read only for people).
            _f("PC_Microsoft_Status__c", "string", "PC Microsoft Status", length=40, custom=True),
            _f("PC_Audit__c", "textarea", "PC Audit", length=131072, custom=True),
            _picklist("PC_Sync_Status__c", "PC Sync Status", SYNC_STATUS, custom=True),
        ],
        [ChildRelationship("OpportunityContactRoles", "OpportunityContactRole", "OpportunityId")],
    )
    contact_role = _objdef(
        "OpportunityContactRole",
        "Opportunity Contact Role",
        "Opportunity Contact Role",
        "00K",
        [
            *_system_head("Opportunity Contact Role"),
            _ref("OpportunityId", "Opportunity ID", "Opportunity", "Opportunity", nillable=False, updateable=False),
            _ref("ContactId", "Contact ID", "Contact", "Contact", nillable=False),
            _f("Role", "picklist", "Role", length=40, picklist=tuple(CONTACT_ROLES)),
            _checkbox("IsPrimary", "Primary", False),
            *_system_tail(owner=False),
        ],
        [],
    )
    return Schema([account, contact, opportunity, contact_role])
