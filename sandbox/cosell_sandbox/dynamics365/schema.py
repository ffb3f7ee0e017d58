"""The Dataverse emulator's tables: columns, their types, keys and states, and the currencies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .choices import states

API = "/api/data/v9.2"
NAMESPACE = "Microsoft.Dynamics.CRM"
JSON_TYPE = "application/json; odata.metadata=minimal"
MAX_PAGE_SIZE = 5000  # default and maximum page; larger odata.maxpagesize values are ignored
MAX_COUNT = 5000  # @odata.count stops at 5,000
DELTA_TOKEN_LIFETIME = 7 * 24 * 3600  # Organization.ExpireChangeTrackingInDays default
GUID = r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"
_GUID_RE = re.compile(GUID + r"\Z")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_DATETIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})\Z")
_KEY_PAIR = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*('(?:[^']|'')*'|" + GUID + r"|-?\d+(?:\.\d+)?)\s*(?:,|\Z)")
_BIND = re.compile(r"^(?:https?://[^/]+)?(?:[^()]*/)?(?P<set>[A-Za-z_]\w*)\((?P<key>[^()]*(?:'[^']*'[^()]*)*)\)$")
_IDENTIFIER = re.compile(r"(?<![\w.'])([A-Za-z_]\w*)(?![\w'])")
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")

WON, LOST, OPEN = 1, 2, 0
# statecode -> (its name, the statuscode values that fit it; the first is the default), from the
# tables' option sets (choices.CHOICES, the one place choice options are defined).
STATES: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {
    "opportunities": states("opportunity"),
    "accounts": states("account"),
    "contacts": states("contact"),
}
STATE_NAMES = {state: name for state, (name, _) in STATES["opportunities"].items()}
STATUS_FOR_STATE = {state: statuses for state, (_, statuses) in STATES["opportunities"].items()}
CURRENCIES = [
    ("USD", "US Dollar", "$", 1.0),
    ("EUR", "Euro", "€", 0.92),
    ("GBP", "Pound Sterling", "£", 0.79),
    ("CAD", "Canadian Dollar", "CA$", 1.36),
    ("AUD", "Australian Dollar", "A$", 1.52),
    ("JPY", "Yen", "¥", 151.0),
    ("CHF", "Swiss Franc", "CHF", 0.9),
    ("INR", "Indian Rupee", "₹", 83.3),
    ("BRL", "Brazilian Real", "R$", 5.05),
    ("ZAR", "Rand", "R", 18.6),
    ("SGD", "Singapore Dollar", "S$", 1.35),
]


# ---------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # guid string memo money decimal int bigint choice bool date datetime lookup
    max_length: int | None = None
    required: bool = False
    target: str | None = None  # lookups: the entity set they point to
    nav: str | None = None  # lookups: the single-valued navigation property used with @odata.bind
    minimum: float | None = None
    maximum: float | None = None
    system: bool = False  # server-owned; values sent by clients are ignored
    default: Any = None  # the value a new row gets when the create leaves the column out


EDM = {
    "guid": "Edm.Guid",
    "string": "Edm.String",
    "memo": "Edm.String",
    "money": "Edm.Decimal",
    "decimal": "Edm.Decimal",
    "int": "Edm.Int32",
    "choice": "Edm.Int32",
    "bigint": "Edm.Int64",
    "bool": "Edm.Boolean",
    "date": "Edm.Date",
    "datetime": "Edm.DateTimeOffset",
    "lookup": "Edm.Guid",
}
MONEY_MAX = 922337203685477.0


@dataclass(frozen=True)
class Table:
    set: str
    logical: str
    pk: str
    columns: tuple[Column, ...]
    alternate_key: str | None = None
    read_only: bool = False  # through the API

    def column(self, name: str) -> Column | None:
        return _COLUMN_INDEX[self.set].get(name)

    @property
    def navs(self) -> dict[str, Column]:
        return {c.nav: c for c in self.columns if c.nav}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def type_name(self) -> str:
        return f"{NAMESPACE}.{self.logical}"


def _system(pk: str) -> tuple[Column, ...]:
    return (
        Column(pk, "guid"),
        Column("createdon", "datetime", system=True),
        Column("modifiedon", "datetime", system=True),
        Column("versionnumber", "bigint", system=True),
    )


OPPORTUNITIES = Table(
    "opportunities",
    "opportunity",
    "opportunityid",
    (
        *_system("opportunityid"),
        Column("name", "string", 300, required=True),
        Column("estimatedvalue", "money", minimum=0, maximum=MONEY_MAX),
        Column("_transactioncurrencyid_value", "lookup", target="transactioncurrencies", nav="transactioncurrencyid"),
        Column("estimatedclosedate", "date"),
        Column("description", "memo", 2000),
        Column("salesstage", "choice"),
        Column("statecode", "choice"),
        Column("statuscode", "choice"),
        Column("_parentaccountid_value", "lookup", target="accounts", nav="parentaccountid"),
        Column("_parentcontactid_value", "lookup", target="contacts", nav="parentcontactid"),
        Column("actualvalue", "money", minimum=0, maximum=MONEY_MAX),
        Column("actualclosedate", "date"),
        Column("cosell_syncwithpartnercenter", "bool"),
        Column("cosell_referralid", "string", 100),
        Column("cosell_referrallink", "string", 500),
        Column("cosell_howcanmicrosofthelp", "choice"),
        Column("cosell_solutions", "string", 255),
        # Yes: the referral is shared with Microsoft sellers; No: a private deal (Microsoft Learn,
        # "Create a referral", "Deal types"). A Yes/No (Two Options) column whose default is Yes.
        Column("cosell_sharewithmicrosoft", "bool", default=True),
        Column("cosell_microsoftstatus", "string", 40),  # Microsoft's side of a co-sell engagement
        Column("cosell_audit", "memo", 1_048_576),  # the largest multiline text column Dataverse allows
        Column("cosell_syncstatus", "choice"),
    ),
    alternate_key="cosell_referralid",
)
ACCOUNTS = Table(
    "accounts",
    "account",
    "accountid",
    (
        *_system("accountid"),
        Column("name", "string", 160, required=True),
        Column("statecode", "choice"),
        Column("statuscode", "choice"),
        Column("address1_line1", "string", 250),
        Column("address1_city", "string", 80),
        Column("address1_stateorprovince", "string", 50),
        Column("address1_postalcode", "string", 20),
        Column("address1_country", "string", 80),
    ),
)
CONTACTS = Table(
    "contacts",
    "contact",
    "contactid",
    (
        *_system("contactid"),
        Column("firstname", "string", 50),
        Column("lastname", "string", 50, required=True),
        Column("statecode", "choice"),
        Column("statuscode", "choice"),
        Column("emailaddress1", "string", 100),
        Column("telephone1", "string", 50),
        Column("_parentcustomerid_value", "lookup", target="accounts", nav="parentcustomerid_account"),
    ),
)
TRANSACTION_CURRENCIES = Table(
    "transactioncurrencies",
    "transactioncurrency",
    "transactioncurrencyid",
    (
        *_system("transactioncurrencyid"),
        Column("isocurrencycode", "string", 5, required=True),
        Column("currencyname", "string", 100, required=True),
        Column("currencysymbol", "string", 10),
        Column("exchangerate", "decimal"),
    ),
    read_only=True,
)
# The OpportunityClose entity in Win/LoseOpportunity: validated, not stored as a table.
OPPORTUNITY_CLOSE = Table(
    "opportunitycloses",
    "opportunityclose",
    "activityid",
    (
        *_system("activityid"),
        Column("subject", "string", 200),
        Column("description", "memo", 2000),
        Column("actualrevenue", "money", minimum=0, maximum=MONEY_MAX),
        Column("actualend", "date"),
        Column("_opportunityid_value", "lookup", target="opportunities", nav="opportunityid"),
    ),
)
TABLES = {t.set: t for t in (OPPORTUNITIES, ACCOUNTS, CONTACTS, TRANSACTION_CURRENCIES)}
_COLUMN_INDEX = {t.set: {c.name: c for c in t.columns} for t in (*TABLES.values(), OPPORTUNITY_CLOSE)}
BY_LOGICAL = {t.logical: t for t in TABLES.values()}
