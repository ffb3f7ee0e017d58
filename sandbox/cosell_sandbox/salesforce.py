"""Salesforce emulator: the REST API at ``/services/data/vNN.N/`` as simple-salesforce 1.12.x and
the Airflow Salesforce provider use it, plus Bulk API 2.0 ingest and a control plane.

What it serves (paths relative to ``/services/data/vNN.N/``, versions 52.0-62.0, trailing slash
optional as on the real service):

* ``sobjects`` (describeGlobal), ``sobjects/<Object>`` (basic info, create),
  ``sobjects/<Object>/describe``, ``sobjects/<Object>/<id>`` (get with ``?fields=``, update,
  delete), ``sobjects/<Object>/<ExtIdField>/<value>`` (get, upsert: 201/200/300),
  ``sobjects/<Object>/updated`` and ``deleted`` (replication windows);
* ``query`` / ``queryAll`` with the SOQL subset of :mod:`.soql`, snapshot query locators
  (``nextRecordsUrl`` is a path), ``Sforce-Query-Options: batchSize=N``;
* ``composite/sobjects`` (create, update, upsert, delete, retrieve; at most 200 records;
  ``allOrNone``);
* ``jobs/ingest`` (Bulk API 2.0, see :mod:`.salesforce_bulk`);
* ``limits``, with ``Sforce-Limit-Info: api-usage=<used>/<limit>`` on every API response and
  403 ``REQUEST_LIMIT_EXCEEDED`` once the daily allowance is used up.

Every API call needs ``Authorization: Bearer <token>`` with a token this emulator issued
(:meth:`SalesforceEmulator.issue_token`); otherwise 401 ``INVALID_SESSION_ID``. Errors are JSON
arrays ``[{"message", "errorCode", "fields"}]``; per-record results of collections use
``statusCode`` instead of ``errorCode``, as the real API does.

The control plane lives under ``/_sandbox/`` (no token, no faults): reset, seed, state, raw
records, CRM-user edits and deletes, limits, token issue/revoke, schema tweaks and tunables.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from .salesforce_bulk import BulkIngest
from .seed import COMPANIES, CURRENCY, DEAL_NAMES, FIRST, HELP_CODES, LAST, SOLUTIONS
from .server import EmulatorApp, HTTPError, Request, Response, Router
from .soql import (
    ChildRelationship,
    FieldDef,
    ObjectDef,
    QueryError,
    Schema,
    execute,
    normalize_id,
    parse_datetime,
    sf_datetime,
)

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


def _system_head(label: str) -> list[FieldDef]:
    return [
        _f(
            "Id",
            "id",
            f"{label} ID",
            length=18,
            nillable=False,
            createable=False,
            updateable=False,
            defaulted_on_create=True,
        ),
        _f(
            "IsDeleted",
            "boolean",
            "Deleted",
            nillable=False,
            createable=False,
            updateable=False,
            defaulted_on_create=True,
            default=False,
        ),
    ]


def _system_tail(owner: bool = True) -> list[FieldDef]:
    ro = {"createable": False, "updateable": False, "defaulted_on_create": True, "nillable": False}
    fields = []
    if owner:
        fields.append(
            _f(
                "OwnerId",
                "reference",
                "Owner ID",
                length=18,
                nillable=False,
                defaulted_on_create=True,
                reference_to=("User",),
                relationship_name="Owner",
            )
        )
    fields += [
        _f("CreatedDate", "datetime", "Created Date", **ro),
        _f(
            "CreatedById",
            "reference",
            "Created By ID",
            length=18,
            reference_to=("User",),
            relationship_name="CreatedBy",
            **ro,
        ),
        _f("LastModifiedDate", "datetime", "Last Modified Date", **ro),
        _f(
            "LastModifiedById",
            "reference",
            "Last Modified By ID",
            length=18,
            reference_to=("User",),
            relationship_name="LastModifiedBy",
            **ro,
        ),
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
            _f(
                "AccountId",
                "reference",
                "Account ID",
                length=18,
                reference_to=("Account",),
                relationship_name="Account",
            ),
            _f("LastName", "string", "Last Name", length=80, nillable=False),
            _f("FirstName", "string", "First Name", length=40),
            _f(
                "Name",
                "string",
                "Full Name",
                length=121,
                nillable=False,
                createable=False,
                updateable=False,
                defaulted_on_create=True,
                calculated=True,
                name_field=True,
            ),
            _f("Phone", "phone", "Business Phone", length=40),
            _f("Email", "email", "Email", length=80),
            *_system_tail(),
        ],
        [ChildRelationship("OpportunityContactRoles", "OpportunityContactRole", "ContactId")],
    )
    ro_bool = {
        "nillable": False,
        "createable": False,
        "updateable": False,
        "defaulted_on_create": True,
        "default": False,
    }
    opportunity = _objdef(
        "Opportunity",
        "Opportunity",
        "Opportunities",
        "006",
        [
            *_system_head("Opportunity"),
            _f(
                "AccountId",
                "reference",
                "Account ID",
                length=18,
                reference_to=("Account",),
                relationship_name="Account",
            ),
            _f("Name", "string", "Name", length=120, nillable=False, name_field=True),
            _f("Description", "textarea", "Description", length=32000),
            _f("StageName", "picklist", "Stage", length=255, nillable=False, picklist=tuple(STAGES), restricted=True),
            _f("Amount", "currency", "Amount", precision=18, scale=2),
            _f("CloseDate", "date", "Close Date", nillable=False),
            _f("IsClosed", "boolean", "Closed", calculated=False, **ro_bool),
            _f("IsWon", "boolean", "Won", **ro_bool),
            _f(
                "CurrencyIsoCode",
                "picklist",
                "Opportunity Currency",
                length=3,
                nillable=False,
                defaulted_on_create=True,
                default="USD",
                picklist=tuple(CURRENCIES),
                restricted=True,
            ),
            *_system_tail(),
            _f(
                "PC_Sync_With_Partner_Center__c",
                "boolean",
                "Sync With Partner Center",
                nillable=False,
                defaulted_on_create=True,
                default=False,
                custom=True,
            ),
            _f(
                "PC_Referral_Id__c",
                "string",
                "PC Referral Id",
                length=100,
                external_id=True,
                unique=True,
                custom=True,
            ),
            _f("PC_Referral_Link__c", "url", "PC Referral Link", length=255, custom=True),
            _f(
                "PC_How_Can_Microsoft_Help__c",
                "picklist",
                "How Can Microsoft Help",
                length=255,
                picklist=tuple(HELP_CODES),
                restricted=True,
                custom=True,
            ),
            _f("PC_Solutions__c", "string", "PC Solutions", length=255, custom=True),
            # Checked: the referral is shared with Microsoft sellers (partner-led or co-sell);
            # unchecked: a private deal (Microsoft Learn, "Create a referral", "Deal types").
            _f(
                "PC_Share_With_Microsoft__c",
                "boolean",
                "Share With Microsoft",
                nillable=False,
                defaulted_on_create=True,
                default=True,
                custom=True,
            ),
            # Microsoft's side of a co-sell engagement, as the sync last read it (read only for people).
            _f("PC_Microsoft_Status__c", "string", "PC Microsoft Status", length=40, custom=True),
            _f("PC_Audit__c", "textarea", "PC Audit", length=131072, custom=True),
            _f(
                "PC_Sync_Status__c",
                "picklist",
                "PC Sync Status",
                length=255,
                picklist=tuple(SYNC_STATUS),
                restricted=True,
                custom=True,
            ),
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
            _f(
                "OpportunityId",
                "reference",
                "Opportunity ID",
                length=18,
                nillable=False,
                updateable=False,
                reference_to=("Opportunity",),
                relationship_name="Opportunity",
            ),
            _f(
                "ContactId",
                "reference",
                "Contact ID",
                length=18,
                nillable=False,
                reference_to=("Contact",),
                relationship_name="Contact",
            ),
            _f("Role", "picklist", "Role", length=40, picklist=tuple(CONTACT_ROLES)),
            _f("IsPrimary", "boolean", "Primary", nillable=False, defaulted_on_create=True, default=False),
            *_system_tail(owner=False),
        ],
        [],
    )
    return Schema([account, contact, opportunity, contact_role])


# ---------------------------------------------------------------------------
# helpers


class RecordError(Exception):
    """A record-level (DML) error: rendered with ``errorCode`` in REST, ``statusCode`` in collections."""

    def __init__(self, code: str, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = list(fields)

    def item(self) -> dict[str, Any]:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}

    def http(self, status: int = 400) -> HTTPError:
        return HTTPError(status, self.code, self.message, fields=self.fields)


def _bad(code: str, message: str, status: int = 400) -> HTTPError:
    return HTTPError(status, code, message)


def _not_found() -> HTTPError:
    return _bad("NOT_FOUND", "The requested resource does not exist", 404)


def _ext_not_found(value: str) -> HTTPError:
    return _bad("NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {value}", 404)


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, rem = divmod(n, 62)
        out.append(BASE62[rem])
    return "".join(reversed(out))


def _trunc_minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def _json_token(value: Any) -> tuple[str, str]:
    """(Jackson token name, text) of a JSON value, for JSON_PARSER_ERROR messages."""
    if isinstance(value, bool):
        return ("VALUE_TRUE" if value else "VALUE_FALSE"), ("true" if value else "false")
    if isinstance(value, int):
        return "VALUE_NUMBER_INT", str(value)
    if isinstance(value, float):
        return "VALUE_NUMBER_FLOAT", repr(value)
    if isinstance(value, dict):
        return "START_OBJECT", "{"
    if isinstance(value, list):
        return "START_ARRAY", "["
    return "VALUE_STRING", str(value)


class _Locator:
    """Finds where a key's value sits in a raw JSON body, for Jackson-style ``[line:L, column:C]``."""

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.seen: dict[str, int] = {}

    def where(self, key: str) -> str:
        occurrence = self.seen.get(key.lower(), 0)
        pattern = re.compile(r'"' + re.escape(key) + r'"\s*:\s*', re.IGNORECASE)
        matches = list(pattern.finditer(self.raw))
        pos = 0
        if matches:
            match = matches[min(occurrence, len(matches) - 1)]
            pos = match.end()
            token = re.match(r'"(?:[^"\\]|\\.)*"|[^,}\]\s]+|[\[{]', self.raw[pos:])
            pos += len(token.group(0)) if token else 0
        line = self.raw.count("\n", 0, pos) + 1
        column = pos - (self.raw.rfind("\n", 0, pos) + 1)
        return f"[line:{line}, column:{column}]"

    def advance(self, record: dict[str, Any]) -> None:
        for key in record:
            self.seen[key.lower()] = self.seen.get(key.lower(), 0) + 1


