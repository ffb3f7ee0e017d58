"""The shape of the Dataverse emulator's table definitions: metadata errors, schema and display
names, labels, the properties of each metadata type, and ``$select``/``$expand``/``$filter``
of metadata queries."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..server import HTTPError
from .odata import FilterOptions, ODataError, compile_filter
from .records import _err, _query_error

NS = "Microsoft.Dynamics.CRM"
LANGUAGE = 1033  # English; the organization's base language


_IDS = uuid.UUID("6f1c3f0e-3c0b-4d5e-9a55-8d1f6a7c2b10")  # namespace for stable MetadataIds


# ---------------------------------------------------------------------------
# Errors


def _no_property(name: str, type_name: str) -> HTTPError:
    return _query_error(f"Could not find a property named '{name}' on type '{NS}.{type_name}'.")


def _entity_not_found(name: str, mapping: str = "Logical") -> HTTPError:
    # Observed from the service (issue threads quoting it): 0x80041102 with this text; 404 on the Web API.
    return _err(
        404,
        "0x80041102",
        f"The entity with a name = '{name}' with namemapping = '{mapping}' was not found in the MetadataCache.",
    )


def _attribute_not_found(entity: str, name: str) -> HTTPError:
    # Guessed text; the code is AttributeDoesNotExist.
    return _err(404, "0x80041103", f"Could not find attribute with name '{name}' on entity '{entity}'.")


def _segment(segment: str) -> HTTPError:
    # "Troubleshoot Dataverse Web API client errors": 404 0x8006088a "Resource not found for the segment".
    return _err(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")


# ---------------------------------------------------------------------------
# Names and labels


def _label(text: str | None) -> dict[str, Any]:
    if text is None:
        return {"LocalizedLabels": [], "UserLocalizedLabel": None}
    localized = {
        "Label": text,
        "LanguageCode": LANGUAGE,
        "IsManaged": True,
        "MetadataId": _id("label", text),
        "HasChanged": None,
    }
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": dict(localized)}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_IDS, "/".join(parts)))


_ENTITY_INFO: dict[str, dict[str, Any]] = {
    # logical name: SchemaName, DisplayName, DisplayCollectionName, ObjectTypeCode, PrimaryNameAttribute, OwnershipType
    "opportunity": {
        "SchemaName": "Opportunity",
        "CollectionSchemaName": "Opportunities",
        "Display": ("Opportunity", "Opportunities"),
        "ObjectTypeCode": 3,
        "PrimaryNameAttribute": "name",
        "OwnershipType": "UserOwned",
    },
    "account": {
        "SchemaName": "Account",
        "CollectionSchemaName": "Accounts",
        "Display": ("Account", "Accounts"),
        "ObjectTypeCode": 1,
        "PrimaryNameAttribute": "name",
        "OwnershipType": "UserOwned",
    },
    "contact": {
        "SchemaName": "Contact",
        "CollectionSchemaName": "Contacts",
        "Display": ("Contact", "Contacts"),
        "ObjectTypeCode": 2,
        "PrimaryNameAttribute": "fullname",
        "OwnershipType": "UserOwned",
    },
    "transactioncurrency": {
        "SchemaName": "TransactionCurrency",
        "CollectionSchemaName": "TransactionCurrencies",
        "Display": ("Currency", "Currencies"),
        "ObjectTypeCode": 9105,
        "PrimaryNameAttribute": "currencyname",
        "OwnershipType": "OrganizationOwned",
    },
}
_SCHEMA_NAMES = {
    "opportunityid": "OpportunityId",
    "accountid": "AccountId",
    "contactid": "ContactId",
    "createdon": "CreatedOn",
    "modifiedon": "ModifiedOn",
    "versionnumber": "VersionNumber",
    "name": "Name",
    "estimatedvalue": "EstimatedValue",
    "transactioncurrencyid": "TransactionCurrencyId",
    "estimatedclosedate": "EstimatedCloseDate",
    "description": "Description",
    "salesstage": "SalesStage",
    "statecode": "StateCode",
    "statuscode": "StatusCode",
    "parentaccountid": "ParentAccountId",
    "parentcontactid": "ParentContactId",
    "actualvalue": "ActualValue",
    "actualclosedate": "ActualCloseDate",
    "address1_line1": "Address1_Line1",
    "address1_city": "Address1_City",
    "address1_stateorprovince": "Address1_StateOrProvince",
    "address1_postalcode": "Address1_PostalCode",
    "address1_country": "Address1_Country",
    "firstname": "FirstName",
    "lastname": "LastName",
    "emailaddress1": "EMailAddress1",
    "telephone1": "Telephone1",
    "parentcustomerid": "ParentCustomerId",
    "isocurrencycode": "ISOCurrencyCode",
    "currencyname": "CurrencyName",
    "currencysymbol": "CurrencySymbol",
    "exchangerate": "ExchangeRate",
    "cosell_syncwithpartnercenter": "cosell_SyncWithPartnerCenter",
    "cosell_referralid": "cosell_ReferralId",
    "cosell_referrallink": "cosell_ReferralLink",
    "cosell_howcanmicrosofthelp": "cosell_HowCanMicrosoftHelp",
    "cosell_solutions": "cosell_Solutions",
    "cosell_sharewithmicrosoft": "cosell_ShareWithMicrosoft",
    "cosell_microsoftstatus": "cosell_MicrosoftStatus",
    "cosell_audit": "cosell_Audit",
    "cosell_syncstatus": "cosell_SyncStatus",
}
_DISPLAY_NAMES = {
    "estimatedvalue": "Est. Revenue",
    "estimatedclosedate": "Est. Close Date",
    "salesstage": "Sales Stage",
    "statecode": "Status",
    "statuscode": "Status Reason",
    "parentaccountid": "Account",
    "parentcontactid": "Contact",
    "actualvalue": "Actual Revenue",
    "actualclosedate": "Actual Close Date",
    "transactioncurrencyid": "Currency",
    "cosell_syncwithpartnercenter": "Sync with Partner Center",
    "cosell_referralid": "Referral ID",
    "cosell_referrallink": "Referral link",
    "cosell_howcanmicrosofthelp": "How can Microsoft help?",
    "cosell_solutions": "Solutions",
    "cosell_sharewithmicrosoft": "Share with Microsoft",
    "cosell_microsoftstatus": "Microsoft status",
    "cosell_audit": "Co-sell audit",
    "cosell_syncstatus": "Sync status",
    "parentcustomerid": "Company Name",
    "emailaddress1": "Email",
    "telephone1": "Business Phone",
    "isocurrencycode": "Currency Code",
}

# AttributeMetadata type -> its AttributeType; and each type's base types (for casts).
_ATTRIBUTE_TYPES = {
    "UniqueIdentifierAttributeMetadata": "Uniqueidentifier",
    "StringAttributeMetadata": "String",
    "MemoAttributeMetadata": "Memo",
    "MoneyAttributeMetadata": "Money",
    "DecimalAttributeMetadata": "Decimal",
    "IntegerAttributeMetadata": "Integer",
    "BigIntAttributeMetadata": "BigInt",
    "BooleanAttributeMetadata": "Boolean",
    "DateTimeAttributeMetadata": "DateTime",
    "LookupAttributeMetadata": "Lookup",
    "PicklistAttributeMetadata": "Picklist",
    "StateAttributeMetadata": "State",
    "StatusAttributeMetadata": "Status",
}
_ENUM_TYPES = ("PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata")
_BASES = {name: ("EnumAttributeMetadata",) if name in _ENUM_TYPES else () for name in _ATTRIBUTE_TYPES}
_BASE_ATTRIBUTE_PROPS = (
    "MetadataId",
    "HasChanged",
    "AttributeOf",
    "AttributeType",
    "AttributeTypeName",
    "ColumnNumber",
    "Description",
    "DisplayName",
    "EntityLogicalName",
    "ExternalName",
    "IntroducedVersion",
    "IsCustomAttribute",
    "IsCustomizable",
    "IsFilterable",
    "IsLogical",
    "IsManaged",
    "IsPrimaryId",
    "IsPrimaryName",
    "IsRetrievable",
    "IsSearchable",
    "IsSecured",
    "IsValidForCreate",
    "IsValidForRead",
    "IsValidForUpdate",
    "IsValidODataAttribute",
    "LogicalName",
    "RequiredLevel",
    "SchemaName",
    "SourceType",
    "IsAuditEnabled",
)
_TYPE_PROPS = {
    "StringAttributeMetadata": (
        "MaxLength",
        "DatabaseLength",
        "Format",
        "FormatName",
        "ImeMode",
        "IsLocalizable",
        "YomiOf",
    ),
    "MemoAttributeMetadata": ("MaxLength", "DatabaseLength", "Format", "FormatName", "ImeMode", "IsLocalizable"),
    "MoneyAttributeMetadata": ("MaxValue", "MinValue", "Precision", "PrecisionSource", "IsBaseCurrency", "ImeMode"),
    "DecimalAttributeMetadata": ("MaxValue", "MinValue", "Precision", "ImeMode"),
    "IntegerAttributeMetadata": ("MaxValue", "MinValue", "Format"),
    "BigIntAttributeMetadata": ("MaxValue", "MinValue"),
    "BooleanAttributeMetadata": ("DefaultValue",),
    "DateTimeAttributeMetadata": ("Format", "DateTimeBehavior", "ImeMode", "CanChangeDateTimeBehavior"),
    "LookupAttributeMetadata": ("Targets", "Format"),
    "PicklistAttributeMetadata": ("DefaultFormValue", "ParentPicklistLogicalName", "ChildPicklistLogicalNames"),
    "StateAttributeMetadata": ("DefaultFormValue",),
    "StatusAttributeMetadata": ("DefaultFormValue",),
    "EnumAttributeMetadata": ("DefaultFormValue",),
    "UniqueIdentifierAttributeMetadata": (),
}
_ENTITY_PROPS = (
    "MetadataId",
    "HasChanged",
    "LogicalName",
    "SchemaName",
    "EntitySetName",
    "LogicalCollectionName",
    "CollectionSchemaName",
    "PrimaryIdAttribute",
    "PrimaryNameAttribute",
    "ObjectTypeCode",
    "IsCustomEntity",
    "IsManaged",
    "IsActivity",
    "IsIntersect",
    "IsLogicalEntity",
    "IsPrivate",
    "OwnershipType",
    "TableType",
    "ChangeTrackingEnabled",
    "DisplayName",
    "DisplayCollectionName",
    "Description",
    "IntroducedVersion",
    "IsValidForAdvancedFind",
    "IsCustomizable",
    "EntityColor",
    "HasNotes",
    "HasActivities",
    "IsAuditEnabled",
)
_KEY_PROPS = (
    "MetadataId",
    "HasChanged",
    "LogicalName",
    "SchemaName",
    "KeyAttributes",
    "DisplayName",
    "EntityLogicalName",
    "EntityKeyIndexStatus",
    "IsManaged",
    "IsCustomizable",
    "IsSecondaryKey",
    "IntroducedVersion",
)
_OPTIONSET_PROPS = (
    "MetadataId",
    "HasChanged",
    "Name",
    "DisplayName",
    "Description",
    "IsCustomOptionSet",
    "IsGlobal",
    "IsManaged",
    "IsCustomizable",
    "OptionSetType",
    "IntroducedVersion",
    "ExternalTypeName",
    "Options",
    "ParentOptionSetName",
)
_ENTITY_NAVS = ("Attributes", "Keys")
_ATTRIBUTE_NAVS = ("OptionSet", "GlobalOptionSet")


@dataclass
class Spec:
    """Query options of one metadata resource: ``$select`` and the nested ``$expand``s (``$filter`` too)."""

    select: list[str] | None = None
    filter: str | None = None
    expand: dict[str, Spec] | None = None


def _split(text: str, sep: str) -> list[str]:
    """Split at top-level ``sep`` (not inside parentheses or quotes)."""
    parts, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _spec(options: dict[str, str]) -> Spec:
    spec = Spec()
    for name, value in options.items():
        if name == "$select":
            spec.select = _split(value, ",")
        elif name == "$filter":
            spec.filter = value
        elif name == "$expand":
            spec.expand = {}
            for item in _split(value, ","):
                match = re.fullmatch(r"(\w+)\s*(?:\((.*)\))?", item, re.S)
                if not match:
                    raise _query_error(f"Syntax error at position 0 in '{item}'.")
                nested = {}
                for option in _split(match.group(2) or "", ";"):
                    key, _, val = option.partition("=")
                    nested[key.strip()] = val.strip()
                spec.expand[match.group(1)] = _spec(nested)
        elif name in ("$top", "$orderby", "$skip", "$count", "$search", "$apply", "$skiptoken"):
            # "Query table definitions using the Web API": metadata queries take $select, $filter and
            # $expand; paging, ordering and counting are not supported (guessed text).
            raise _query_error(f"The query parameter {name} is not supported")
        elif name.startswith("$"):
            raise _query_error(f"The query parameter '{name}' is not supported.")
    return spec


def _shape(item: dict[str, Any], spec: Spec, allowed: tuple[str, ...], type_name: str) -> dict[str, Any]:
    """``$select`` (MetadataId and ``@odata.type`` always kept) over a full definition."""
    if spec.select is None:
        return {k: v for k, v in item.items() if not k.startswith("_")}
    out: dict[str, Any] = {}
    if "@odata.type" in item:
        out["@odata.type"] = item["@odata.type"]
    for name in spec.select:
        if name.startswith("@") or name == "*":
            continue
        if name not in allowed:
            raise _no_property(name, type_name)
        out[name] = item.get(name)
    out["MetadataId"] = item["MetadataId"]  # always returned
    return out


def _predicate(expr: str | None, paths: tuple[str, ...]) -> Callable[[dict[str, Any]], bool] | None:
    if not expr:
        return None
    # Enum literals (AttributeType eq Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist') compare by name.
    plain = re.sub(r"\b(?:Microsoft\.Dynamics\.CRM\.)?\w+Code'([^']*)'", r"'\1'", expr)
    try:
        return compile_filter(plain, FilterOptions(allowed_paths=frozenset(paths)))  # type: ignore[return-value]
    except ODataError as exc:
        raise _query_error(str(exc)) from None
