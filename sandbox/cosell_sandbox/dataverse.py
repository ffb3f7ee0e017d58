"""Dataverse Web API emulator (``/api/data/v9.2/``): opportunities, accounts, contacts and
transaction currencies, as the Dynamics 365 hook uses them.

The token audience is the emulator's own origin: clients ask Entra for
``<environment URL>/.default``, so ``self.server.origin`` plays the environment URL.

Behaviour follows Microsoft Learn (Dataverse developer guide: query data, page results,
count rows, change tracking, update/delete, conditional operations, upsert, bulk operation
messages, the UpsertMultiple action reference, service protection API limits, the web
service error codes, "Troubleshoot Dataverse Web API client errors") and, where those are
silent, error texts observed from the real service. Each non-obvious rule carries a comment.

Table definitions (``EntityDefinitions``, ``Attributes`` and their casts, option sets, ``Keys``) come
from :mod:`cosell_sandbox.dataverse_metadata`, whose option sets also validate choice-column writes and
label reads (``Prefer: odata.include-annotations``).

Errors are ``{"error": {"code": "0x...", "message": "..."}}`` with
``Content-Type: application/json; odata.metadata=minimal``; every API response carries
``REQ_ID`` and ``OData-Version: 4.0``.

Wiring: ``DataverseEmulator(entra)``, start it in an ``EmulatorServer``, then
``entra.register_resource(emulator.audience())``.

Control plane (no token, no faults), each also a Python method:

* ``POST /_sandbox/reset`` (:meth:`reset`), ``POST /_sandbox/seed`` (:meth:`seed`),
  ``GET /_sandbox/state`` (:meth:`state`);
* ``GET /_sandbox/tables/<set>`` (:meth:`rows`), ``GET /_sandbox/tables/<set>/<id>`` (:meth:`row`),
  ``POST /_sandbox/tables/<set>/<id>/edit`` (:meth:`edit`), ``DELETE /_sandbox/tables/<set>/<id>``
  (:meth:`delete`); :meth:`create` adds a row as a CRM user would;
* ``GET|POST /_sandbox/limits`` (:meth:`configure_limits`): the service protection limits and
  the delta token lifetime; ``GET|POST /_sandbox/config`` (:meth:`configure`);
* ``/_sandbox/faults`` and ``/_sandbox/requests`` from :class:`~cosell_sandbox.server.EmulatorApp`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from . import dataverse_batch as batch
from . import dataverse_metadata as md
from .entra import EntraEmulator
from .odata import FilterOptions, ODataError, compile_filter, parse_orderby, sort_records
from .seed import COMPANIES, CURRENCY, DEAL_NAMES, HELP_CODES, SOLUTIONS, person
from .server import EmulatorApp, Headers, HTTPError, Request, Response, Router, new_request_id

log = logging.getLogger(__name__)

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
# tables' option sets (dataverse_metadata.CHOICES, the one place choice options are defined).
STATES: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {
    "opportunities": md.states("opportunity"),
    "accounts": md.states("account"),
    "contacts": md.states("contact"),
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


# ---------------------------------------------------------------------------
# Errors (codes from the Dataverse web service error codes reference)


def _err(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPError:
    return HTTPError(status, code, message, headers=headers)


def _not_found(table: Table, row_id: str) -> HTTPError:
    # ObjectDoesNotExist, 404 (the Web API maps 0x80040217 to 404).
    return _err(404, "0x80040217", f"Entity '{table.logical}' With Id = {row_id} Does Not Exist")


def _key_not_found(table: Table) -> HTTPError:
    # Observed for alternate-key misses: 0x80060891, 404.
    return _err(404, "0x80060891", f"A record with the specified key values does not exist in {table.logical} entity")


def _duplicate() -> HTTPError:
    # DuplicateRecord 0x80040237; the Web API answers 412 with this fixed message.
    return _err(412, "0x80040237", "A record with matching key values already exists.")


def _payload(table: Table | None, inner: str) -> HTTPError:
    return batch.payload_error(inner, table.set if table else "")


def _query_error(message: str) -> HTTPError:
    return _err(400, "0x80060888", message)


def _validation(message: str) -> HTTPError:
    return _err(400, "0x80044331", message)


def _invalid_property(table: Table, name: str) -> HTTPError:
    return _payload(
        table,
        f"Microsoft.Crm.CrmException: Invalid property '{name}' was found in entity '{table.type_name}'. ---> "
        f"Microsoft.OData.ODataException: The property '{name}' does not exist on type '{table.type_name}'. "
        "Make sure to only use property names that are defined by the type or mark the type as open type.",
    )


def _undeclared(table: Table, name: str) -> HTTPError:
    return _payload(
        table,
        f"Microsoft.OData.ODataException: An undeclared property '{name}' which only has property annotations in "
        "the payload but no property value was found in the payload. In OData, only declared navigation properties "
        "and declared named streams can be represented as properties without values.",
    )


def _unknown_property(table: Table, name: str) -> HTTPError:
    return _query_error(f"Could not find a property named '{name}' on type '{table.type_name}'.")


def _not_convertible(table: Table, value: Any, column: Column) -> HTTPError:
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return _payload(
        table,
        f"Microsoft.OData.ODataException: Cannot convert the literal '{shown}' to the expected type "
        f"'{EDM[column.kind]}'.",
    )


def _segment_not_found(segment: str) -> HTTPError:
    return _err(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")


def _throttle(code: str, message: str, retry_after: float) -> HTTPError:
    return _err(429, code, message, {"Retry-After": str(max(1, math.ceil(retry_after)))})


# ---------------------------------------------------------------------------
# Small helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _etag(row: dict[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(status, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    resp.headers.set("Content-Type", JSON_TYPE)
    for key, value in (headers or {}).items():
        resp.headers.set(key, value)
    return resp


@dataclass
class Preferences:
    maxpagesize: int | None = None
    track_changes: bool = False
    return_representation: bool = False
    continue_on_error: bool = False


def _preferences(headers: Headers) -> Preferences:
    """Every ``Prefer`` header, comma-separated or repeated (quoted values may hold commas)."""
    prefs = Preferences()
    for key, raw in headers.items():
        if key.lower() != "prefer":
            continue
        for item in re.findall(r'(?:[^,"]|"[^"]*")+', raw):
            name, _, value = item.strip().partition("=")
            name = name.strip().lower()
            if name == "odata.maxpagesize":
                with contextlib.suppress(ValueError):
                    prefs.maxpagesize = int(value.strip().strip('"'))
            elif name == "odata.track-changes":
                prefs.track_changes = True
            elif name == "return" and value.strip().lower() == "representation":
                prefs.return_representation = True
            elif name == "odata.continue-on-error":
                prefs.continue_on_error = True
    return prefs


FORMATTED_VALUE = "OData.Community.Display.V1.FormattedValue"


def _wants_formatted_values(headers: Headers) -> bool:
    """``Prefer: odata.include-annotations="OData.Community.Display.V1.FormattedValue"`` (or ``"*"``, or a
    namespace wildcard): reads carry ``<column>@OData.Community.Display.V1.FormattedValue`` (Microsoft
    Learn, "Query data using the Web API: formatted values")."""
    for key, raw in headers.items():
        if key.lower() != "prefer":
            continue
        for item in re.findall(r'(?:[^,"]|"[^"]*")+', raw):
            name, _, value = item.strip().partition("=")
            if name.strip().lower() != "odata.include-annotations":
                continue
            for pattern in value.strip().strip('"').split(","):
                pattern = pattern.strip()
                if pattern.startswith("-"):
                    continue
                if (
                    pattern == "*"
                    or pattern == FORMATTED_VALUE
                    or (pattern.endswith(".*") and FORMATTED_VALUE.startswith(pattern[:-1]))
                ):
                    return True
    return False


def _restore(store: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        store.pop(key, None)
    else:
        store[key] = value


def _etag_matches(header: str, row: dict[str, Any]) -> bool:
    """``If-Match`` / ``If-None-Match``: ``*`` or a list of (weak) ETags."""
    if header.strip() == "*":
        return True
    wanted = re.findall(r'"([^"]*)"', header) or [header.strip()]
    return str(row["versionnumber"]) in wanted


def _condition(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    # Clients routinely send "If-None-Match: null" on every request; it means no condition.
    if value is None or not value.strip() or value.strip().lower() == "null":
        return None
    return value.strip()


@dataclass(frozen=True)
class KeyRef:
    kind: str  # "id" or "alt"
    value: str  # the id, or the alternate key value

    def segment(self, table: Table) -> str:
        if self.kind == "id":
            return f"{table.set}({self.value})"
        escaped = self.value.replace("'", "''")
        return f"{table.set}({table.alternate_key}='{escaped}')"


def _parse_key(table: Table, text: str) -> KeyRef:
    """``(<guid>)``, ``(<pk>=<guid>)`` or ``(<alternate key>='value')`` (quotes doubled)."""
    text = text.strip()
    if _GUID_RE.match(text):
        return KeyRef("id", text.lower())
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _KEY_PAIR.match(text, pos)
        if not match:
            raise _query_error(f"Bad Request - Error in query syntax: the key '({text})' is not valid.")
        pairs.append((match.group(1), match.group(2)))
        pos = match.end()
    if len(pairs) != 1:
        raise _query_error(f"The key '({text})' does not match any key defined for entity '{table.logical}'.")
    name, literal = pairs[0]
    if name == table.pk and _GUID_RE.match(literal):
        return KeyRef("id", literal.lower())
    if name == table.alternate_key and literal.startswith("'"):
        return KeyRef("alt", literal[1:-1].replace("''", "'"))
    raise _query_error(
        f"The key attribute '{name}' does not match any alternate key defined for entity '{table.logical}'."
    )


# ---------------------------------------------------------------------------
# Service protection limits


@dataclass
class ProtectionLimits:
    """Per-user limits in a sliding window (defaults: the documented per-web-server values)."""

    requests: int = 6000
    window_seconds: float = 300.0
    execution_ms: float = 1_200_000
    concurrent: int = 52
    request_cost_ms: float | None = None  # None: a request costs its handler's wall time
    # The x-ms-dop-hint every API answer carries: the degree of parallelism Dataverse suggests to
    # its clients ("Service protection API limits", "How to maximize throughput"); None: not sent.
    dop_hint: int | None = 4


class ServiceProtection:
    """Number of requests, combined execution time and concurrent requests, per user."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = ProtectionLimits()
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, deque[list[float]]] = {}
        self._inflight: dict[str, int] = {}
        self.peak_inflight = 0  # the most requests of one user in flight at once since the reset

    def reset(self, limits: ProtectionLimits | None = None) -> None:
        with self._lock:
            self.limits = limits or ProtectionLimits()
            self._calls.clear()
            self._inflight.clear()
            self.peak_inflight = 0

    def _window(self, user: str, now: float) -> deque[list[float]]:
        calls = self._calls.setdefault(user, deque())
        while calls and calls[0][0] + self.limits.window_seconds <= now:
            calls.popleft()
        return calls

    def enter(self, user: str) -> list[float]:
        """Admit a request (raises the documented 429) and return its usage entry."""
        with self._lock:
            now = self.clock()
            lim = self.limits
            calls = self._window(user, now)
            window = _seconds(lim.window_seconds)
            if self._inflight.get(user, 0) >= lim.concurrent:
                raise _throttle(
                    "0x80072326", f"Number of concurrent requests exceeded the limit of {lim.concurrent}.", 1
                )
            if len(calls) >= lim.requests:
                oldest = calls[len(calls) - lim.requests][0]
                raise _throttle(
                    "0x80072322",
                    f"Number of requests exceeded the limit of {lim.requests} over time window of {window} seconds.",
                    oldest + lim.window_seconds - now,
                )
            total = sum(entry[1] for entry in calls)
            if total >= lim.execution_ms:
                freed, wait = total, 0.0
                for stamp, cost in calls:
                    freed -= cost
                    wait = stamp + lim.window_seconds - now
                    if freed < lim.execution_ms:
                        break
                raise _throttle(
                    "0x80072321",
                    f"Combined execution time of incoming requests exceeded limit of {lim.execution_ms:,.0f} "
                    f"milliseconds over time window of {window} seconds. Decrease number of concurrent requests "
                    "or reduce the duration of requests and try again later.",
                    wait,
                )
            entry = [now, 0.0]
            calls.append(entry)
            self._inflight[user] = self._inflight.get(user, 0) + 1
            self.peak_inflight = max(self.peak_inflight, self._inflight[user])
            return entry

    def leave(self, user: str, entry: list[float], elapsed_ms: float) -> tuple[int, float]:
        """Record the request's cost; returns (requests left, milliseconds left) in the window."""
        with self._lock:
            self._inflight[user] = max(0, self._inflight.get(user, 1) - 1)
            cost = self.limits.request_cost_ms
            entry[1] = elapsed_ms if cost is None else float(cost)
            calls = self._window(user, self.clock())
            used = sum(e[1] for e in calls)
            return max(0, self.limits.requests - len(calls)), max(0.0, self.limits.execution_ms - used)


@dataclass
class DataverseConfig:
    """Behaviour switches (control plane ``/_sandbox/config``)."""

    enforce_required: bool = True
    # Dataverse lets the API update a won/lost opportunity (only quotes, orders and invoices are
    # read-only when inactive); "reject" makes the sandbox refuse such writes instead.
    closed_opportunity_writes: str = "allow"
    delta_token_lifetime_seconds: float = DELTA_TOKEN_LIFETIME
    # The option value base of the publisher's custom choice columns (cosell_*): their options are
    # base + 0, base + 1, ... (a publisher's option value prefix x 10,000, e.g. 858,880,000).
    choice_value_base: int = md.DEFAULT_CHOICE_BASE


@dataclass
class _Query:
    select: list[str] | None = None
    filter: str | None = None
    orderby: str | None = None
    top: int | None = None
    count: bool = False
    expand: str | None = None
    skiptoken: str | None = None
    deltatoken: str | None = None
    raw: dict[str, str] = field(default_factory=dict)


_QUERY_OPTIONS = ("$select", "$filter", "$orderby", "$top", "$count", "$expand", "$skiptoken", "$deltatoken")
_UNSUPPORTED_OPTIONS = ("$skip", "$search", "$format")


# ---------------------------------------------------------------------------
# The emulator


class DataverseEmulator(EmulatorApp):
    name = "dataverse"

    def __init__(self, entra: EntraEmulator) -> None:
        self.entra = entra
        self.organization_id = str(uuid.uuid4())
        self.business_unit_id = str(uuid.uuid4())
        self.protection = ServiceProtection()
        self.config = DataverseConfig()
        self.metadata = md.Metadata(list(TABLES.values()), lambda: self.config.choice_value_base, self.audience)
        self._secret = secrets.token_bytes(32)
        self._inner = Router()  # the API routes without auth/limits, for requests inside $batch
        self._local = threading.local()
        self.tables: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in TABLES}
        self._alt: dict[str, dict[str, str]] = {name: {} for name in TABLES}  # folded key value -> id
        self._row_seq: dict[str, dict[str, int]] = {name: {} for name in TABLES}
        self._deleted: dict[str, dict[str, int]] = {name: {} for name in TABLES}
        self._seq = 0  # change-tracking sequence, monotonically increasing for the emulator's life
        self._floor = 0  # delta tokens older than the last reset are expired
        self._version = 1000  # rowversion: every write takes the next value
        self._undo: list[tuple[Table, str, dict[str, Any] | None, int | None, int | None]] | None = None
        super().__init__()
        self._seed_currencies()

    def audience(self) -> str:
        """The resource (and token audience) clients use: this emulator's origin."""
        assert self.server is not None, "the emulator's server is not started"
        return self.server.origin

    # -- routing -----------------------------------------------------------------------------
    def routes(self, router: Router) -> None:
        api = re.escape(API)
        entity = r"/(?P<set>[A-Za-z_]\w*)"
        key = r"\((?P<key>.*)\)"
        operations: list[tuple[str, str, Callable[[Request], Response]]] = [
            ("GET", api + r"/?", self._service_document),
            ("GET", api + r"/WhoAmI(?:\(\))?", self._whoami),
            ("POST", api + r"/\$batch", self._batch),
            ("GET", api + r"/EntityDefinitions(?P<rest>(?:\(.*|/.*)?)", self._entity_definitions),
            ("GET", api + r"/GlobalOptionSetDefinitions(?P<rest>(?:\(.*)?)", self._global_option_sets),
            ("POST", api + r"/(?P<action>WinOpportunity|LoseOpportunity)", self._close_opportunity),
            (
                "POST",
                api + entity + r"/Microsoft\.Dynamics\.CRM\.(?P<action>CreateMultiple|UpdateMultiple|UpsertMultiple)",
                self._multiple,
            ),
            ("GET", api + entity + r"/\$count", self._count),
            ("GET", api + entity, self._list),
            ("POST", api + entity, self._create),
            ("GET", api + entity + key, self._retrieve),
            ("PATCH", api + entity + key, self._patch),
            ("DELETE", api + entity + key, self._delete),
        ]
        for method, pattern, handler in operations:
            self._inner.add(method, pattern, handler)
            router.add(method, pattern, self._api(handler))
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            router.add(method, api + r"/.*", self._api(self._unknown))
        router.add("POST", r"/_sandbox/reset", self._ctl_reset)
        router.add("POST", r"/_sandbox/seed", self._ctl_seed)
        router.add("GET", r"/_sandbox/state", self._ctl_state)
        router.add("GET", r"/_sandbox/limits", self._ctl_limits)
        router.add("POST", r"/_sandbox/limits", self._ctl_limits)
        router.add("GET", r"/_sandbox/config", self._ctl_config)
        router.add("POST", r"/_sandbox/config", self._ctl_config)
        router.add("GET", r"/_sandbox/tables/(?P<set>\w+)", self._ctl_rows)
        router.add("GET", r"/_sandbox/tables/(?P<set>\w+)/(?P<id>[^/]+)", self._ctl_row)
        router.add("DELETE", r"/_sandbox/tables/(?P<set>\w+)/(?P<id>[^/]+)", self._ctl_delete)
        router.add("POST", r"/_sandbox/tables/(?P<set>\w+)/(?P<id>[^/]+)/edit", self._ctl_edit)

    def _api(self, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """Token check, then the service protection limits, around an API handler."""

        def call(request: Request) -> Response:
            claims = self.entra.validate_bearer(request.headers.get("Authorization"), self.audience())
            user = str(claims.get("oid") or claims.get("appid") or "anonymous")
            entry = self.protection.enter(user)
            self._local.user = user
            self._local.formatted = _wants_formatted_values(request.headers)
            started = time.monotonic()
            try:
                response = handler(request)
            finally:
                left, ms_left = self.protection.leave(user, entry, (time.monotonic() - started) * 1000)
            response.headers.set("x-ms-ratelimit-burst-remaining-xrm-requests", str(left))
            response.headers.set("x-ms-ratelimit-time-remaining-xrm-requests", f"{ms_left:,.2f}")
            if self.protection.limits.dop_hint is not None:
                response.headers.set("x-ms-dop-hint", str(self.protection.limits.dop_hint))
            return response

        return call

    def decorate(self, request: Request, response: Response) -> None:
        response.headers.set("REQ_ID", new_request_id())
        response.headers.set("OData-Version", "4.0")

    def error_response(self, err: HTTPError, request: Request) -> Response:
        if err.status == 401:
            # Dataverse answers 401 with an empty body and the authority to get a token from.
            tenant = self.entra.config.tenant_id
            authority = self.entra.server.origin if self.entra.server else "https://login.microsoftonline.com"
            resource = self.server.origin if self.server else ""
            resp = Response(401)
            resp.headers.set(
                "WWW-Authenticate",
                f"Bearer authorization_uri={authority}/{tenant}/oauth2/authorize, resource_id={resource}/",
            )
            return resp
        code = err.code
        if not (code.startswith("0x") or code == ""):
            code = {404: "0x8006088a", 405: "0x80060888", 413: "0x8004418a"}.get(err.status, "0x80040216")
        return _json({"error": {"code": code, "message": err.message}}, err.status, err.headers)

    def throttle_response(self, request: Request, retry_after: float) -> Response:
        lim = self.protection.limits
        return self.error_response(
            _throttle(
                "0x80072322",
                f"Number of requests exceeded the limit of {lim.requests} over time window of "
                f"{_seconds(lim.window_seconds)} seconds.",
                retry_after,
            ),
            request,
        )

    def unavailable_response(self, request: Request, status: int) -> Response:
        headers = {"Retry-After": "1"} if status == 503 else {}
        return self.error_response(_err(status, "0x80040216", "An unexpected error occurred.", headers), request)

    # -- state primitives (callers hold self.lock) ----------------------------------------------
    def _log(self, table: Table, row_id: str) -> None:
        if self._undo is not None:
            self._undo.append(
                (
                    table,
                    row_id,
                    self.tables[table.set].get(row_id),
                    self._row_seq[table.set].get(row_id),
                    self._deleted[table.set].get(row_id),
                )
            )

    def _index(self, table: Table, row: dict[str, Any] | None, add: bool) -> None:
        if table.alternate_key is None or row is None or row.get(table.alternate_key) is None:
            return
        folded = str(row[table.alternate_key]).casefold()  # SQL's case-insensitive collation
        if add:
            self._alt[table.set][folded] = row[table.pk]
        elif self._alt[table.set].get(folded) == row[table.pk]:
            del self._alt[table.set][folded]

    def _store(self, table: Table, row: dict[str, Any]) -> None:
        row_id = row[table.pk]
        self._log(table, row_id)
        self._index(table, self.tables[table.set].get(row_id), add=False)
        self.tables[table.set][row_id] = row
        self._index(table, row, add=True)
        self._seq += 1
        self._row_seq[table.set][row_id] = self._seq
        self._deleted[table.set].pop(row_id, None)

    def _discard(self, table: Table, row_id: str) -> None:
        self._log(table, row_id)
        self._index(table, self.tables[table.set].pop(row_id), add=False)
        self._row_seq[table.set].pop(row_id, None)
        self._seq += 1
        self._deleted[table.set][row_id] = self._seq

    def _rollback(self, undo: list[tuple[Table, str, dict[str, Any] | None, int | None, int | None]]) -> None:
        for table, row_id, row, seq, deleted in reversed(undo):
            self._index(table, self.tables[table.set].get(row_id), add=False)
            _restore(self.tables[table.set], row_id, row)
            _restore(self._row_seq[table.set], row_id, seq)
            _restore(self._deleted[table.set], row_id, deleted)
            self._index(table, row, add=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All writes inside apply together or not at all (nestable; hold self.lock)."""
        outer, self._undo = self._undo, []
        try:
            yield
        except BaseException:
            self._rollback(self._undo)
            self._undo = outer
            raise
        if outer is not None:
            outer.extend(self._undo)
        self._undo = outer

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # -- tables and rows ---------------------------------------------------------------------
    def _table(self, name: str) -> Table:
        table = TABLES.get(name)
        if table is None:
            raise _segment_not_found(name)
        return table

    def _writable(self, name: str) -> Table:
        table = self._table(name)
        if table.read_only:
            # PrivilegeDenied (0x80040220), which the Web API answers with 403.
            raise _err(403, "0x80040220", "The user does not hold the necessary privileges.")
        return table

    def _find(self, table: Table, ref: KeyRef) -> dict[str, Any] | None:
        if ref.kind == "id":
            return self.tables[table.set].get(ref.value)
        row_id = self._alt[table.set].get(ref.value.casefold())
        return self.tables[table.set].get(row_id) if row_id else None

    def _missing(self, table: Table, ref: KeyRef) -> HTTPError:
        return _not_found(table, ref.value) if ref.kind == "id" else _key_not_found(table)

    def _url(self, path: str) -> str:
        return f"{self.audience()}{API}/{path}"

    def _public(self, table: Table, row: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": _etag(row)}
        formatted = getattr(self._local, "formatted", False)
        for name in select if select is not None else table.names:
            if name != table.pk:
                out[name] = row.get(name)
                if formatted and row.get(name) is not None:
                    label = self._formatted(table, name, row[name])
                    if label is not None:
                        out[f"{name}@{FORMATTED_VALUE}"] = label
        out[table.pk] = row[table.pk]
        return out

    def _formatted(self, table: Table, name: str, value: Any) -> str | None:
        """A choice column's option label (or Yes/No), as the FormattedValue annotation carries it."""
        column = table.column(name)
        if column is not None and column.kind == "choice":
            return self.metadata.label(table.logical, name, value)
        if column is not None and column.kind == "bool":
            return "Yes" if value else "No"
        return None

    def _context(self, table: Table, select: list[str] | None, suffix: str = "") -> str:
        columns = f"({','.join(select)})" if select else ""
        return f"{self.audience()}{API}/$metadata#{table.set}{columns}{suffix}"

    # -- writes: validation --------------------------------------------------------------------
    def _coerce(self, table: Table, column: Column, value: Any) -> Any:
        if value is None:
            return None
        kind = column.kind
        if kind in ("string", "memo"):
            if not isinstance(value, str):
                raise _not_convertible(table, value, column)
            if value == "":
                return None  # Dataverse stores an empty string as null
            if column.max_length is not None and len(value) > column.max_length:
                raise _validation(
                    f"A validation error occurred.  The length of the '{column.name}' attribute of the "
                    f"'{table.logical}' entity exceeded the maximum allowed length of '{column.max_length}'."
                )
            return value
        if kind in ("money", "decimal"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _not_convertible(table, value, column)
            low = column.minimum if column.minimum is not None else -MONEY_MAX
            high = column.maximum if column.maximum is not None else MONEY_MAX
            if not low <= value <= high:
                raise _validation(
                    f"A validation error occurred. The value {value} of '{column.name}' on record of type "
                    f"'{table.logical}' is outside the valid range. Accepted Values: {low:g} - {high:g}"
                )
            return value
        if kind in ("int", "bigint", "choice"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _not_convertible(table, value, column)
            choices = self.metadata.values(table.logical, column.name) if kind == "choice" else []
            if choices and value not in choices:
                # PicklistValueOutOfRange 0x8004431A, with the platform's validation message; the
                # options come from the column's option set (dataverse_metadata.CHOICES).
                raise _err(
                    400,
                    "0x8004431a",
                    f"A validation error occurred. The value {value} of '{column.name}' on record of type "
                    f"'{table.logical}' is outside the valid range. Accepted Values: "
                    + ",".join(str(c) for c in choices),
                )
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise _not_convertible(table, value, column)
            return value
        if kind == "date":
            try:
                if not isinstance(value, str) or not _DATE_RE.match(value):
                    raise ValueError(value)
                return date.fromisoformat(value).isoformat()
            except ValueError:
                raise _not_convertible(table, value, column) from None
        if kind == "datetime":
            match = _DATETIME_RE.match(value) if isinstance(value, str) else None
            try:
                if not match:
                    raise ValueError(value)
                return _stamp(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                raise _not_convertible(table, value, column) from None
        if kind == "guid":
            if not isinstance(value, str) or not _GUID_RE.match(value):
                raise _not_convertible(table, value, column)
            return value.lower()
        raise _not_convertible(table, value, column)

    def _bind(self, table: Table, column: Column, value: Any) -> str | None:
        """``"<nav>@odata.bind": "/accounts(<guid>)"`` (relative, absolute, or ``$n`` resolved)."""
        if value is None:
            return None  # a null bind clears the lookup
        match = _BIND.match(value.strip()) if isinstance(value, str) else None
        if not match or match.group("set") != column.target:
            raise _payload(
                table,
                f"Microsoft.OData.ODataException: The value '{value}' of the '{column.nav}@odata.bind' annotation "
                f"is not a valid reference to an entity in '{column.target}'.",
            )
        target = TABLES[match.group("set")]
        ref = _parse_key(target, match.group("key"))
        row = self._find(target, ref)
        if row is None:
            raise self._missing(target, ref)
        return str(row[target.pk])

    def _changes(self, table: Table, body: Any) -> dict[str, Any]:
        """The column values a write body sets, validated and converted."""
        if not isinstance(body, dict):
            raise _payload(table, "Microsoft.OData.ODataException: The payload must be a JSON object.")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key.startswith("@"):
                if key == "@odata.type" and str(value).lstrip("#") != table.type_name:
                    raise _payload(
                        table,
                        f"Microsoft.OData.ODataException: A resource with type '{str(value).lstrip('#')}' was "
                        f"found, but it is not assignable to the expected type '{table.type_name}'.",
                    )
                continue
            prop, at, annotation = key.partition("@")
            column = table.column(prop)
            if at:
                nav = table.navs.get(prop)
                if annotation == "odata.bind":
                    if nav is None:  # e.g. the lookup's logical name instead of its navigation property
                        raise _undeclared(table, prop)
                    changes[nav.name] = self._bind(table, nav, value)
                elif column is None and nav is None:
                    raise _undeclared(table, prop)
                continue
            if column is None:
                if prop in table.navs:
                    raise _payload(
                        table,
                        "Microsoft.OData.ODataException: A 'PrimitiveValue' node with non-null value was found when "
                        f"trying to read the value of the navigation property '{prop}'; however, a 'StartArray' "
                        "node, a 'StartObject' node, or a 'PrimitiveValue' node with null value was expected.",
                    )
                raise _invalid_property(table, prop)
            if column.kind == "lookup":
                raise _payload(
                    table,
                    "Microsoft.Crm.CrmHttpException: CRM do not support direct update of Entity Reference "
                    "properties, Use Navigation properties instead.",
                )
            if column.system:
                continue  # createdon, modifiedon, versionnumber: not valid for create/update; ignored
            changes[column.name] = self._coerce(table, column, value)
        return changes

    def _defaults(self, table: Table) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(table.names)
        row.update({c.name: c.default for c in table.columns if c.default is not None})
        if table.set in STATES:
            row.update(statecode=0, statuscode=1)
        if table is OPPORTUNITIES:
            row["cosell_syncwithpartnercenter"] = False
            # The currency defaults to the organization's base currency.
            row["_transactioncurrencyid_value"] = self._currency_id("USD")
        return row

    def _check_row(self, table: Table, row: dict[str, Any]) -> None:
        if self.config.enforce_required:
            for column in table.columns:
                if column.required and row.get(column.name) is None:
                    # Guessed text: the documentation does not show the API's message for this.
                    raise _validation(
                        f"A validation error occurred. The value for '{column.name}' on record of type "
                        f"'{table.logical}' is required."
                    )
        if table.alternate_key and row.get(table.alternate_key) is not None:
            owner = self._alt[table.set].get(str(row[table.alternate_key]).casefold())
            if owner is not None and owner != row[table.pk]:
                raise _duplicate()

    def _check_state(
        self, table: Table, old: dict[str, Any] | None, changes: dict[str, Any], row: dict[str, Any], trusted: bool
    ) -> None:
        states = STATES.get(table.set)
        if states is None:
            return
        state = changes.get("statecode")
        if table is OPPORTUNITIES and not trusted:
            if state in (WON, LOST):
                # CannotUseOpportunitySetStateMessage (0x80100005): won/lost only via the actions.
                word = STATE_NAMES[state].lower()
                raise _err(
                    400,
                    "0x80100005",
                    f"This message can not be used to set the state of opportunity to {word}. In order to set state "
                    f"of opportunity to {word}, use the {word} message instead.",
                )
            closed = old is not None and old["statecode"] != OPEN
            if closed and state != OPEN and self.config.closed_opportunity_writes == "reject":
                raise _err(400, "0x80040515", "The opportunity is already closed.")
        name, fitting = states[row["statecode"]]
        if "statecode" in changes and "statuscode" not in changes and row["statuscode"] not in fitting:
            row["statuscode"] = fitting[0]
        if row["statuscode"] not in fitting:
            entity = table.logical
            raise _err(
                400,
                "0x80040203",
                f"{row['statuscode']} is not a valid status code for state code {entity.capitalize()}State.{name} "
                f"on {entity} with Id {row[table.pk]}.",
            )

    def _insert(self, table: Table, changes: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        row_id = changes.pop(table.pk, None) or str(uuid.uuid4())
        if row_id in self.tables[table.set]:
            raise _duplicate()
        row = self._defaults(table)
        row.update(changes)
        row[table.pk] = row_id
        self._check_state(table, None, changes, row, trusted)
        self._check_row(table, row)
        now = _stamp(_now())
        row.update(createdon=now, modifiedon=now, versionnumber=self._next_version())
        self._store(table, row)
        return row

    def _modify(
        self, table: Table, old: dict[str, Any], changes: dict[str, Any], *, trusted: bool = False
    ) -> dict[str, Any]:
        if changes.get(table.pk, old[table.pk]) != old[table.pk]:
            raise _err(400, "0x80040203", f"The '{table.pk}' in the body does not match the record being updated.")
        row = dict(old)
        row.update(changes)
        self._check_state(table, old, changes, row, trusted)
        self._check_row(table, row)
        row.update(modifiedon=_stamp(_now()), versionnumber=self._next_version())
        self._store(table, row)
        return row

    def _body(self, request: Request, table: Table | None) -> Any:
        if not request.body.strip():
            raise _payload(table, "Microsoft.OData.ODataException: The request body is empty.")
        try:
            return json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _payload(table, f"Newtonsoft.Json.JsonReaderException: {exc}") from None

    # -- reads: query options --------------------------------------------------------------------
    def _check_names(self, table: Table, expr: str) -> None:
        """Property names are case-sensitive: ``Name`` is not ``name``."""
        known = {name.lower(): name for name in table.names}
        for word in _IDENTIFIER.findall(_STRING_LITERAL.sub("''", expr)):
            exact = known.get(word.lower())
            if exact is not None and exact != word:
                raise _unknown_property(table, word)

    def _query(self, request: Request, table: Table) -> _Query:
        q = _Query()
        for name, values in request.query.items():
            if not name.startswith("$"):
                continue
            if name in _UNSUPPORTED_OPTIONS:
                raise _query_error(f"The query parameter {name} is not supported")
            if name not in _QUERY_OPTIONS:
                raise _query_error(f"The query parameter '{name}' is not supported.")
            if len(values) > 1:
                raise _query_error(
                    f"Query option '{name}' was specified more than once, but it must be specified at most once."
                )
            q.raw[name] = values[0]
        raw = q.raw
        if "$select" in raw:
            names = [s.strip() for s in raw["$select"].split(",") if s.strip()]
            for name in names:
                if table.column(name) is None:
                    raise _unknown_property(table, name)
            q.select = names or None
        q.filter = raw.get("$filter") or None
        q.orderby = raw.get("$orderby") or None
        q.expand = raw.get("$expand") or None
        q.skiptoken = raw.get("$skiptoken") or None
        q.deltatoken = raw.get("$deltatoken") or None
        if "$top" in raw:
            text = raw["$top"].strip()
            if not text.isdigit():
                raise _query_error(
                    f"Invalid value '{text}' for $top query option found. "
                    "The $top query option requires a non-negative integer value."
                )
            q.top = int(text)
            if q.top > MAX_PAGE_SIZE:
                # Guess: Dataverse (FetchXML top) does not return more than 5,000 rows for $top.
                raise _query_error(f"The $top query option value {q.top} exceeds the maximum of {MAX_PAGE_SIZE}.")
        if "$count" in raw:
            text = raw["$count"].strip().lower()
            if text not in ("true", "false"):
                raise _query_error(f"'{raw['$count']}' is not a valid count option.")
            q.count = text == "true"
        return q

    def _predicate(self, table: Table, q: _Query) -> Callable[[dict[str, Any]], bool] | None:
        if not q.filter:
            return None
        self._check_names(table, q.filter)
        options = FilterOptions(
            allowed_paths=frozenset(table.names),
            functions=frozenset({"contains", "startswith", "endswith"}),
            case_insensitive_strings=True,  # SQL's case-insensitive collation
        )
        try:
            return compile_filter(q.filter, options)  # type: ignore[return-value]
        except ODataError as exc:
            raise self._rephrase(table, exc) from None

    def _order(self, table: Table, q: _Query) -> list[tuple[str, bool]]:
        if not q.orderby:
            return []
        self._check_names(table, q.orderby)
        try:
            return parse_orderby(q.orderby, frozenset(table.names))
        except ODataError as exc:
            raise self._rephrase(table, exc) from None

    @staticmethod
    def _rephrase(table: Table, exc: ODataError) -> HTTPError:
        match = re.match(r"Could not find a property named '([^']+)'", str(exc))
        if match:
            return _unknown_property(table, match.group(1))
        return _query_error(str(exc))

    # -- reads: paging tokens ---------------------------------------------------------------------
    def _fingerprint(self, table: Table, q: _Query) -> str:
        parts = [table.set] + [q.raw.get(k, "") for k in ("$select", "$filter", "$orderby", "$top", "$count")]
        parts.append(q.raw.get("$deltatoken", ""))
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def _skiptoken(self, payload: dict[str, Any]) -> str:
        """An opaque paging cookie in Dataverse's outer shape, signed so it cannot be edited."""
        data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        blob = _b64(data) + "." + _b64(hmac.new(self._secret, data, hashlib.sha256).digest()[:12])
        tracking = "True" if payload.get("tr") else "False"
        return f'<cookie pagenumber="{payload["p"]}" pagingcookie="{blob}" istracking="{tracking}" />'

    def _read_skiptoken(self, table: Table, q: _Query) -> dict[str, Any] | None:
        if q.skiptoken is None:
            return None
        match = re.search(r'pagingcookie="([^".]+)\.([^"]+)"', q.skiptoken)
        payload: dict[str, Any] | None = None
        if match:
            with contextlib.suppress(ValueError, json.JSONDecodeError):
                data = _unb64(match.group(1))
                expected = hmac.new(self._secret, data, hashlib.sha256).digest()[:12]
                if hmac.compare_digest(expected, _unb64(match.group(2))):
                    payload = json.loads(data)
        if payload is None or payload.get("q") != self._fingerprint(table, q):
            # Guessed text: the nextLink must be sent back unchanged.
            raise _query_error("The $skiptoken query option value is not valid for this query.")
        return payload

    def _link(self, request: Request, table: Table, params: list[tuple[str, str]]) -> str:
        safe = "$,()'*:@/="
        query = "&".join(f"{k}={quote(v, safe=safe)}" for k, v in params)
        return f"{self._url(table.set)}?{query}" if query else self._url(table.set)

    def _next_link(self, request: Request, table: Table, q: _Query, payload: dict[str, Any]) -> str:
        params = [(k, v) for k, v in q.raw.items() if k != "$skiptoken"]
        params.append(("$skiptoken", self._skiptoken(payload)))
        return self._link(request, table, params)

    def _delta_link(self, request: Request, table: Table, q: _Query, seq: int) -> str:
        params = [("$select", q.raw["$select"])] if "$select" in q.raw else []
        # The real token looks like "919042!08/22/2017 08:10:44": a version and when it was issued.
        token = f"{seq}!{_now().strftime('%m/%d/%Y %H:%M:%S')}"
        link = self._link(request, table, params)
        return f"{link}{'&' if params else '?'}$deltatoken={quote(token, safe='')}"

    def _read_deltatoken(self, text: str) -> int:
        match = re.fullmatch(r"(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})", text.strip())
        expired = _err(
            400, "0x80044352", "Version stamp associated with the client has expired. Please perform a full sync."
        )
        if not match:
            raise expired
        seq = int(match.group(1))
        issued = datetime.strptime(match.group(2), "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        age = (_now() - issued).total_seconds()
        if seq < self._floor or seq > self._seq or age > self.config.delta_token_lifetime_seconds:
            raise expired
        return seq

    # -- handlers: reads -------------------------------------------------------------------------
    def _service_document(self, request: Request) -> Response:
        value = [{"name": name, "kind": "EntitySet", "url": name} for name in TABLES]
        return _json({"@odata.context": f"{self.audience()}{API}/$metadata", "value": value})

    def _whoami(self, request: Request) -> Response:
        user = getattr(self._local, "user", "anonymous")
        return _json(
            {
                "@odata.context": f"{self.audience()}{API}/$metadata#{NAMESPACE}.WhoAmIResponse",
                "BusinessUnitId": self.business_unit_id,
                "UserId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"systemuser:{user}")),
                "OrganizationId": self.organization_id,
            }
        )

    def _metadata_options(self, request: Request) -> dict[str, str]:
        options: dict[str, str] = {}
        for name, values in request.query.items():
            if len(values) > 1 and name.startswith("$"):
                raise _query_error(
                    f"Query option '{name}' was specified more than once, but it must be specified at most once."
                )
            options[name] = values[0]
        return options

    def _entity_definitions(self, request: Request) -> Response:
        with self.lock:
            return _json(self.metadata.handle(request.params["rest"], self._metadata_options(request)))

    def _global_option_sets(self, request: Request) -> Response:
        with self.lock:
            return _json(self.metadata.global_option_sets(request.params["rest"], self._metadata_options(request)))

    def _unknown(self, request: Request) -> Response:
        if self._inner.resolve(request.method, request.path) is None:  # raises 405 for a wrong method
            raise _segment_not_found(request.path.rstrip("/").rsplit("/", 1)[-1])
        raise _segment_not_found(request.path)

    def _count(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        q = self._query(request, table)
        predicate = self._predicate(table, q)
        with self.lock:
            total = sum(1 for row in self.tables[table.set].values() if predicate is None or predicate(row))
        resp = Response(200, str(total).encode())
        resp.headers.set("Content-Type", "text/plain")
        return resp

    def _list(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        q = self._query(request, table)
        prefer = _preferences(request.headers)
        with self.lock:
            token = self._read_skiptoken(table, q)
            tracking = prefer.track_changes or q.deltatoken is not None or bool(token and token.get("tr"))
            if tracking:
                for name, value in (("filter", q.filter), ("orderby", q.orderby), ("expand", q.expand)):
                    if value is not None:
                        raise _query_error(
                            f'The "${name}" query parameter isn\'t supported when Change Tracking is enabled.'
                        )
                if "$top" in q.raw:
                    raise _query_error('The "$top" query parameter isn\'t supported when Change Tracking is enabled.')
            if q.expand is not None:
                raise _query_error("The sandbox does not implement $expand.")
            size, applied = (
                (prefer.maxpagesize, True)
                if prefer.maxpagesize and 0 < prefer.maxpagesize <= MAX_PAGE_SIZE
                else (MAX_PAGE_SIZE, False)
            )
            applied_prefs = [f"odata.maxpagesize={size}"] if applied else []
            if tracking and prefer.track_changes:
                applied_prefs.insert(0, "odata.track-changes")
            if q.deltatoken is not None:
                body = self._delta(request, table, q, token, size)
            else:
                body = self._collection(request, table, q, token, size, applied, tracking)
        headers = {"Preference-Applied": ", ".join(applied_prefs)} if applied_prefs else {}
        return _json(body, headers=headers)

    def _collection(
        self,
        request: Request,
        table: Table,
        q: _Query,
        token: dict[str, Any] | None,
        size: int,
        applied: bool,
        tracking: bool,
    ) -> dict[str, Any]:
        predicate = self._predicate(table, q)
        order = [*self._order(table, q), (table.pk, False)]  # the primary key breaks ties, as the paging cookie does
        rows = [r for r in self.tables[table.set].values() if predicate is None or predicate(r)]
        total = len(rows)
        rows = list(sort_records(rows, order))  # type: ignore[arg-type]
        if token is not None:
            # Keyset paging: resume strictly after the last row of the previous page.
            sentinel = {path: value for (path, _), value in zip(order, token["k"], strict=True)}
            ranked = sort_records([*rows, sentinel], order)
            position = next(i for i, r in enumerate(ranked) if r is sentinel)
            rows = list(ranked[position + 1 :])  # type: ignore[arg-type]
        if q.top is not None and not applied:
            page, more = rows[: q.top], False
        else:  # with odata.maxpagesize, $top is ignored
            page, more = rows[:size], len(rows) > size
        body: dict[str, Any] = {"@odata.context": self._context(table, q.select)}
        if q.count:
            body["@odata.count"] = min(total, MAX_COUNT)
        body["value"] = [self._public(table, row, q.select) for row in page]
        upto = token["dt"] if token and "dt" in token else self._seq
        if more:
            last = page[-1]
            payload = {
                "q": self._fingerprint(table, q),
                "p": (token["p"] if token else 1) + 1,
                "k": [last.get(path) for path, _ in order],
            }
            if tracking:
                payload.update(tr=1, dt=upto)
            body["@odata.nextLink"] = self._next_link(request, table, q, payload)
        elif tracking:
            body["@odata.deltaLink"] = self._delta_link(request, table, q, upto)
        return body

    def _delta(
        self, request: Request, table: Table, q: _Query, token: dict[str, Any] | None, size: int
    ) -> dict[str, Any]:
        since = self._read_deltatoken(q.deltatoken or "")
        upto = token["up"] if token else self._seq
        rows = self.tables[table.set]
        items = sorted(
            [(0, seq, rid) for rid, seq in self._row_seq[table.set].items() if since < seq <= upto]
            + [
                (1, seq, rid)
                for rid, seq in self._deleted[table.set].items()
                if since < seq <= upto and rid not in rows
            ]
        )  # new or updated rows first, then deleted ones
        if token is not None:
            after = tuple(token["k"])
            items = [item for item in items if item[:2] > after]
        page, more = items[:size], len(items) > size
        deleted_context = f"{self.audience()}{API}/$metadata#{table.set}/$deletedEntity"
        value: list[dict[str, Any]] = []
        for phase, _, rid in page:
            if phase == 0:
                value.append(self._public(table, rows[rid], q.select))
            else:
                value.append({"@odata.context": deleted_context, "id": rid, "reason": "deleted"})
        body: dict[str, Any] = {"@odata.context": self._context(table, q.select, "/$delta"), "value": value}
        if more:
            payload = {
                "q": self._fingerprint(table, q),
                "p": (token["p"] if token else 1) + 1,
                "k": list(page[-1][:2]),
                "tr": 1,
                "up": upto,
            }
            body["@odata.nextLink"] = self._next_link(request, table, q, payload)
        else:
            body["@odata.deltaLink"] = self._delta_link(request, table, q, upto)
        return body

    def _retrieve(self, request: Request) -> Response:
        table = self._table(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        q = self._query(request, table)
        for name in ("$filter", "$orderby", "$top", "$skiptoken", "$deltatoken"):
            if name in q.raw:
                raise _query_error(f"The query parameter '{name}' is not supported when retrieving a single record.")
        if q.expand is not None:
            raise _query_error("The sandbox does not implement $expand.")
        with self.lock:
            row = self._find(table, ref)
            if row is None:
                raise self._missing(table, ref)
            row = dict(row)
        if_none = _condition(request, "If-None-Match")
        if if_none is not None and if_none != "*" and _etag_matches(if_none, row):
            return Response.empty(304, {"ETag": _etag(row), "Content-Type": JSON_TYPE})
        body = {"@odata.context": self._context(table, q.select, "/$entity"), **self._public(table, row, q.select)}
        return _json(body, headers={"ETag": _etag(row)})

    # -- handlers: writes ------------------------------------------------------------------------
    def _select_only(self, request: Request, table: Table) -> list[str] | None:
        q = self._query(request, table)
        extra = [k for k in q.raw if k != "$select"]
        if extra:
            raise _query_error(f"The query parameter '{extra[0]}' is not supported on this request.")
        return q.select

    def _representation(self, table: Table, row: dict[str, Any], select: list[str] | None, status: int) -> Response:
        body = {"@odata.context": self._context(table, select, "/$entity"), **self._public(table, row, select)}
        return _json(body, status, {"ETag": _etag(row), "Preference-Applied": "return=representation"})

    def _create(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        select = self._select_only(request, table)
        body = self._body(request, table)
        with self.lock:
            row = dict(self._insert(table, self._changes(table, body)))
        if _preferences(request.headers).return_representation:
            return self._representation(table, row, select, 201)
        return Response.empty(204, {"OData-EntityId": self._url(f"{table.set}({row[table.pk]})")})

    def _patch(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        select = self._select_only(request, table)
        body = self._body(request, table)
        if_match, if_none = _condition(request, "If-Match"), _condition(request, "If-None-Match")
        with self.lock:
            changes = self._changes(table, body)
            old = self._find(table, ref)
            if old is not None and if_none == "*":
                raise _duplicate()
            if if_match is not None:
                if old is None:
                    raise self._missing(table, ref)
                if not _etag_matches(if_match, old):
                    raise _err(
                        412,
                        "0x80060882",
                        "The version of the existing record doesn't match the RowVersion property provided.",
                    )
            if old is None:  # upsert: create
                if ref.kind == "id":
                    if changes.get(table.pk, ref.value) != ref.value:
                        raise _err(
                            400, "0x80040203", f"The '{table.pk}' in the body does not match the key in the URL."
                        )
                    changes[table.pk] = ref.value
                else:  # the body's key value wins when it differs from the URL's (documented)
                    changes.setdefault(str(table.alternate_key), ref.value)
                row, created = dict(self._insert(table, changes)), True
            else:
                if ref.kind == "alt":
                    changes.pop(str(table.alternate_key), None)  # key data in the body is ignored on update
                row, created = dict(self._modify(table, old, changes)), False
        if _preferences(request.headers).return_representation:
            return self._representation(table, row, select, 201 if created else 200)
        return Response.empty(204, {"OData-EntityId": self._url(ref.segment(table))})

    def _delete(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        ref = _parse_key(table, request.params["key"])
        if_match = _condition(request, "If-Match")
        with self.lock:
            row = self._find(table, ref)
            if row is None:
                raise self._missing(table, ref)
            if if_match is not None and not _etag_matches(if_match, row):
                raise _err(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                )
            self._discard(table, row[table.pk])
        return Response.empty(204)

    def _target(self, table: Table, target: Any, index: int) -> dict[str, Any]:
        if not isinstance(target, dict):
            raise _payload(table, f"Microsoft.OData.ODataException: Targets[{index}] is not an entity.")
        kind = target.get("@odata.type")
        if kind is None:
            # The @odata.type annotation is required on every item of Targets (documented).
            raise _payload(
                table,
                "Microsoft.OData.ODataException: A type annotation ('@odata.type') is required for every item in "
                f"the 'Targets' parameter; item {index} has none.",
            )
        if str(kind).lstrip("#") != table.type_name:
            raise _payload(
                table,
                f"Microsoft.OData.ODataException: Targets[{index}] has the type '{str(kind).lstrip('#')}', but the "
                f"action is bound to '{table.type_name}'.",
            )
        return target

    def _multiple(self, request: Request) -> Response:
        table = self._writable(request.params["set"])
        action = request.params["action"]
        body = self._body(request, table)
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not targets:
            raise _payload(table, f"Microsoft.OData.ODataException: {action} requires a non-empty 'Targets' parameter.")
        ids: list[str] = []
        with self.lock, self._transaction():  # standard tables: any error rolls back the whole call
            for index, raw in enumerate(targets):
                target = self._target(table, raw, index)
                changes = self._changes(table, target)
                if action == "CreateMultiple":
                    ids.append(str(self._insert(table, changes)[table.pk]))
                    continue
                ref: KeyRef | None = None
                if "@odata.id" in target:
                    match = _BIND.match(str(target["@odata.id"]).strip())
                    if not match or match.group("set") != table.set:
                        raise _payload(
                            table, f"Microsoft.OData.ODataException: '{target['@odata.id']}' is not a valid @odata.id."
                        )
                    ref = _parse_key(table, match.group("key"))
                elif table.pk in changes:
                    ref = KeyRef("id", str(changes[table.pk]))
                if action == "UpdateMultiple":
                    if ref is None:
                        raise _err(
                            400, "0x80040203", f"Targets[{index}] does not identify a record: '{table.pk}' is missing."
                        )
                    old = self._find(table, ref)
                    if old is None:
                        raise self._missing(table, ref)
                    self._modify(table, old, changes)
                    continue
                old = self._find(table, ref) if ref is not None else None
                if old is not None:
                    if ref is not None and ref.kind == "alt":
                        changes.pop(str(table.alternate_key), None)
                    self._modify(table, old, changes)
                else:
                    if ref is not None and ref.kind == "alt":
                        changes.setdefault(str(table.alternate_key), ref.value)
                    elif ref is not None:
                        changes[table.pk] = ref.value
                    self._insert(table, changes)
        if action == "CreateMultiple":
            return _json(
                {"@odata.context": f"{self.audience()}{API}/$metadata#{NAMESPACE}.CreateMultipleResponse", "Ids": ids}
            )
        return Response.empty(204)  # UpdateMultiple; UpsertMultiple returns 204 too (documented)

    def _close_opportunity(self, request: Request) -> Response:
        won = request.params["action"] == "WinOpportunity"
        body = self._body(request, None)
        close = body.get("OpportunityClose") if isinstance(body, dict) else None
        status = body.get("Status") if isinstance(body, dict) else None
        if not isinstance(close, dict):
            raise _payload(None, "Microsoft.OData.ODataException: The parameter 'OpportunityClose' is required.")
        if isinstance(status, bool) or not isinstance(status, int):
            raise _payload(None, "Microsoft.OData.ODataException: The parameter 'Status' must be an Edm.Int32.")
        with self.lock:
            details = self._changes(OPPORTUNITY_CLOSE, close)
            opportunity_id = details.get("_opportunityid_value")
            if opportunity_id is None:
                raise _err(
                    400, "0x80040203", "The OpportunityClose entity must reference an opportunity (opportunityid)."
                )
            opportunity = self.tables["opportunities"][opportunity_id]
            if opportunity["statecode"] != OPEN:
                raise _err(400, "0x80040515", "The opportunity is already closed.")
            state = WON if won else LOST
            if status not in STATUS_FOR_STATE[state]:
                raise _err(
                    400,
                    "0x80040203",
                    f"{status} is not a valid status code for state code OpportunityState.{STATE_NAMES[state]} "
                    f"on opportunity with Id {opportunity_id}.",
                )
            changes: dict[str, Any] = {
                "statecode": state,
                "statuscode": status,
                "actualclosedate": details.get("actualend") or _now().date().isoformat(),
            }
            if details.get("actualrevenue") is not None:
                changes["actualvalue"] = details["actualrevenue"]
            self._modify(OPPORTUNITIES, opportunity, changes, trusted=True)
        return Response.empty(204)

    # -- $batch ---------------------------------------------------------------------------------
    def _batch(self, request: Request) -> Response:
        prefer = _preferences(request.headers)
        try:
            items = batch.parse_batch(request.headers.get("Content-Type"), request.body)
            total = batch.count_operations(items)
            if total > batch.MAX_REQUESTS:
                # Guessed text; the limit itself is documented.
                raise batch.BatchFormatError(
                    f"Microsoft.OData.ODataException: The batch contains {total} requests; "
                    f"the maximum is {batch.MAX_REQUESTS}."
                )
        except batch.BatchFormatError as exc:
            failure = batch.PartResult(self.error_response(batch.payload_error(str(exc)), request))
            failure.response.headers.set("REQ_ID", new_request_id())
            content_type, payload = batch.render_batch([failure])
            return Response(400, payload, Headers([("Content-Type", content_type)]))
        with self.lock:
            results, failed = batch.execute(
                items,
                dispatch=self._dispatch_inner,
                error=lambda err: self._inner_error(err, request),
                transaction=self._transaction,
                entity_path=self._entity_path,
                continue_on_error=prefer.continue_on_error,
            )
        content_type, payload = batch.render_batch(results)
        resp = Response(failed or 200, payload, Headers([("Content-Type", content_type)]))
        if prefer.continue_on_error:
            resp.headers.set("Preference-Applied", "odata.continue-on-error")
        return resp

    def _entity_path(self, response: Response) -> str | None:
        entity_id = response.headers.get("OData-EntityId")
        if not entity_id:
            return None
        path = urlsplit(entity_id).path
        return path if path.startswith(API + "/") else None

    def _inner_error(self, err: HTTPError, request: Request) -> Response:
        resp = self.error_response(err, request)
        resp.headers.set("REQ_ID", new_request_id())
        return resp

    def _dispatch_inner(self, operation: batch.Operation) -> Response:
        """One request of a batch: the same handlers, already authenticated and counted."""
        parts = urlsplit(operation.url)
        if parts.scheme:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
        elif operation.url.startswith("/"):
            target = operation.url
        else:
            target = f"{API}/{operation.url}"
        inner = Request(operation.method, target, operation.headers, operation.body, server=self.server)
        try:
            if inner.path.rstrip("/").endswith("$batch"):
                raise _err(400, "0x80048d19", "A batch request cannot contain another batch request.")
            resolved = self._inner.resolve(inner.method, inner.path) if inner.path.startswith(API) else None
            if resolved is None:
                raise _segment_not_found(inner.path.rstrip("/").rsplit("/", 1)[-1])
            handler, inner.params = resolved
            self._local.formatted = _wants_formatted_values(inner.headers)
            response = handler(inner)
        except HTTPError as err:
            response = self._inner_error(err, inner)
        except Exception as exc:
            log.exception("dataverse: unhandled error in a batch request %s %s", operation.method, operation.url)
            response = self._inner_error(
                _err(500, "0x80040216", f"An unexpected error occurred ({type(exc).__name__})."), inner
            )
        return response

    # -- Python control methods ---------------------------------------------------------------------
    def _currency_id(self, iso: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox:transactioncurrency:{iso}"))

    def _seed_currencies(self) -> None:
        with self.lock:
            for iso, name, symbol, rate in CURRENCIES:
                changes = {
                    "transactioncurrencyid": self._currency_id(iso),
                    "isocurrencycode": iso,
                    "currencyname": name,
                    "currencysymbol": symbol,
                    "exchangerate": rate,
                }
                self._insert(TRANSACTION_CURRENCIES, changes, trusted=True)

    def reset(self) -> None:
        """Empty tables (currencies re-seeded), default limits and config; older delta tokens expire."""
        with self.lock:
            for name in TABLES:
                self.tables[name].clear()
                self._alt[name].clear()
                self._row_seq[name].clear()
                self._deleted[name].clear()
            self._floor = self._seq + 1
            self.config = DataverseConfig()
            self._seed_currencies()
        self.protection.reset()
        self.faults.clear()
        self.log.clear()

    def configure_limits(self, **changes: Any) -> dict[str, Any]:
        """Service protection limits (``requests``, ``window_seconds``, ``execution_ms``, ``concurrent``,
        ``request_cost_ms``, ``dop_hint``) and ``delta_token_lifetime_seconds``; usage counters restart."""
        lifetime = changes.pop("delta_token_lifetime_seconds", None)
        limits = asdict(self.protection.limits)
        unknown = set(changes) - set(limits)
        if unknown:
            raise ValueError(f"unknown limit(s): {sorted(unknown)}")
        limits.update(changes)
        self.protection.reset(ProtectionLimits(**limits))
        if lifetime is not None:
            self.config.delta_token_lifetime_seconds = float(lifetime)
        return self.limits_state()

    def limits_state(self) -> dict[str, Any]:
        return {
            **asdict(self.protection.limits),
            "delta_token_lifetime_seconds": self.config.delta_token_lifetime_seconds,
        }

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Behaviour switches: ``enforce_required`` (bool), ``closed_opportunity_writes`` ("allow"|"reject"),
        ``choice_value_base`` (int: the first option value of the publisher's ``cosell_*`` choice columns)."""
        current = asdict(self.config)
        unknown = set(changes) - set(current)
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        if changes.get("closed_opportunity_writes", "allow") not in ("allow", "reject"):
            raise ValueError("closed_opportunity_writes must be 'allow' or 'reject'")
        base = changes.get("choice_value_base", md.DEFAULT_CHOICE_BASE)
        if isinstance(base, bool) or not isinstance(base, int) or not 10_000 <= base <= 2_147_000_000:
            raise ValueError("choice_value_base must be an integer option value (e.g. 858880000)")
        current.update(changes)
        self.config = DataverseConfig(**current)
        return asdict(self.config)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counts": {name: len(rows) for name, rows in self.tables.items()},
                "change_sequence": self._seq,
                "limits": self.limits_state(),
                "config": asdict(self.config),
                "organizationId": self.organization_id,
            }

    def rows(self, entity_set: str) -> list[dict[str, Any]]:
        table = self._table(entity_set)
        with self.lock:
            return [dict(row) for row in self.tables[table.set].values()]

    def row(self, entity_set: str, row_id: str) -> dict[str, Any]:
        table = self._table(entity_set)
        with self.lock:
            row = self.tables[table.set].get(row_id.lower())
            if row is None:
                raise _not_found(table, row_id)
            return dict(row)

    def create(self, entity_set: str, values: dict[str, Any]) -> dict[str, Any]:
        """Create a row as a CRM user would (``@odata.bind`` accepted; statecode writable)."""
        table = self._table(entity_set)
        with self.lock:
            return dict(self._insert(table, self._changes(table, values), trusted=True))

    def edit(self, entity_set: str, row_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """A CRM-user edit: sets columns directly, bumps the version, shows up in change tracking."""
        table = self._table(entity_set)
        with self.lock:
            old = self.tables[table.set].get(row_id.lower())
            if old is None:
                raise _not_found(table, row_id)
            return dict(self._modify(table, old, self._changes(table, changes), trusted=True))

    def delete(self, entity_set: str, row_id: str) -> None:
        """A CRM-user delete; change tracking reports it."""
        table = self._table(entity_set)
        with self.lock:
            if row_id.lower() not in self.tables[table.set]:
                raise _not_found(table, row_id)
            self._discard(table, row_id.lower())

    def age(self, seconds: float) -> int:
        """Time passes: every row's ``createdon`` and ``modifiedon`` move ``seconds`` into the past,
        as if everything had happened that much earlier (row versions and change tracking are
        untouched; so is the server's own clock, the ``Date`` of its answers). Returns the rows
        aged."""
        delta = timedelta(seconds=seconds)
        aged = 0
        with self.lock:
            for name in TABLES:
                for row in self.tables[name].values():
                    for column in ("createdon", "modifiedon"):
                        value = row.get(column)
                        if isinstance(value, str) and value:
                            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                            row[column] = _stamp(moment - delta)
                    aged += 1
        return aged

    def seed(self, opportunities: int = 0, accounts: int = 0, flagged: int = 0, seed: int = 0) -> dict[str, list[str]]:
        """Realistic rows: accounts with addresses and 1-2 contacts each; opportunities linked to an
        account and one of its contacts, in the account's currency; ``flagged`` of the new
        opportunities marked for co-sell (sync flag, how-can-Microsoft-help, a solution id)."""
        rng = random.Random(seed)
        out: dict[str, list[str]] = {"accounts": [], "contacts": [], "opportunities": []}
        with self.lock:
            existing = len(self.tables["accounts"])
            if opportunities and not existing and not accounts:
                accounts = min(len(COMPANIES), max(1, opportunities // 10))
            for i in range(existing, existing + accounts):
                account_id, contact_ids = self._seed_account(rng, i)
                out["accounts"].append(account_id)
                out["contacts"] += contact_ids
            pool = list(self.tables["accounts"].values())
            contacts_of: dict[str, list[str]] = {}
            for contact in self.tables["contacts"].values():
                parent = contact.get("_parentcustomerid_value")
                if parent:
                    contacts_of.setdefault(parent, []).append(contact["contactid"])
            start = len(self.tables["opportunities"])
            marked = set(rng.sample(range(opportunities), min(flagged, opportunities)))
            today = _now().date()
            for n in range(opportunities):
                account = rng.choice(pool)
                country = account.get("address1_country") or "US"
                changes: dict[str, Any] = {
                    "name": f"{account['name']} - {rng.choice(DEAL_NAMES)} #{start + n + 1}"[:300],
                    "estimatedvalue": float(rng.randrange(5_000, 2_000_000, 500)),
                    "_transactioncurrencyid_value": self._currency_id(CURRENCY.get(country, "USD")),
                    "estimatedclosedate": (today + timedelta(days=rng.randint(15, 240))).isoformat(),
                    "description": rng.choice(
                        ["", "Customer wants a proof of concept in Q3.", "Budget approved; décision en cours."]
                    )
                    or None,
                    "salesstage": rng.randint(0, 3),
                    "_parentaccountid_value": account["accountid"],
                    "_parentcontactid_value": rng.choice(contacts_of.get(account["accountid"], [None])),
                }
                if n in marked:
                    changes.update(
                        cosell_syncwithpartnercenter=True,
                        cosell_howcanmicrosofthelp=self.metadata.value_of(
                            "opportunity",
                            "cosell_howcanmicrosofthelp",
                            md.HELP_LABELS[HELP_CODES.index(rng.choice(HELP_CODES))],
                        ),
                        cosell_solutions=rng.choice(SOLUTIONS)[0],
                    )
                out["opportunities"].append(str(self._insert(OPPORTUNITIES, changes, trusted=True)["opportunityid"]))
        return out

    def _seed_account(self, rng: random.Random, index: int) -> tuple[str, list[str]]:
        company, country, postal, city, state, street = COMPANIES[index % len(COMPANIES)]
        round_ = index // len(COMPANIES)
        name = company if round_ == 0 else f"{company} ({round_ + 1})"
        account = self._insert(
            ACCOUNTS,
            {
                "name": name,
                "address1_line1": street,
                "address1_city": city,
                "address1_stateorprovince": state or None,
                "address1_postalcode": postal,
                "address1_country": country,
            },
            trusted=True,
        )
        domain = "".join(ch for ch in company.lower().split()[0] if ch.isascii() and ch.isalnum()) + ".example"
        contact_ids = []
        for n in range(rng.randint(1, 2)):
            p = person(rng, domain)
            local, _, host = p["email"].partition("@")
            contact = self._insert(
                CONTACTS,
                {
                    "firstname": p["firstName"],
                    "lastname": p["lastName"],
                    "emailaddress1": f"{local}{index + 1}{n}@{host}",  # unique: contacts are matched by email
                    "telephone1": p["phoneNumber"],
                    "_parentcustomerid_value": account["accountid"],
                },
                trusted=True,
            )
            contact_ids.append(str(contact["contactid"]))
        return str(account["accountid"]), contact_ids

    # -- control plane ----------------------------------------------------------------------------
    @staticmethod
    def _control_body(request: Request) -> dict[str, Any]:
        if not request.body.strip():
            return {}
        doc = request.json()
        if not isinstance(doc, dict):
            raise HTTPError(400, "0x80040203", "The body must be a JSON object.")
        return doc

    def _ctl_reset(self, request: Request) -> Response:
        self.reset()
        return Response.empty()

    def _ctl_seed(self, request: Request) -> Response:
        doc = self._control_body(request)
        try:
            ids = self.seed(
                opportunities=int(doc.get("opportunities", 0)),
                accounts=int(doc.get("accounts", 0)),
                flagged=int(doc.get("flagged", 0)),
                seed=int(doc.get("seed", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, "0x80040203", f"Invalid seed request: {exc}") from None
        return _json(ids)

    def _ctl_state(self, request: Request) -> Response:
        return _json(self.state())

    def _ctl_limits(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                return _json(self.configure_limits(**self._control_body(request)))
            except (TypeError, ValueError) as exc:
                raise HTTPError(400, "0x80040203", str(exc)) from None
        return _json(self.limits_state())

    def _ctl_config(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                return _json(self.configure(**self._control_body(request)))
            except (TypeError, ValueError) as exc:
                raise HTTPError(400, "0x80040203", str(exc)) from None
        return _json(asdict(self.config))

    def _ctl_rows(self, request: Request) -> Response:
        return _json({"value": self.rows(request.params["set"])})

    def _ctl_row(self, request: Request) -> Response:
        return _json(self.row(request.params["set"], request.params["id"]))

    def _ctl_edit(self, request: Request) -> Response:
        return _json(self.edit(request.params["set"], request.params["id"], self._control_body(request)))

    def _ctl_delete(self, request: Request) -> Response:
        self.delete(request.params["set"], request.params["id"])
        return Response.empty()