def _json_type_name(fdef: FieldDef) -> str:
    return {"id": "id", "reference": "id", "datetime": "datetime"}.get(
        fdef.type, fdef.type if fdef.type in ("boolean", "currency", "double", "int", "date") else "string"
    )


@dataclass
class _Cursor:
    id: str
    records: list[dict[str, Any]]
    endpoint: str
    version: str
    batch: int
    touched: float


class _Source:
    """The :class:`soql.DataSource` over the emulator's store, with a per-query child index."""

    def __init__(self, store: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.store = store
        self._children: dict[tuple[str, str, bool], dict[str, list[dict[str, Any]]]] = {}

    def rows(self, obj: str, include_deleted: bool) -> Iterable[dict[str, Any]]:
        records = self.store.get(obj, {}).values()
        return list(records) if include_deleted else [r for r in records if not r["IsDeleted"]]

    def by_id(self, obj: str, record_id: str) -> dict[str, Any] | None:
        return self.store.get(obj, {}).get(record_id)

    def children(self, child: str, fk: str, parent_id: str, include_deleted: bool) -> list[dict[str, Any]]:
        key = (child, fk, include_deleted)
        index = self._children.get(key)
        if index is None:
            index = {}
            for rec in self.rows(child, include_deleted):
                if rec.get(fk):
                    index.setdefault(rec[fk], []).append(rec)
            self._children[key] = index
        return index.get(parent_id, [])


# ---------------------------------------------------------------------------
# the emulator


class SalesforceEmulator(EmulatorApp):
    name = "salesforce"

    def __init__(self, access_token: str | None = None) -> None:
        self.schema = build_schema()
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.tokens: set[str] = set()
        self.daily_limit = DEFAULT_DAILY_LIMIT
        self.api_used = 0
        self.query_locator_ttl = 15 * 60.0  # seconds of inactivity before a locator expires
        self.max_open_cursors = 10  # per user, as on the real service (oldest are released)
        self.bulk_delay = 0.05  # seconds a closed Bulk API 2.0 job waits before and while processing
        self.clock: Callable[[], float] = time.time
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._ext_index: dict[tuple[str, str], dict[str, set[str]]] = {}
        self._counters: dict[str, int] = {}
        self._last_ms = 0
        self._undo: list[tuple[str, str, dict[str, Any] | None]] | None = None
        self._tls = threading.local()
        self._routes_seen: list[tuple[str, re.Pattern[str]]] = []
        self.bulk = BulkIngest(self)
        super().__init__()
        # A given token (the sandbox reuses one across restarts, so printed connections stay valid).
        self.access_token = access_token or self.issue_token()
        self.tokens.add(self.access_token)
        self._reset_store()

    # -- tokens, limits, time -------------------------------------------------------
    def issue_token(self) -> str:
        """A new session token (``<org id>!<opaque>``) that the API accepts until revoked."""
        token = f"{ORG_ID[:15]}!AQ0AQ" + secrets.token_urlsafe(72).replace("-", ".")
        with self.lock:
            self.tokens.add(token)
        return token

    def revoke_tokens(self, token: str | None = None) -> int:
        """Revoke one token, or every token when ``token`` is None; returns how many were revoked."""
        with self.lock:
            if token is None:
                count = len(self.tokens)
                self.tokens.clear()
                return count
            if token in self.tokens:
                self.tokens.discard(token)
                return 1
            return 0

    def set_limits(self, daily_api_requests: int | None = None, used: int | None = None) -> None:
        with self.lock:
            if daily_api_requests is not None:
                self.daily_limit = int(daily_api_requests)
            if used is not None:
                self.api_used = int(used)

    @property
    def api_usage(self) -> tuple[int, int]:
        return self.api_used, self.daily_limit

    def configure(
        self,
        *,
        query_locator_ttl: float | None = None,
        max_open_cursors: int | None = None,
        bulk_delay: float | None = None,
    ) -> None:
        with self.lock:
            if query_locator_ttl is not None:
                self.query_locator_ttl = float(query_locator_ttl)
            if max_open_cursors is not None:
                self.max_open_cursors = int(max_open_cursors)
            if bulk_delay is not None:
                self.bulk_delay = float(bulk_delay)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _stamp(self) -> str:
        """A SystemModstamp: millisecond precision, strictly increasing across writes."""
        now_ms = int(self.clock() * 1000)
        self._last_ms = max(now_ms, self._last_ms + 1)
        return sf_datetime(datetime.fromtimestamp(self._last_ms / 1000, UTC))

    def _new_id(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        id15 = f"{prefix}5g0{_base62(n + ID_OFFSET, 9)}"
        normalized = normalize_id(id15)
        assert normalized is not None
        return normalized

    # -- routing ------------------------------------------------------------------
    def routes(self, router: Router) -> None:
        s = r"/?"
        obj = r"/sobjects/(?P<obj>[^/]+)"
        api = self._api
        router.add("GET", r"/services/data/?", self._versions)
        api(router, "GET", V + s, self._directory)
        api(router, "GET", V + r"/limits" + s, self._limits)
        api(router, "GET", V + r"/sobjects" + s, self._describe_global)
        api(router, "GET", V + obj + s, self._sobject_info)
        api(router, "POST", V + obj + s, self._create)
        api(router, "GET", V + obj + r"/describe" + s, self._describe)
        api(router, "GET", V + obj + r"/updated" + s, self._updated)
        api(router, "GET", V + obj + r"/deleted" + s, self._deleted)
        api(router, "GET", V + obj + r"/(?P<id>[^/]+)" + s, self._get)
        api(router, "PATCH", V + obj + r"/(?P<id>[^/]+)" + s, self._update)
        api(router, "DELETE", V + obj + r"/(?P<id>[^/]+)" + s, self._delete)
        api(router, "GET", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._get_by_ext)
        api(router, "PATCH", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._upsert)
        api(router, "DELETE", V + obj + r"/(?P<field>[^/]+)/(?P<value>.+)", self._delete_by_ext)
        for endpoint in ("query", "queryAll"):
            api(router, "GET", V + rf"/(?P<endpoint>{endpoint})" + s, self._query)
            api(router, "GET", V + rf"/(?P<endpoint>{endpoint})/(?P<locator>[^/]+)" + s, self._query_more)
        coll = V + r"/composite/sobjects"
        api(router, "POST", coll + s, self._collection_create)
        api(router, "PATCH", coll + s, self._collection_update)
        api(router, "DELETE", coll + s, self._collection_delete)
        api(router, "GET", coll + r"/(?P<obj>[^/]+)" + s, self._collection_retrieve)
        api(router, "POST", coll + r"/(?P<obj>[^/]+)" + s, self._collection_retrieve)
        api(router, "PATCH", coll + r"/(?P<obj>[^/]+)/(?P<field>[^/]+)" + s, self._collection_upsert)
        jobs = V + r"/jobs/ingest"
        job = jobs + r"/(?P<job>[^/]+)"
        api(router, "POST", jobs + s, self.bulk.create_job)
        api(router, "GET", jobs + s, self.bulk.list_jobs)
        api(router, "GET", job + s, self.bulk.get_job)
        api(router, "PATCH", job + s, self.bulk.patch_job)
        api(router, "DELETE", job + s, self.bulk.delete_job)
        api(router, "PUT", job + r"/batches" + s, self.bulk.upload)
        api(
            router, "GET", job + r"/(?P<kind>successfulResults|failedResults|unprocessedrecords)" + s, self.bulk.results
        )
        api(router, "GET", job + r"/(?P<kind>(?i:unprocessedrecords))" + s, self.bulk.results)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
            router.add(method, r"/services/.*", self._unknown)
        # control plane
        router.add("POST", r"/_sandbox/reset", self._cp_reset)
        router.add("POST", r"/_sandbox/seed", self._cp_seed)
        router.add("GET", r"/_sandbox/state", self._cp_state)
        router.add("POST", r"/_sandbox/config", self._cp_config)
        router.add("POST", r"/_sandbox/limits", self._cp_limits)
        router.add("POST", r"/_sandbox/tokens", self._cp_issue)
        router.add("POST", r"/_sandbox/tokens/revoke", self._cp_revoke)
        router.add("POST", r"/_sandbox/schema/external-id", self._cp_external_id)
        router.add("GET", r"/_sandbox/records/(?P<obj>[^/]+)", self._cp_records)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)", self._cp_create)
        router.add("GET", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)", self._cp_record)
        router.add("DELETE", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)", self._cp_delete)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)/edit", self._cp_edit)
        router.add("POST", r"/_sandbox/records/(?P<obj>[^/]+)/(?P<id>[^/]+)/touch", self._cp_touch)
        router.add("GET", r"/_sandbox/bulk/jobs", self._cp_jobs)

    def _api(self, router: Router, method: str, pattern: str, handler: Callable[[Request], Response]) -> None:
        """Register an API route behind the session check, the version check and the request limit."""
        self._routes_seen.append((method, re.compile(pattern + r"\Z")))

        def guarded(request: Request) -> Response:
            self._authorize(request)
            if request.params.get("version") not in API_VERSIONS:
                raise _not_found()
            return handler(request)

        router.add(method, pattern, guarded)

    def _authorize(self, request: Request) -> None:
        """401 without a valid session; 403 once the daily allowance is spent; otherwise count the call."""
        header = request.headers.get("Authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        with self.lock:
            if scheme.lower() not in ("bearer", "oauth") or token.strip() not in self.tokens:
                raise HTTPError(401, "INVALID_SESSION_ID", "Session expired or invalid", {"WWW-Authenticate": "Token"})
            self._tls.counted = True
            if self.api_used >= self.daily_limit:
                raise _bad("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.", 403)
            self.api_used += 1

    def _unknown(self, request: Request) -> Response:
        self._authorize(request)
        allowed = sorted({m for m, regex in self._routes_seen if regex.match(request.path) and m != request.method})
        if allowed:
            raise HTTPError(
                405,
                "METHOD_NOT_ALLOWED",
                f"HTTP Method '{request.method}' not allowed. Allowed are {','.join(allowed)}",
            )
        raise _not_found()

    def dispatch(self, request: Request) -> tuple[Response | None, str | None]:
        self._tls.counted = False  # set by _authorize once the request passed the session check
        return super().dispatch(request)

    def decorate(self, request: Request, response: Response) -> None:
        counted = getattr(self._tls, "counted", False)
        self._tls.counted = False
        if counted and response.status != 401:
            with self.lock:
                response.headers.set("Sforce-Limit-Info", f"api-usage={self.api_used}/{self.daily_limit}")

    def error_response(self, err: HTTPError, request: Request) -> Response:
        code, message = err.code, err.message
        if code == "methodNotAllowed":
            code = "METHOD_NOT_ALLOWED"
            message = f"HTTP Method '{request.method}' not allowed. Allowed are {err.headers.get('Allow', '')}"
        elif code == "itemNotFound":
            code, message = "NOT_FOUND", "The requested resource does not exist"
        elif code == "generalException":
            code = "UNKNOWN_EXCEPTION"
            error_id = f"{secrets.randbelow(10**9)}-{secrets.randbelow(10**5)} (-{secrets.randbelow(10**9)})"
            message = f"An unexpected error occurred. Please include this ErrorId if you contact support: {error_id}"
        body: dict[str, Any] = {"message": message, "errorCode": code}
        if "fields" in err.extra:
            body["fields"] = list(err.extra["fields"])
        return Response.json([body], err.status, err.headers)

    def throttle_response(self, request: Request, retry_after: float) -> Response:
        seconds = int(retry_after) if retry_after == int(retry_after) else int(retry_after) + 1
        return Response.json(
            [{"message": "Too many requests. Try again later.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            429,
            {"Retry-After": str(seconds)},
        )

    def unavailable_response(self, request: Request, status: int) -> Response:
        headers = {"Retry-After": "1"} if status == 503 else {}
        code = "SERVER_UNAVAILABLE" if status == 503 else "UNKNOWN_EXCEPTION"
        return Response.json(
            [
                {
                    "message": "The server is temporarily unable to service your request. Please try again later.",
                    "errorCode": code,
                }
            ],
            status,
            headers,
        )

    # -- request parsing ---------------------------------------------------------------
    @staticmethod
    def _body(request: Request) -> tuple[Any, str]:
        """The JSON body and its text; Jackson-style JSON_PARSER_ERROR otherwise."""
        text = request.body.decode("utf-8", errors="replace")
        if not text.strip():
            raise _bad("JSON_PARSER_ERROR", "No content to map due to end-of-input at [line:1, column:0]")
        try:
            return json.loads(text), text
        except json.JSONDecodeError as exc:
            ch = text[exc.pos] if exc.pos < len(text) else "<EOF>"
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Unexpected character ('{ch}' (code {ord(ch) if len(ch) == 1 else -1})): was expecting double-quote "
                f"to start field name or a valid value at [line:{exc.lineno}, column:{exc.colno}]",
            ) from None

    def _object(self, name: str) -> ObjectDef:
        odef = self.schema.get(name)
        if odef is None:
            raise _not_found()
        return odef

    def _url(self, version: str, obj: str, record_id: str) -> str:
        return f"/services/data/v{version}/sobjects/{obj}/{record_id}"

    def _coerce_json(self, fdef: FieldDef, value: Any, where: Callable[[], str]) -> Any:
        """A JSON value as the stored value of ``fdef`` (Salesforce's lenient scalar coercions)."""

        def fail() -> HTTPError:
            token, text = _json_token(value)
            return _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {_json_type_name(fdef)} from {token} value {text} or request may "
                f"be missing a required field at {where()}",
            )

        if value is None:
            return False if fdef.type == "boolean" else None
        if isinstance(value, dict | list):
            raise fail()
        ftype = fdef.type
        if ftype == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise fail()
        if ftype in ("currency", "double", "percent", "int"):
            if isinstance(value, bool):
                raise fail()
            try:
                number = Decimal(str(value).strip())
            except InvalidOperation:
                raise fail() from None
            if not number.is_finite():
                raise fail()
            return number
        if ftype == "date":
            if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                try:
                    return date.fromisoformat(value).isoformat()
                except ValueError:
                    pass
            raise fail()
        if ftype == "datetime":
            if isinstance(value, str):
                try:
                    return sf_datetime(parse_datetime(value))
                except ValueError:
                    pass
            raise fail()
        if ftype in ("id", "reference"):
            if isinstance(value, str):
                return value.strip() or None
            raise fail()
        if isinstance(value, bool):
            return "true" if value else "false"
        text = value if isinstance(value, str) else json.dumps(value)
        return text if text != "" else None

    def _from_json(self, odef: ObjectDef, body: Any, locator: _Locator) -> dict[str, Any]:
        """A record body as {canonical field name: value}; unknown fields and bad types fail the request."""
        if not isinstance(body, dict):
            token, text = _json_token(body)
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {odef.name} from {token} value {text} or request may be missing a "
                "required field at [line:1, column:1]",
            )
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key == "attributes" and isinstance(value, dict):
                continue
            fdef = odef.field(key)
            if fdef is None:
                raise _bad("INVALID_FIELD", f"No such column '{key}' on sobject of type {odef.name}")
            values[fdef.name] = self._coerce_json(fdef, value, lambda k=key: locator.where(k))
        locator.advance(body)
        return values

    # -- the store ----------------------------------------------------------------------
    def _reset_store(self) -> None:
        self.records = {name: {} for name in self.schema.objects}
        self._ext_index = {}
        for odef in self.schema.objects.values():
            for fdef in odef.fields.values():
                if fdef.external_id or fdef.unique:
                    self._ext_index[(odef.name, fdef.name)] = {}
        if "OpportunityContactRole" in self.records:  # an opportunity's roles, for :meth:`_after_write`
            self._ext_index[("OpportunityContactRole", "OpportunityId")] = {}

    def _index_ops(self, obj: str, record: dict[str, Any] | None, add: bool) -> None:
        if record is None or record.get("IsDeleted"):
            return
        for (iobj, fname), index in self._ext_index.items():
            if iobj != obj:
                continue
            value = record.get(fname)
            if value is None:
                continue
            key = str(value).casefold()
            if add:
                index.setdefault(key, set()).add(record["Id"])
            else:
                ids = index.get(key)
                if ids is not None:
                    ids.discard(record["Id"])
                    if not ids:
                        del index[key]

    def _put(self, obj: str, record: dict[str, Any]) -> None:
        store = self.records[obj]
        old = store.get(record["Id"])
        if self._undo is not None:
            self._undo.append((obj, record["Id"], old))
        self._index_ops(obj, old, add=False)
        store[record["Id"]] = record
        self._index_ops(obj, record, add=True)

    @contextmanager
    def _transaction(self) -> Iterator[list[tuple[str, str, dict[str, Any] | None]]]:
        """Collect an undo log of every store write; :meth:`_rollback` reverts it."""
        outer = self._undo
        self._undo = []
        try:
            yield self._undo
        finally:
            self._undo = outer

    def _rollback(self, log: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        for obj, record_id, old in reversed(log):
            store = self.records[obj]
            self._index_ops(obj, store.get(record_id), add=False)
            if old is None:
                store.pop(record_id, None)
            else:
                store[record_id] = old
                self._index_ops(obj, old, add=True)

    def _ext_matches(self, obj: str, fname: str, value: Any) -> list[str]:
        index = self._ext_index.get((obj, fname))
        if index is None:
            return []
        return sorted(index.get(str(value).casefold(), ()))

    # -- validation and writes --------------------------------------------------------
    def _resolve_record_id(self, odef: ObjectDef, raw: str, *, rest: bool) -> str:
        """The canonical Id of a live record of ``odef`` named by ``raw``; the real errors otherwise."""
        normalized = normalize_id(raw)
        if normalized is None:
            if rest:
                raise _ext_not_found(raw)
            raise RecordError("MALFORMED_ID", f"malformed id {raw}")
        if normalized[:3] != odef.key_prefix:
            raise RecordError("MALFORMED_ID", f"{odef.label} ID: id value of incorrect type: {raw}", ["Id"])
        record = self.records[odef.name].get(normalized)
        if record is None:
            if rest:
                raise _not_found()
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        if record["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [])
        return normalized

    def _check_reference(self, fdef: FieldDef, value: str) -> str:
        normalized = normalize_id(value)
        if normalized is None:
            raise RecordError("MALFORMED_ID", f"{fdef.label}: id value of incorrect type: {value}", [fdef.name])
        prefixes = {USER_PREFIX} if "User" in fdef.reference_to else set()
        prefixes |= {o.key_prefix for t in fdef.reference_to if (o := self.schema.get(t)) is not None}
        if normalized[:3] not in prefixes:
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION", f"{fdef.label}: id value of incorrect type: {value}", [fdef.name]
            )
        if normalized[:3] == USER_PREFIX:
            if normalized != USER_ID:
                raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [fdef.name])
            return normalized
        target = self.records[fdef.reference_to[0]].get(normalized)
        if target is None:
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [fdef.name])
        if target["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [fdef.name])
        return normalized

    def _validate(self, odef: ObjectDef, values: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
        """Check a create (``existing`` None) or an update; returns the merged record (system fields not set)."""
        creating = existing is None
        values = dict(values)
        if "Id" in values:
            if creating:
                raise RecordError("INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"])
            if normalize_id(str(values["Id"])) == existing["Id"]:
                del values["Id"]
        read_only = [
            name for name in values if not (odef.fields[name].createable if creating else odef.fields[name].updateable)
        ]
        if read_only:
            raise RecordError(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(read_only)}. Please check the security settings of this "
                "field and verify that it is read/write for your role or profile.",
                read_only,
            )
        merged = dict(existing) if existing else {}
        if creating:
            for fdef in odef.fields.values():
                if fdef.default is not None:
                    merged[fdef.name] = fdef.default
            if "OwnerId" in odef.fields:
                merged["OwnerId"] = USER_ID
        merged.update(values)
        missing = [
            f.name
            for f in odef.fields.values()
            if f.type != "boolean"
            and not f.nillable
            and (f.createable if creating else f.updateable)
            and merged.get(f.name) is None
            and (creating or f.name in values)
        ]
        if missing:
            raise RecordError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
        for fdef in odef.fields.values():
            if fdef.name not in values:
                continue
            value = merged[fdef.name]
            if value is None:
                continue
            if fdef.type == "picklist" and fdef.restricted and value not in fdef.picklist:
                raise RecordError(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"{fdef.label}: bad value for restricted picklist field: {value}",
                    [fdef.name],
                )
            if (
                isinstance(value, str)
                and fdef.length
                and fdef.type not in ("id", "reference")
                and len(value) > fdef.length
            ):
                raise RecordError(
                    "STRING_TOO_LONG",
                    f"{fdef.label}: data value too large: {value} (max length={fdef.length})",
                    [fdef.name],
                )
            if fdef.type == "email" and not EMAIL_RE.fullmatch(value):
                raise RecordError("INVALID_EMAIL_ADDRESS", f"{fdef.label}: invalid email address: {value}", [fdef.name])
            if isinstance(value, Decimal):
                # Checked before rounding as well: 1e300 cannot be quantized at 28 digits, and the
                # real API answers it per record (NUMBER_OUTSIDE_VALID_RANGE), never with a 500.
                digits = fdef.precision - fdef.scale if fdef.precision else 18
                out_of_range = abs(value) >= Decimal(10) ** digits
                if not out_of_range:
                    if fdef.type == "int":
                        value = value.to_integral_value()
                    else:
                        value = value.quantize(Decimal(1).scaleb(-fdef.scale), rounding=ROUND_HALF_UP)
                    out_of_range = abs(value) >= Decimal(10) ** digits
                if out_of_range:
                    raise RecordError(
                        "NUMBER_OUTSIDE_VALID_RANGE",
                        f"{fdef.label}: value outside of valid range on numeric field: {value}",
                        [fdef.name],
                    )
                merged[fdef.name] = int(value) if fdef.type == "int" else float(value)
            if fdef.type == "reference":
                merged[fdef.name] = self._check_reference(fdef, value)
        for fdef in odef.fields.values():
            if fdef.unique and fdef.name in values and merged.get(fdef.name) is not None:
                others = [
                    i for i in self._ext_matches(odef.name, fdef.name, merged[fdef.name]) if i != merged.get("Id")
                ]
                if others:
                    raise RecordError(
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {fdef.name} duplicates value on record with id: {others[0]}",
                        [],
                    )
        return merged

    def _derive(self, odef: ObjectDef, record: dict[str, Any]) -> None:
        if odef.name == "Opportunity":
            record["IsClosed"] = record.get("StageName") in ("Closed Won", "Closed Lost")
            record["IsWon"] = record.get("StageName") == "Closed Won"
        elif odef.name == "Contact":
            record["Name"] = " ".join(p for p in (record.get("FirstName"), record.get("LastName")) if p)

    def _after_write(self, odef: ObjectDef, record: dict[str, Any]) -> None:
        """Side effects of a save: a new primary contact role demotes the others."""
        if odef.name == "OpportunityContactRole" and record.get("IsPrimary"):
            roles = self.records["OpportunityContactRole"]
            for other in [roles[i] for i in self._ext_matches(odef.name, "OpportunityId", record.get("OpportunityId"))]:
                if (
                    other["Id"] != record["Id"]
                    and not other["IsDeleted"]
                    and other.get("OpportunityId") == record.get("OpportunityId")
                    and other.get("IsPrimary")
                ):
                    self._put(odef.name, {**other, "IsPrimary": False, "SystemModstamp": self._stamp()})

    def create_record(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """Insert (values keyed by canonical field names, already typed); raises :class:`RecordError`."""
        odef = self._object(obj)
        record = self._validate(odef, values, None)
        stamp = self._stamp()
        record.update(
            Id=self._new_id(odef.key_prefix),
            IsDeleted=False,
            CreatedDate=stamp,
            CreatedById=USER_ID,
            LastModifiedDate=stamp,
            LastModifiedById=USER_ID,
            SystemModstamp=stamp,
        )
        self._derive(odef, record)
        full = {name: record.get(name) for name in odef.fields}
        self._put(odef.name, full)
        self._after_write(odef, full)
        return full

    def update_record(
        self, obj: str, record_id: str, values: dict[str, Any], *, user_edit: bool = True
    ) -> dict[str, Any]:
        odef = self._object(obj)
        existing = self.records[odef.name][record_id]
        record = self._validate(odef, values, existing)
        stamp = self._stamp()
        record["SystemModstamp"] = stamp
        if user_edit:
            record["LastModifiedDate"] = stamp
            record["LastModifiedById"] = USER_ID
        self._derive(odef, record)
        self._put(odef.name, record)
        self._after_write(odef, record)
        return record

    def _delete_cascade(self, obj: str, record_id: str) -> None:
        odef = self.schema.objects[obj]
        record = self.records[obj][record_id]
        stamp = self._stamp()
        deleted = {**record, "IsDeleted": True, "SystemModstamp": stamp, "LastModifiedDate": stamp, "_deleted": stamp}
        self._put(obj, deleted)
        for rel in odef.children:
            if not rel.cascade_delete:
                continue
            for child in list(self.records[rel.child].values()):
                if child.get(rel.field) == record_id and not child["IsDeleted"]:
                    self._delete_cascade(rel.child, child["Id"])

    def purge_record(self, obj: str, record_id: str) -> None:
        """Hard delete: the record (and its cascade) leaves the org without passing the recycle bin."""
        odef = self.schema.objects[obj]
        record = self.records[obj].get(record_id)
        if record is None:
            return
        for rel in odef.children:
            if rel.cascade_delete:
                for child in [c for c in self.records[rel.child].values() if c.get(rel.field) == record_id]:
                    self.purge_record(rel.child, child["Id"])
        self._index_ops(obj, record, add=False)
        del self.records[obj][record_id]

    def upsert_record(
        self, obj: str, field_name: str, value: Any, values: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Upsert by an External ID field; returns (record, created). Several matches raise ``_Multiple``."""
        odef = self._object(obj)
        fdef = odef.field(field_name)
        assert fdef is not None
        matches = self._ext_matches(odef.name, fdef.name, value)
        if len(matches) > 1:
            raise _Multiple(matches)
        body = {k: v for k, v in values.items() if k != fdef.name}
        if matches:
            return self.update_record(odef.name, matches[0], body), False
        body[fdef.name] = value
        return self.create_record(odef.name, body), True

    def _ext_field(self, odef: ObjectDef, name: str) -> FieldDef:
        fdef = odef.field(name)
        if fdef is None or not (fdef.external_id or fdef.name == "Id"):
            raise _ext_not_found(name)
        return fdef

    def _public(
        self, odef: ObjectDef, record: dict[str, Any], version: str, fields: list[str] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": odef.name, "url": self._url(version, odef.name, record["Id"])}}
        for name in fields if fields is not None else list(odef.fields):
            out[name] = record.get(name)
        return out

    def _field_list(self, odef: ObjectDef, raw: str | None) -> list[str] | None:
        if raw is None:
            return None
        names = []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            fdef = odef.field(part)
            if fdef is None:
                raise _bad(
                    "INVALID_FIELD",
                    f"No such column '{part}' on entity '{odef.name}'. If you are attempting to use a custom field, "
                    "be sure to append the '__c' after the custom field name. Please reference your WSDL or the "
                    "describe call for the appropriate names.",
                )
            names.append(fdef.name)
        return names

    # -- versions, directory, limits, describe --------------------------------------------
    def _versions(self, request: Request) -> Response:
        return Response.json(
            [{"label": label, "url": f"/services/data/v{v}", "version": v} for v, label in API_VERSIONS.items()]
        )

    def _directory(self, request: Request) -> Response:
        base = f"/services/data/v{request.params['version']}"
        names = ["sobjects", "query", "queryAll", "limits", "composite", "jobs"]
        return Response.json({name: f"{base}/{name}" for name in names})

    def _limits(self, request: Request) -> Response:
        with self.lock:
            remaining = max(0, self.daily_limit - self.api_used)
            return Response.json(
                {
                    "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
                    "DailyApiRequests": {"Max": self.daily_limit, "Remaining": remaining},
                    "DailyAsyncApexExecutions": {"Max": 250000, "Remaining": 250000},
                    "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000 - len(self.bulk.jobs)},
                    "DailyBulkV2QueryFileStorageMB": {"Max": 976562, "Remaining": 976562},
                    "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000},
                    "DataStorageMB": {"Max": 1024, "Remaining": 1024},
                    "FileStorageMB": {"Max": 10240, "Remaining": 10240},
                    "SingleEmail": {"Max": 5000, "Remaining": 5000},
                }
            )

    def _object_summary(self, odef: ObjectDef, version: str) -> dict[str, Any]:
        base = f"/services/data/v{version}/sobjects/{odef.name}"
        return {
            "activateable": False,
            "createable": True,
            "custom": odef.custom,
            "customSetting": False,
            "deepCloneable": False,
            "deletable": True,
            "deprecatedAndHidden": False,
            "feedEnabled": odef.name != "OpportunityContactRole",
            "hasSubtypes": False,
            "isInterface": False,
            "isSubtype": False,
            "keyPrefix": odef.key_prefix,
            "label": odef.label,
            "labelPlural": odef.label_plural,
            "layoutable": True,
            "mergeable": odef.name in ("Account", "Contact"),
            "mruEnabled": True,
            "name": odef.name,
            "queryable": True,
            "replicateable": True,
            "retrieveable": True,
            "searchable": odef.name != "OpportunityContactRole",
            "triggerable": True,
            "undeletable": True,
            "updateable": True,
            "urls": {"rowTemplate": f"{base}/{{ID}}", "describe": f"{base}/describe", "sobject": base},
        }

    def _describe_global(self, request: Request) -> Response:
        version = request.params["version"]
        return Response.json(
            {
                "encoding": "UTF-8",
                "maxBatchSize": MAX_COLLECTION,
                "sobjects": [self._object_summary(o, version) for o in self.schema.objects.values()],
            }
        )

    def _sobject_info(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        with self.lock:
            recent = sorted(
                (r for r in self.records[odef.name].values() if not r["IsDeleted"]),
                key=lambda r: r["LastModifiedDate"],
                reverse=True,
            )[:3]
            items = [
                self._public(odef, r, request.params["version"], ["Id", "Name"] if "Name" in odef.fields else ["Id"])
                for r in recent
            ]
        return Response.json(
            {"objectDescribe": self._object_summary(odef, request.params["version"]), "recentItems": items}
        )

    @staticmethod
    def _describe_field(fdef: FieldDef) -> dict[str, Any]:
        soap = {
            "id": "tns:ID",
            "reference": "tns:ID",
            "boolean": "xsd:boolean",
            "currency": "xsd:double",
            "double": "xsd:double",
            "percent": "xsd:double",
            "int": "xsd:int",
            "date": "xsd:date",
            "datetime": "xsd:dateTime",
        }.get(fdef.type, "xsd:string")
        textual = fdef.type not in ("boolean", "currency", "double", "percent", "int", "date", "datetime")
        length = fdef.length if textual else 0
        picklist = [
            {
                "active": True,
                "defaultValue": value == fdef.default,
                "label": CURRENCIES.get(value, value) if fdef.name == "CurrencyIsoCode" else value,
                "validFor": None,
                "value": value,
            }
            for value in fdef.picklist
        ]
        return {
            "aggregatable": fdef.type not in ("boolean",) and not fdef.long_text,
            "aiPredictionField": False,
            "autoNumber": False,
            "byteLength": length * 3,
            "calculated": fdef.calculated,
            "calculatedFormula": None,
            "cascadeDelete": False,
            "caseSensitive": False,
            "compoundFieldName": None,
            "controllerName": None,
            "createable": fdef.createable,
            "custom": fdef.custom,
            "defaultValue": fdef.default if fdef.type == "boolean" else None,
            "defaultValueFormula": None,
            "defaultedOnCreate": fdef.defaulted_on_create,
            "dependentPicklist": False,
            "deprecatedAndHidden": False,
            "digits": 0,
            "displayLocationInDecimal": False,
            "encrypted": False,
            "externalId": fdef.external_id,
            "extraTypeInfo": "plaintextarea" if fdef.type == "textarea" else None,
            "filterable": fdef.filterable,
            "filteredLookupInfo": None,
            "formulaTreatNullNumberAsZero": False,
            "groupable": fdef.filterable and fdef.type not in ("currency", "double", "datetime"),
            "highScaleNumber": False,
            "htmlFormatted": False,
            "idLookup": fdef.name == "Id" or fdef.external_id or (fdef.name_field and not fdef.calculated),
            "inlineHelpText": None,
            "label": fdef.label,
            "length": length,
            "mask": None,
            "maskType": None,
            "name": fdef.name,
            "nameField": fdef.name_field,
            "namePointing": False,
            "nillable": fdef.nillable,
            "permissionable": fdef.custom and fdef.nillable,
            "picklistValues": picklist,
            "polymorphicForeignKey": False,
            "precision": fdef.precision,
            "queryByDistance": False,
            "referenceTargetField": None,
            "referenceTo": list(fdef.reference_to),
            "relationshipName": fdef.relationship_name,
            "relationshipOrder": None,
            "restrictedDelete": False,
            "restrictedPicklist": fdef.restricted,
            "scale": fdef.scale,
            "searchPrefilterable": False,
            "soapType": soap,
            "sortable": fdef.sortable,
            "type": fdef.type,
            "unique": fdef.unique,
            "updateable": fdef.updateable,
            "writeRequiresMasterRead": False,
        }

    def _describe(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        base = f"/services/data/v{request.params['version']}/sobjects/{odef.name}"
        body = self._object_summary(odef, request.params["version"])
        body.update(
            {
                "actionOverrides": [],
                "childRelationships": [
                    {
                        "cascadeDelete": rel.cascade_delete,
                        "childSObject": rel.child,
                        "deprecatedAndHidden": False,
                        "field": rel.field,
                        "junctionIdListNames": [],
                        "junctionReferenceTo": [],
                        "relationshipName": rel.name,
                        "restrictedDelete": False,
                    }
                    for rel in odef.children
                ],
                "compactLayoutable": True,
                "fields": [self._describe_field(f) for f in odef.fields.values()],
                "listviewable": None,
                "lookupLayoutable": None,
                "namedLayoutInfos": [],
                "networkScopeFieldName": None,
                "recordTypeInfos": [
                    {
                        "active": True,
                        "available": True,
                        "defaultRecordTypeMapping": True,
                        "developerName": "Master",
                        "master": True,
                        "name": "Master",
                        "recordTypeId": "012000000000000AAA",
                        "urls": {"layout": f"{base}/describe/layouts/012000000000000AAA"},
                    }
                ],
                "searchLayoutable": True,
                "sobjectDescribeOption": "FULL",
                "supportedScopes": [{"label": "All " + odef.label_plural.lower(), "name": "everything"}],
            }
        )
        return Response.json(dict(sorted(body.items())))

    # -- sObject rows -------------------------------------------------------------------
    def _create(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            try:
                record = self.create_record(odef.name, values)
            except RecordError as err:
                raise err.http() from None
        return Response.json({"id": record["Id"], "success": True, "errors": []}, 201)

    def _get(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        fields = self._field_list(odef, request.arg("fields"))
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
            return Response.json(
                self._public(odef, self.records[odef.name][record_id], request.params["version"], fields)
            )

    def _update(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
                self.update_record(odef.name, record_id, values)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
        return Response.empty(204)

    def _delete(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        with self.lock:
            try:
                record_id = self._resolve_record_id(odef, request.params["id"], rest=True)
            except RecordError as err:
                raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
            self._delete_cascade(odef.name, record_id)
        return Response.empty(204)

    def _ext_lookup(self, request: Request) -> tuple[ObjectDef, FieldDef, str, list[str]]:
        odef = self._object(request.params["obj"])
        fdef = self._ext_field(odef, request.params["field"])
        value = request.params["value"]
        if fdef.name == "Id":
            normalized = normalize_id(value)
            record = self.records[odef.name].get(normalized or "")
            matches = [record["Id"]] if record and not record["IsDeleted"] else []
        else:
            matches = self._ext_matches(odef.name, fdef.name, value)
        return odef, fdef, value, matches

    def _multiple(self, odef: ObjectDef, matches: list[str], version: str) -> Response:
        return Response.json([self._url(version, odef.name, m) for m in matches], 300)

    def _get_by_ext(self, request: Request) -> Response:
        with self.lock:
            odef, _fdef, _value, matches = self._ext_lookup(request)
            if not matches:
                raise _not_found()
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            fields = self._field_list(odef, request.arg("fields"))
            return Response.json(
                self._public(odef, self.records[odef.name][matches[0]], request.params["version"], fields)
            )

    def _delete_by_ext(self, request: Request) -> Response:
        with self.lock:
            odef, _fdef, _value, matches = self._ext_lookup(request)
            if not matches:
                raise _not_found()
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            self._delete_cascade(odef.name, matches[0])
        return Response.empty(204)

    def _upsert(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        body, raw = self._body(request)
        values = self._from_json(odef, body, _Locator(raw))
        with self.lock:
            odef, fdef, value, matches = self._ext_lookup(request)
            if len(matches) > 1:
                return self._multiple(odef, matches, request.params["version"])
            try:
                if fdef.name == "Id":
                    if not matches:
                        raise _not_found()
                    record = self.update_record(odef.name, matches[0], values)
                    created = False
                else:
                    coerced = self._coerce_json(fdef, value, lambda: "[line:1, column:1]")
                    record, created = self.upsert_record(odef.name, fdef.name, coerced, values)
            except RecordError as err:
                raise err.http() from None
        return Response.json(
            {"id": record["Id"], "success": True, "errors": [], "created": created}, 201 if created else 200
        )

    # -- query ----------------------------------------------------------------------------
    def _batch_size(self, request: Request, default: int = DEFAULT_BATCH_SIZE) -> int:
        options = request.headers.get("Sforce-Query-Options") or ""
        match = re.search(r"batchSize\s*=\s*(\d+)", options, re.IGNORECASE)
        if not match:
            return default
        return max(MIN_BATCH_SIZE, min(DEFAULT_BATCH_SIZE, int(match.group(1))))

    def run_query(self, soql: str, *, include_deleted: bool = False, version: str = "59.0") -> list[dict[str, Any]]:
        """Run SOQL in-process (all rows, no paging); raises :class:`soql.QueryError`."""
        with self.lock:
            return execute(
                soql,
                self.schema,
                _Source(self.records),
                include_deleted=include_deleted,
                now=self._now(),
                url_prefix=f"/services/data/v{version}",
            ).records

    def _query(self, request: Request) -> Response:
        soql = request.arg("q")
        if soql is None:
            raise _bad("MALFORMED_QUERY", "A query string has to be specified")
        version = request.params["version"]
        endpoint = request.params["endpoint"]
        with self.lock:
            try:
                result = execute(
                    soql,
                    self.schema,
                    _Source(self.records),
                    include_deleted=endpoint == "queryAll",
                    now=self._now(),
                    url_prefix=f"/services/data/v{version}",
                )
            except QueryError as err:
                raise _bad(err.code, err.message) from None
            batch = self._batch_size(request)
            if len(result.records) <= batch:
                return Response.json({"totalSize": result.total_size, "done": True, "records": result.records})
            cursor = _Cursor(self._new_id("01g"), result.records, endpoint, version, batch, self.clock())
            self._cursors[cursor.id] = cursor
            while len(self._cursors) > self.max_open_cursors:
                self._cursors.popitem(last=False)
            return Response.json(self._page(cursor, 0, batch, result.total_size))

    def _page(self, cursor: _Cursor, offset: int, batch: int, total: int) -> dict[str, Any]:
        chunk = cursor.records[offset : offset + batch]
        end = offset + len(chunk)
        body: dict[str, Any] = {"totalSize": total, "done": end >= len(cursor.records)}
        if not body["done"]:
            body["nextRecordsUrl"] = f"/services/data/v{cursor.version}/{cursor.endpoint}/{cursor.id}-{end}"
        body["records"] = chunk
        return body

    def _query_more(self, request: Request) -> Response:
        match = re.fullmatch(r"(01g[A-Za-z0-9]{15})-(\d+)", request.params["locator"])
        with self.lock:
            now = self.clock()
            for cid in [c.id for c in self._cursors.values() if now - c.touched > self.query_locator_ttl]:
                del self._cursors[cid]
            cursor = self._cursors.get(match.group(1)) if match else None
            if cursor is None or match is None or int(match.group(2)) > len(cursor.records):
                raise _bad("INVALID_QUERY_LOCATOR", "invalid query locator")
            cursor.touched = now
            self._cursors.move_to_end(cursor.id)
            batch = self._batch_size(request, cursor.batch)
            return Response.json(self._page(cursor, int(match.group(2)), batch, len(cursor.records)))

    # -- updated / deleted ------------------------------------------------------------------
    def _window(self, request: Request, days: int) -> tuple[datetime, datetime]:
        raw_start, raw_end = request.arg("start"), request.arg("end")
        if not raw_start or not raw_end:
            raise _bad("MISSING_ARGUMENT", "Both start and end must be specified")
        bounds = []
        for name, raw in (("start", raw_start), ("end", raw_end)):
            try:
                bounds.append(_trunc_minute(parse_datetime(raw)))
            except ValueError:
                raise _bad("INVALID_REPLICATION_DATE", f"Invalid {name} date: {raw}") from None
        start, end = bounds
        if end <= start:
            raise _bad(
                "INVALID_REPLICATION_DATE", "startDate must chronologically precede endDate by more than one minute"
            )
        now = self._now()
        if start < _trunc_minute(now - timedelta(days=days)):
            raise _bad("INVALID_REPLICATION_DATE", f"startDate cannot be more than {days} days ago")
        return start, min(end, _trunc_minute(now))

    def _updated(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        start, latest = self._window(request, UPDATED_WINDOW_DAYS)
        lo, hi = sf_datetime(start), sf_datetime(latest)
        with self.lock:
            ids = [
                r["Id"]
                for r in self.records[odef.name].values()
                if not r["IsDeleted"] and lo <= r["SystemModstamp"] < hi
            ]
        return Response.json({"ids": ids, "latestDateCovered": hi})

    def _deleted(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        start, latest = self._window(request, DELETED_WINDOW_DAYS)
        lo, hi = sf_datetime(start), sf_datetime(latest)
        earliest = sf_datetime(_trunc_minute(self._now() - timedelta(days=DELETED_WINDOW_DAYS)))
        with self.lock:
            rows = [
                {"id": r["Id"], "deletedDate": r["_deleted"]}
                for r in self.records[odef.name].values()
                if r["IsDeleted"] and lo <= r["_deleted"] < hi
            ]
        rows.sort(key=lambda d: d["deletedDate"])
        return Response.json({"deletedRecords": rows, "earliestDateAvailable": earliest, "latestDateCovered": hi})

    # -- sObject collections --------------------------------------------------------------------
    def _collection_body(self, request: Request) -> tuple[list[Any], bool, _Locator]:
        body, raw = self._body(request)
        if not isinstance(body, dict):
            raise _bad(
                "JSON_PARSER_ERROR",
                "Cannot deserialize instance of SObjectCollection from START_ARRAY value [ or request may be missing a "
                "required field at [line:1, column:1]",
            )
        records = body.get("records")
        if not isinstance(records, list):
            raise _bad("INVALID_FIELD", "The records field is required and must be a list of sObjects")
        if len(records) > MAX_COLLECTION:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this call")
        all_or_none = body.get("allOrNone", False)
        if not isinstance(all_or_none, bool):
            raise _bad(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of boolean from VALUE_STRING value {all_or_none} or request may be "
                "missing a required field at [line:1, column:1]",
            )
        return records, all_or_none, _Locator(raw)

    def _typed(self, record: Any, expected: str | None = None) -> ObjectDef:
        attrs = record.get("attributes") if isinstance(record, dict) else None
        type_name = attrs.get("type") if isinstance(attrs, dict) else None
        if not type_name:
            raise _bad("INVALID_TYPE", "Must send a concrete entity type.")
        odef = self.schema.get(str(type_name))
        if odef is None:
            raise _bad(
                "INVALID_TYPE",
                f"sObject type '{type_name}' is not supported. If you are attempting to use a custom object, be sure "
                "to append the '__c' after the entity name. Please reference your WSDL or the describe call for the "
                "appropriate names.",
            )
        if expected is not None and odef.name != expected:
            raise _bad("INVALID_TYPE", f"Record type {odef.name} does not match the URI type {expected}")
        return odef

    def _run_collection(
        self, ops: list[Callable[[], dict[str, Any]]], all_or_none: bool, ids: list[str | None], upsert: bool = False
    ) -> list[dict[str, Any]]:
        """Run one write per record; with allOrNone any failure rolls everything back."""
        results: list[dict[str, Any]] = []
        with self._transaction() as log:
            failed = False
            for op, known_id in zip(ops, ids, strict=True):
                try:
                    results.append(op())
                except RecordError as err:
                    failed = True
                    failure: dict[str, Any] = {"success": False, "errors": [err.item()]}
                    if known_id and err.code != "MALFORMED_ID":
                        failure = {"id": known_id, **failure}
                    results.append(failure)
            if all_or_none and failed:
                self._rollback(log)
                rolled = []
                for result, known_id in zip(results, ids, strict=True):
                    if result["success"]:
                        item: dict[str, Any] = {"success": False, "errors": [dict(ROLLED_BACK)]}
                        if known_id:
                            item = {"id": known_id, **item}
                        rolled.append(item)
                    else:
                        rolled.append(result)
                results = rolled
        if upsert:
            results = [r if "created" in r else {**r, "created": False} for r in results]
        return results

    def _collection_create(self, request: Request) -> Response:
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            odef = self._typed(record)
            prepared.append((odef, self._from_json(odef, record, locator)))
        ops = []
        for odef, values in prepared:

            def op(o: ObjectDef = odef, v: dict[str, Any] = values) -> dict[str, Any]:
                created = self.create_record(o.name, v)
                return {"id": created["Id"], "success": True, "errors": []}

            ops.append(op)
        with self.lock:
            return Response.json(self._run_collection(ops, all_or_none, [None] * len(ops)))

    def _collection_update(self, request: Request) -> Response:
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            odef = self._typed(record)
            raw_id = next((v for k, v in record.items() if k.lower() == "id"), None)
            body = {k: v for k, v in record.items() if k.lower() != "id"}
            prepared.append((odef, raw_id, self._from_json(odef, body, locator)))
        with self.lock:
            counts: dict[str, int] = {}
            for _odef, raw_id, _v in prepared:
                key = normalize_id(str(raw_id)) if raw_id else None
                if key:
                    counts[key] = counts.get(key, 0) + 1
            ops = []
            ids: list[str | None] = []
            for odef, raw_id, values in prepared:
                normalized = normalize_id(str(raw_id)) if isinstance(raw_id, str) else None
                known = normalized if normalized and normalized in self.records[odef.name] else None
                ids.append(known)

                def op(o: ObjectDef = odef, rid: Any = raw_id, v: dict[str, Any] = values) -> dict[str, Any]:
                    if not rid:
                        raise RecordError("MISSING_ARGUMENT", "Id not specified in an update call", [])
                    if not isinstance(rid, str) or normalize_id(rid) is None:
                        raise RecordError("MALFORMED_ID", f"{o.label} ID: id value of incorrect type: {rid}", ["Id"])
                    record_id = self._resolve_record_id(o, rid, rest=False)
                    if counts.get(record_id, 0) > 1:
                        raise RecordError("DUPLICATE_VALUE", f"Duplicate id in list: {record_id}", [])
                    self.update_record(o.name, record_id, v)
                    return {"id": record_id, "success": True, "errors": []}

                ops.append(op)
            results = self._run_collection(ops, all_or_none, ids)
        return Response.json(results)

    def _collection_upsert(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        fdef = self._ext_field(odef, request.params["field"])
        records, all_or_none, locator = self._collection_body(request)
        prepared = []
        for record in records:
            self._typed(record, odef.name)
            prepared.append(self._from_json(odef, record, locator))
        with self.lock:
            values_seen: dict[str, int] = {}
            for values in prepared:
                if values.get(fdef.name) is not None:
                    key = str(values[fdef.name]).casefold()
                    values_seen[key] = values_seen.get(key, 0) + 1
            ops = []
            ids: list[str | None] = []
            for values in prepared:
                ext = values.get(fdef.name)
                matches = self._ext_matches(odef.name, fdef.name, ext) if ext is not None and fdef.name != "Id" else []
                ids.append(matches[0] if len(matches) == 1 else None)

                def op(v: dict[str, Any] = values) -> dict[str, Any]:
                    ext_value = v.get(fdef.name)
                    if ext_value is None:
                        raise RecordError("MISSING_ARGUMENT", f"{fdef.name} not specified", [fdef.name])
                    if values_seen.get(str(ext_value).casefold(), 0) > 1:
                        raise RecordError(
                            "DUPLICATE_EXTERNAL_ID", f"Duplicate external id specified: {ext_value}", [fdef.name]
                        )
                    if fdef.name == "Id":
                        record_id = self._resolve_record_id(odef, str(ext_value), rest=False)
                        self.update_record(odef.name, record_id, {k: x for k, x in v.items() if k != "Id"})
                        return {"id": record_id, "success": True, "errors": [], "created": False}
                    try:
                        record, created = self.upsert_record(odef.name, fdef.name, ext_value, v)
                    except _Multiple as multi:
                        raise RecordError(
                            "DUPLICATE_EXTERNAL_ID",
                            f"{fdef.label}: more than one record found for external id field: [{', '.join(multi.ids)}]",
                            [fdef.name],
                        ) from None
                    return {"id": record["Id"], "success": True, "errors": [], "created": created}

                ops.append(op)
            results = self._run_collection(ops, all_or_none, ids, upsert=True)
        return Response.json(results)

    def _collection_delete(self, request: Request) -> Response:
        raw = request.arg("ids")
        if not raw:
            raise _bad("MISSING_ARGUMENT", "ids parameter is required")
        raw_ids = [i.strip() for i in raw.split(",") if i.strip()]
        if len(raw_ids) > MAX_COLLECTION:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this call")
        all_or_none = (request.arg("allOrNone") or "false").lower() == "true"
        by_prefix = {o.key_prefix: o for o in self.schema.objects.values()}
        with self.lock:
            ops = []
            ids: list[str | None] = []
            for rid in raw_ids:
                normalized = normalize_id(rid)
                ids.append(normalized if normalized and normalized[:3] in by_prefix else None)

                def op(r: str = rid) -> dict[str, Any]:
                    norm = normalize_id(r)
                    odef = by_prefix.get(norm[:3]) if norm else None
                    if norm is None or odef is None:
                        raise RecordError("MALFORMED_ID", f"malformed id {r}", [])
                    record = self.records[odef.name].get(norm)
                    if record is None:
                        raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])
                    if record["IsDeleted"]:
                        raise RecordError("ENTITY_IS_DELETED", "entity is deleted", [])
                    self._delete_cascade(odef.name, norm)
                    return {"id": norm, "success": True, "errors": []}

                ops.append(op)
            results = self._run_collection(ops, all_or_none, ids)
        return Response.json(results)

    def _collection_retrieve(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        if request.method == "POST":
            body, _raw = self._body(request)
            ids_list = body.get("ids") if isinstance(body, dict) else None
            fields_list = body.get("fields") if isinstance(body, dict) else None
            if not isinstance(ids_list, list) or not isinstance(fields_list, list):
                raise _bad("JSON_PARSER_ERROR", "ids and fields are required lists")
            raw_ids = [str(i) for i in ids_list]
            fields_raw = ",".join(str(f) for f in fields_list)
        else:
            raw_ids = [i for i in (request.arg("ids") or "").split(",") if i]
            fields_raw = request.arg("fields") or ""
        if not raw_ids or not fields_raw:
            raise _bad("MISSING_ARGUMENT", "Both ids and fields must be specified")
        if len(raw_ids) > MAX_COLLECTION_RETRIEVE:
            raise _bad("EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 2000 records into this call")
        fields = self._field_list(odef, fields_raw)
        out: list[Any] = []
        with self.lock:
            for rid in raw_ids:
                norm = normalize_id(rid)
                if norm is None:
                    raise _bad("MALFORMED_ID", f"malformed id {rid}")
                record = self.records[odef.name].get(norm)
                if record is None or record["IsDeleted"] or norm[:3] != odef.key_prefix:
                    out.append(None)
                else:
                    out.append(self._public(odef, record, request.params["version"], fields))
        return Response.json(out)

    # -- control plane: Python ----------------------------------------------------------------
    AGED_STAMPS = ("CreatedDate", "LastModifiedDate", "SystemModstamp")

    def age(self, seconds: float) -> int:
        """Time passes: every record's stamps (created, last modified, SystemModstamp) move
        ``seconds`` into the past, as if everything had happened that much earlier; the server's
        own clock (the ``Date`` of its answers) is not touched. Returns the records aged."""
        delta = timedelta(seconds=seconds)
        aged = 0
        with self.lock:
            for records in self.records.values():
                for record in records.values():
                    for key in self.AGED_STAMPS:
                        if isinstance(record.get(key), str):
                            record[key] = sf_datetime(parse_datetime(record[key]) - delta)
                    aged += 1
        return aged

    def reset(self) -> None:
        """Empty org, default schema, default limits, no cursors or jobs; the default token is valid again."""
        with self.lock:
            self.schema = build_schema()
            self._reset_store()
            self._cursors.clear()
            self._counters.clear()
            self.bulk.reset()
            self.daily_limit = DEFAULT_DAILY_LIMIT
            self.api_used = 0
            self.query_locator_ttl = 15 * 60.0
            self.max_open_cursors = 10
            self.bulk_delay = 0.05
            self.clock = time.time
            self.tokens.add(self.access_token)
        self.faults.clear()
        self.log.clear()

    def declare_external_id(
        self, obj: str, field_name: str, *, unique: bool = False, length: int = 255, label: str | None = None
    ) -> FieldDef:
        """Add (or redefine) a custom text External ID field, e.g. ``Legacy_Id__c`` without ``unique``."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*__c", field_name):
            raise ValueError("custom field names end in __c")
        with self.lock:
            odef = self._object(obj)
            fdef = FieldDef(
                name=field_name,
                type="string",
                label=label or field_name.removesuffix("__c").replace("_", " "),
                length=length,
                external_id=True,
                unique=unique,
                custom=True,
            )
            existing = odef.field(field_name)
            if existing is not None:
                fdef = replace(fdef, name=existing.name)
            odef.fields[fdef.name] = fdef
            index: dict[str, set[str]] = {}
            self._ext_index[(odef.name, fdef.name)] = index
            for record in self.records[odef.name].values():
                record.setdefault(fdef.name, None)
                self._index_ops_single(index, record, fdef.name)
            return fdef

    @staticmethod
    def _index_ops_single(index: dict[str, set[str]], record: dict[str, Any], fname: str) -> None:
        if record.get(fname) is not None and not record.get("IsDeleted"):
            index.setdefault(str(record[fname]).casefold(), set()).add(record["Id"])

    def typed_values(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """JSON-style values (as a CRM user or the REST API would send them) as stored values."""
        odef = self._object(obj)
        raw = json.dumps(values)
        return self._from_json(odef, json.loads(raw), _Locator(raw))

    def user_create(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """A CRM user creates a record (JSON-style values); raises :class:`RecordError` or HTTPError."""
        with self.lock:
            return dict(self.create_record(self._object(obj).name, self.typed_values(obj, values)))

    def user_edit(self, obj: str, record_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """A CRM user edits a record: bumps LastModifiedDate and SystemModstamp."""
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            return dict(self.update_record(odef.name, rid, self.typed_values(obj, values)))

    def touch(self, obj: str, record_id: str) -> dict[str, Any]:
        """An automated process touches a record: SystemModstamp changes, LastModifiedDate does not."""
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            return dict(self.update_record(odef.name, rid, {}, user_edit=False))

    def user_delete(self, obj: str, record_id: str) -> None:
        with self.lock:
            odef = self._object(obj)
            rid = self._resolve_record_id(odef, record_id, rest=True)
            self._delete_cascade(odef.name, rid)

    def get_record(self, obj: str, record_id: str) -> dict[str, Any] | None:
        with self.lock:
            odef = self._object(obj)
            normalized = normalize_id(record_id)
            record = self.records[odef.name].get(normalized or "")
            return None if record is None else {k: v for k, v in record.items() if not k.startswith("_")}

    def list_records(self, obj: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        with self.lock:
            odef = self._object(obj)
            return [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in self.records[odef.name].values()
                if include_deleted or not r["IsDeleted"]
            ]

    def state(self) -> dict[str, Any]:
        with self.lock:
            counts = {name: sum(1 for r in recs.values() if not r["IsDeleted"]) for name, recs in self.records.items()}
            deleted = {name: sum(1 for r in recs.values() if r["IsDeleted"]) for name, recs in self.records.items()}
            return {
                "records": counts,
                "deleted": deleted,
                "flagged": sum(
                    1
                    for r in self.records["Opportunity"].values()
                    if not r["IsDeleted"] and r.get("PC_Sync_With_Partner_Center__c")
                ),
                "apiUsage": {"used": self.api_used, "limit": self.daily_limit},
                "tokens": len(self.tokens),
                "openCursors": len(self._cursors),
                "bulkJobs": {
                    state: sum(1 for j in self.bulk.jobs.values() if j.state == state)
                    for state in sorted({j.state for j in self.bulk.jobs.values()})
                },
                "queryLocatorTtl": self.query_locator_ttl,
                "maxOpenCursors": self.max_open_cursors,
                "bulkDelay": self.bulk_delay,
            }

    def seed(
        self, opportunities: int = 10, accounts: int | None = None, flagged: int = 0, seed: int = 0
    ) -> dict[str, list[str]]:
        """Realistic accounts (billing addresses), contacts (emails) and opportunities linked to accounts
        with a primary contact role; ``flagged`` of them are set to sync with Partner Center."""
        rng = random.Random(seed)
        if accounts is None:
            accounts = max(1, (opportunities + 2) // 3) if opportunities else 0
        flagged = min(flagged, opportunities)
        now = self._now()
        ids: dict[str, list[str]] = {
            "accounts": [],
            "contacts": [],
            "opportunities": [],
            "flagged": [],
            "contact_roles": [],
        }
        with self.lock:
            stamps: list[int] = []

            def when(days: float) -> tuple[str, str, int]:
                created = now - timedelta(days=days, seconds=rng.randint(0, 3600))
                modified = min(now - timedelta(seconds=1), created + timedelta(days=rng.uniform(0, days / 2)))
                ms = int(modified.timestamp() * 1000)
                stamps.append(ms)
                return sf_datetime(created), sf_datetime(modified), ms

            def store(odef: ObjectDef, values: dict[str, Any], age: float) -> dict[str, Any]:
                created, modified, _ms = when(age)
                record = {name: None for name in odef.fields}
                for fdef in odef.fields.values():
                    if fdef.default is not None:
                        record[fdef.name] = fdef.default
                record.update(values)
                record.update(
                    Id=self._new_id(odef.key_prefix),
                    IsDeleted=False,
                    CreatedDate=created,
                    CreatedById=USER_ID,
                    LastModifiedDate=modified,
                    LastModifiedById=USER_ID,
                    SystemModstamp=modified,
                )
                if "OwnerId" in odef.fields:
                    record["OwnerId"] = USER_ID
                self._derive(odef, record)
                self._put(odef.name, record)
                return record

            account_rows: list[tuple[dict[str, Any], list[dict[str, Any]], str, str]] = []
            for i in range(accounts):
                company, country, postal, city, state, street = COMPANIES[i % len(COMPANIES)]
                name = company if i < len(COMPANIES) else f"{company} ({city} {i // len(COMPANIES) + 1})"
                account = store(
                    self.schema.objects["Account"],
                    {
                        "Name": name,
                        "BillingStreet": street,
                        "BillingCity": city,
                        "BillingState": state or None,
                        "BillingPostalCode": postal,
                        "BillingCountry": country,
                    },
                    rng.uniform(60, 365),
                )
                ids["accounts"].append(account["Id"])
                domain = "".join(ch for ch in company.lower().split()[0] if ch.isascii() and ch.isalnum()) + ".example"
                contacts = []
                for _ in range(rng.randint(1, 3)):
                    first, last = rng.choice(FIRST), rng.choice(LAST)
                    plain = unicodedata.normalize("NFKD", f"{first}.{last}".lower())
                    local = "".join(ch for ch in plain if ch.isascii() and (ch.isalnum() or ch == "."))
                    contact = store(
                        self.schema.objects["Contact"],
                        {
                            "AccountId": account["Id"],
                            "FirstName": first,
                            "LastName": last,
                            "Email": f"{local}{rng.randint(1, 99)}@{domain}",
                            "Phone": f"+1 425 555 {rng.randint(1000, 9999)}",
                        },
                        rng.uniform(30, 60),
                    )
                    contacts.append(contact)
                    ids["contacts"].append(contact["Id"])
                account_rows.append((account, contacts, CURRENCY.get(country, "USD"), company))
            flagged_at = set(rng.sample(range(opportunities), flagged)) if flagged else set()
            for i in range(opportunities):
                values: dict[str, Any] = {
                    "StageName": rng.choices(STAGES, weights=STAGE_WEIGHTS)[0],
                    "CloseDate": (now.date() + timedelta(days=rng.randint(-60, 240))).isoformat(),
                    "Amount": float(rng.randrange(5_000, 2_000_000, 500)),
                    "Description": rng.choice(
                        [
                            "",
                            "Customer evaluating a migration in Q3.",
                            "Budget approved; décision en cours.",
                            "Renewal.",
                        ]
                    )
                    or None,
                }
                if account_rows:
                    account, contacts, currency, company = rng.choice(account_rows)
                    values.update(
                        AccountId=account["Id"],
                        CurrencyIsoCode=currency if currency in CURRENCIES else "USD",
                        Name=f"{company} - {rng.choice(DEAL_NAMES)} #{i + 1}"[:120],
                    )
                else:
                    contacts = []
                    values["Name"] = f"{rng.choice(DEAL_NAMES)} #{i + 1}"
                if i in flagged_at:
                    solutions = rng.sample([s[0] for s in SOLUTIONS], rng.randint(1, 2))
                    values.update(
                        PC_Sync_With_Partner_Center__c=True,
                        PC_How_Can_Microsoft_Help__c=rng.choice(HELP_CODES),
                        PC_Solutions__c=";".join(solutions),
                    )
                opp = store(self.schema.objects["Opportunity"], values, rng.uniform(1, 29))
                ids["opportunities"].append(opp["Id"])
                if i in flagged_at:
                    ids["flagged"].append(opp["Id"])
                if contacts:
                    role = store(
                        self.schema.objects["OpportunityContactRole"],
                        {
                            "OpportunityId": opp["Id"],
                            "ContactId": rng.choice(contacts)["Id"],
                            "Role": rng.choice(["Decision Maker", "Economic Buyer", "Technical Buyer"]),
                            "IsPrimary": True,
                        },
                        rng.uniform(1, 29),
                    )
                    ids["contact_roles"].append(role["Id"])
            if stamps:
                self._last_ms = max(self._last_ms, max(stamps))
        return ids

    # -- control plane: HTTP -------------------------------------------------------------------
    @staticmethod
    def _cp_json(request: Request) -> dict[str, Any]:
        if not request.body.strip():
            return {}
        doc = request.json()
        if not isinstance(doc, dict):
            raise _bad("INVALID_REQUEST", "The body must be a JSON object.")
        return doc

    def _cp_reset(self, request: Request) -> Response:
        self.reset()
        return Response.empty()

    def _cp_seed(self, request: Request) -> Response:
        doc = self._cp_json(request)
        accounts = doc.get("accounts")
        ids = self.seed(
            opportunities=int(doc.get("opportunities", 10)),
            accounts=None if accounts is None else int(accounts),
            flagged=int(doc.get("flagged", 0)),
            seed=int(doc.get("seed", 0)),
        )
        return Response.json(ids)

    def _cp_state(self, request: Request) -> Response:
        return Response.json(self.state())

    def _cp_config(self, request: Request) -> Response:
        doc = self._cp_json(request)
        self.configure(
            query_locator_ttl=doc.get("query_locator_ttl"),
            max_open_cursors=doc.get("max_open_cursors"),
            bulk_delay=doc.get("bulk_delay"),
        )
        return Response.json(self.state())

    def _cp_limits(self, request: Request) -> Response:
        doc = self._cp_json(request)
        self.set_limits(doc.get("daily_api_requests"), doc.get("used"))
        return Response.json({"used": self.api_used, "limit": self.daily_limit})

    def _cp_issue(self, request: Request) -> Response:
        return Response.json({"access_token": self.issue_token(), "instance_url": request.origin})

    def _cp_revoke(self, request: Request) -> Response:
        doc = self._cp_json(request)
        return Response.json({"revoked": self.revoke_tokens(doc.get("token"))})

    def _cp_external_id(self, request: Request) -> Response:
        doc = self._cp_json(request)
        try:
            fdef = self.declare_external_id(
                str(doc.get("object", "Opportunity")),
                str(doc.get("field", "")),
                unique=bool(doc.get("unique", False)),
                length=int(doc.get("length", 255)),
                label=doc.get("label"),
            )
        except ValueError as exc:
            raise _bad("INVALID_REQUEST", str(exc)) from None
        return Response.json(self._describe_field(fdef))

    def _cp_records(self, request: Request) -> Response:
        include = (request.arg("include_deleted") or "").lower() in ("1", "true")
        return Response.json({"records": self.list_records(request.params["obj"], include)})

    def _cp_record(self, request: Request) -> Response:
        record = self.get_record(request.params["obj"], request.params["id"])
        if record is None:
            raise _not_found()
        return Response.json(record)

    def _cp_create(self, request: Request) -> Response:
        try:
            return Response.json(self.user_create(request.params["obj"], self._cp_json(request)), 201)
        except RecordError as err:
            raise err.http() from None

    def _cp_edit(self, request: Request) -> Response:
        try:
            return Response.json(self.user_edit(request.params["obj"], request.params["id"], self._cp_json(request)))
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None

    def _cp_touch(self, request: Request) -> Response:
        try:
            return Response.json(self.touch(request.params["obj"], request.params["id"]))
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None

    def _cp_delete(self, request: Request) -> Response:
        try:
            self.user_delete(request.params["obj"], request.params["id"])
        except RecordError as err:
            raise err.http(404 if err.code == "ENTITY_IS_DELETED" else 400) from None
        return Response.empty()

    def _cp_jobs(self, request: Request) -> Response:
        with self.lock:
            return Response.json({"jobs": [job.info() for job in self.bulk.jobs.values()]})


class _Multiple(Exception):
    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids
