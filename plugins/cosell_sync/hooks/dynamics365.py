"""Hook for Dynamics 365 (the Dataverse Web API).

Connection (type ``dynamics365``)::

    host  = https://<org>.crm.dynamics.com
    login = <client id>        password = <client secret>
    extra = {"tenant_id": "...", "authority": "https://login.microsoftonline.com", "ca_bundle": "..."}

Authentication is msal client credentials with the scope ``<host>/.default``.
Reads page with ``Prefer: odata.maxpagesize`` and follow ``@odata.nextLink`` unchanged;
incremental reads go by ``modifiedon`` or by change tracking (delta links, deleted
rows). Writes: create, update with ``If-Match``, alternate-key upsert, ``$batch`` with
change sets and ``continue-on-error``, the ``*Multiple`` actions, and the
``WinOpportunity``/``LoseOpportunity`` actions. Every value put into ``$filter`` goes
through :func:`cosell_sync.hooks.odata.quote`.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook

from cosell_sync import crms
from cosell_sync.errors import ApiError, ConfigurationError, NotFoundError
from cosell_sync.hooks.batch import BatchRequest, BatchResponse, ChangeSet, build_batch, entity_id_from_url, parse_batch
from cosell_sync.hooks.entra import cached_token, fingerprint, settings_app
from cosell_sync.hooks.http import RestClient, RetryPolicy, TrustedSession, follow_link
from cosell_sync.hooks.odata import datetime_literal, quote, with_query
from cosell_sync.hooks.pool import map_on_threads, widen_pool
from cosell_sync.masking import mask

API_PATH = "/api/data/v9.2"
ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
MAX_PAGE_SIZE = 5000
MAX_CONCURRENT = 52  # service protection: concurrent requests per user
DEFAULT_PARALLELISM = 4  # requests at once until an answer's x-ms-dop-hint says how many suit the org
T = TypeVar("T")
R = TypeVar("R")
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
WON, LOST = 1, 2  # opportunity statecode
# For the tables the sync uses: entity set -> primary key column, and -> logical name (the metadata's key).
PRIMARY_KEYS = {
    "opportunities": "opportunityid",
    "accounts": "accountid",
    "contacts": "contactid",
    "transactioncurrencies": "transactioncurrencyid",
}
LOGICAL_NAMES = {"opportunities": "opportunity", "accounts": "account", "contacts": "contact"}
# The choice columns that are not picklists: their metadata type, for the cast that lists options.
CHOICE_CASTS = {"statecode": "StateAttributeMetadata", "statuscode": "StatusAttributeMetadata"}
_LOGICAL_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _option_labels(option: Mapping[str, Any]) -> list[str]:
    """Every label of an option: the calling user's language first, then each localized one (a
    mapping written in English still matches in an org whose users read German)."""
    label = option.get("Label") or {}
    user = (label.get("UserLocalizedLabel") or {}).get("Label")
    labels = [str(user)] if user else []
    labels += [str(item["Label"]) for item in label.get("LocalizedLabels") or [] if item.get("Label")]
    return list(dict.fromkeys(labels)) or [str(option.get("Value"))]


_currencies: dict[str, dict[str, str]] = {}
_currency_lock = threading.Lock()


def primary_key(entity_set: str) -> str:
    try:
        return PRIMARY_KEYS[entity_set]
    except KeyError:
        raise ValueError(f"unknown entity set {entity_set!r}; known: {sorted(PRIMARY_KEYS)}") from None


def keyed_create(request: BatchRequest) -> bool:
    """Is ``request`` a POST to a known entity set whose body holds the new row's primary key?"""
    if request.method.upper() != "POST" or not isinstance(request.body, Mapping):
        return False
    key = PRIMARY_KEYS.get(request.url.strip("/").partition("?")[0])
    return key is not None and bool(request.body.get(key))


@dataclass
class Changes:
    """One change-tracking read: changed or new rows, deleted ids, and where to continue."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    delta_link: str | None = None


@dataclass(frozen=True)
class UpsertResult:
    created: bool
    id: str
    etag: str | None


@dataclass(frozen=True)
class DynamicsSettings:
    conn_id: str
    url: str
    client_id: str
    client_secret: str
    tenant_id: str
    authority: str
    ca_bundle: str | None

    @property
    def scope(self) -> str:
        return f"{self.url}/.default"

    @property
    def api_url(self) -> str:
        return self.url + API_PATH

    @classmethod
    def from_connection(cls, conn: Any) -> DynamicsSettings:
        extra: dict[str, Any] = conn.extra_dejson or {}
        host = (conn.host or "").rstrip("/")
        if host and "://" not in host:
            host = "https://" + host
        settings = cls(
            conn_id=conn.conn_id,
            url=host,
            client_id=conn.login or "",
            client_secret=conn.password or "",
            tenant_id=extra.get("tenant_id") or "",
            authority=(extra.get("authority") or "https://login.microsoftonline.com").rstrip("/"),
            ca_bundle=extra.get("ca_bundle") or None,
        )
        if settings.client_secret:
            mask(settings.client_secret)
        where = f"Connection '{settings.conn_id}' (dynamics365)"
        if urlsplit(settings.url).scheme != "https" or not urlsplit(settings.url).hostname:
            raise ConfigurationError(f"{where}: host must be the environment URL, https://<org>.crm.dynamics.com.")
        if not settings.client_id or not settings.client_secret or not settings.tenant_id:
            raise ConfigurationError(f"{where}: set client id (login), client secret (password) and 'tenant_id'.")
        if settings.ca_bundle and not Path(settings.ca_bundle).is_file():
            raise ConfigurationError(f"{where}: ca_bundle '{settings.ca_bundle}' is not a readable file.")
        return settings


DEFAULT_CONN_ID = crms.get(crms.DYNAMICS365).conn_id  # "dynamics365_default"
DEPRECATED_CONN_ID = crms.get(crms.DYNAMICS365).deprecated_conn_ids[0]  # earlier versions' id: read, with a warning


def dynamics_connection(conn_id: str = DEFAULT_CONN_ID) -> Any:
    """The Airflow connection ``conn_id``. The default id falls back to the deprecated
    ``dynamics_default`` when only that one exists, with a DeprecationWarning and a log line
    saying how to rename it (:meth:`cosell_sync.crms.Crm.connection`); any other missing id
    raises Airflow's not-found error."""
    return crms.get(crms.DYNAMICS365).connection(conn_id)


class DynamicsHook(BaseHook):
    """Dataverse Web API access with client-credentials tokens, retries and typed errors."""

    conn_name_attr = "dynamics_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "dynamics365"
    hook_name = "Microsoft Dynamics 365 (Dataverse)"

    def __init__(
        self,
        dynamics_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.dynamics_conn_id = dynamics_conn_id
        self.retry_policy = retry_policy or RetryPolicy()
        self._sleep = sleep

    @cached_property
    def settings(self) -> DynamicsSettings:
        return DynamicsSettings.from_connection(dynamics_connection(self.dynamics_conn_id))

    @cached_property
    def session(self) -> requests.Session:
        session = widen_pool(TrustedSession(self.settings.ca_bundle))
        session.hooks["response"].append(self._observe_dop_hint)
        return session

    # -- parallel requests ---------------------------------------------------------------
    dop_hint: int | None = None  # the last x-ms-dop-hint Dataverse sent (None: none yet)

    def _observe_dop_hint(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        raw = response.headers.get("x-ms-dop-hint")
        if raw and raw.strip().isdigit() and int(raw) > 0:
            self.dop_hint = int(raw)

    @property
    def parallelism(self) -> int:
        """How many requests to send at once: Dataverse's recommended degree of parallelism
        (``x-ms-dop-hint``, read from its answers) or :data:`DEFAULT_PARALLELISM` before any
        answer carried one, never more than :data:`MAX_CONCURRENT` (the service protection limit
        on concurrent requests per user)."""
        return max(1, min(self.dop_hint or DEFAULT_PARALLELISM, MAX_CONCURRENT))

    def map_concurrently(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``work`` over ``items``, results in their order: the first alone (its answer tells
        the org's ``x-ms-dop-hint``), the rest on at most :attr:`parallelism` threads. The first
        exception out of ``work`` is raised here once every call sent has ended."""
        if not items:
            return []
        first = work(items[0])
        rest = list(items[1:])
        if not rest:
            return [first]
        return [first, *map_on_threads(work, rest, self.parallelism)]

    def get_token(self, *, force: bool = False) -> str:
        s = self.settings

        def acquire() -> dict[str, Any]:
            app = settings_app(s, self.session, self.retry_policy, self._sleep)  # retried like the API
            return app.acquire_token_for_client(scopes=[s.scope])

        key = (s.authority, s.tenant_id, s.client_id, "app", fingerprint(s.client_secret), s.scope)
        return cached_token(key, acquire, force)

    @cached_property
    def api(self) -> RestClient:
        return RestClient(
            "Dataverse",
            self.session,
            lambda force: self.get_token(force=force),
            policy=self.retry_policy,
            default_headers=ODATA_HEADERS,
            sleep=self._sleep,
        )

    def get_conn(self) -> RestClient:
        return self.api

    # -- addressing ----------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.settings.api_url}/{path}"

    @staticmethod
    def row(entity_set: str, row_id: str) -> str:
        """``opportunities(<guid>)``; refuses anything that is not a GUID (no path injection)."""
        if not GUID.fullmatch(row_id or ""):
            raise ValueError(f"{entity_set}: {row_id!r} is not a row id (GUID)")
        return f"{entity_set}({row_id.lower()})"

    @staticmethod
    def alternate_key(entity_set: str, **keys: str) -> str:
        """``opportunities(cosell_referralid='...')`` with every value quoted and escaped."""
        if not keys:
            raise ValueError("alternate_key needs at least one key column")
        inner = ",".join(f"{column}={urlquote(quote(value), safe=chr(39) + '=,')}" for column, value in keys.items())
        return f"{entity_set}({inner})"

    @staticmethod
    def bind(entity_set: str, row_id: str) -> str:
        """The value of a ``<lookup>@odata.bind`` property."""
        return "/" + DynamicsHook.row(entity_set, row_id)

    # -- reads ------------------------------------------------------------------------------
    def iter_pages(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        orderby: str | None = None,
        top: int | None = None,
        count: bool = False,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[list[dict[str, Any]]]:
        """Rows page by page: ``Prefer: odata.maxpagesize`` and the nextLink, sent back unchanged
        with the same ``Prefer`` on every page."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        params: dict[str, str] = {}
        if select:
            params["$select"] = ",".join(select)
        if filter:
            params["$filter"] = filter
        if orderby:
            params["$orderby"] = orderby
        if top is not None:
            params["$top"] = str(top)
        if count:
            params["$count"] = "true"
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        url: str | None = with_query(self._url(entity_set), params)
        while url:
            body = self.api.request("GET", url, headers=headers).json()
            yield list(body.get("value") or [])
            link = body.get("@odata.nextLink")
            url = follow_link(self.settings.url, link, "Dataverse") if link else None

    def query(self, entity_set: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for page in self.iter_pages(entity_set, **kwargs):
            yield from page

    def query_each(
        self, entity_set: str, filters: Sequence[str], *, select: Sequence[str] | None = None
    ) -> list[list[dict[str, Any]] | Exception]:
        """One query per filter (all its pages), sent concurrently (:meth:`map_concurrently`): each
        one's rows, or the exception its read raised, in order (the caller decides what it means)."""

        def read(flt: str) -> list[dict[str, Any]] | Exception:
            try:
                return list(self.query(entity_set, select=select, filter=flt))
            except Exception as exc:  # handed back: the caller raises it or fails its records
                return exc

        return self.map_concurrently(read, list(filters))

    def read_modified_since(
        self,
        entity_set: str,
        since: datetime | None,
        *,
        select: Sequence[str] | None = None,
        extra_filter: str | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows with ``modifiedon`` after ``since`` (and up to ``until``), oldest first."""
        clauses = []
        if since is not None:
            clauses.append(f"modifiedon gt {datetime_literal(since)}")
        if until is not None:
            clauses.append(f"modifiedon le {datetime_literal(until)}")
        if extra_filter:
            clauses.append(f"({extra_filter})")
        key = primary_key(entity_set)
        yield from self.query(
            entity_set,
            select=[*select, "modifiedon"] if select and "modifiedon" not in select else select,
            filter=" and ".join(clauses) or None,
            orderby=f"modifiedon asc,{key} asc",
        )

    def track_changes(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        delta_link: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Changes:
        """Change tracking: without ``delta_link``, the initial load plus a delta link; with it,
        the rows changed since and the ids deleted since, plus the next delta link."""
        headers = {"Prefer": f"odata.track-changes,odata.maxpagesize={page_size}"}
        if delta_link:
            url: str | None = follow_link(self.settings.url, delta_link, "Dataverse")
        else:
            url = with_query(self._url(entity_set), {"$select": ",".join(select)} if select else {})
        changes = Changes()
        while url:
            body = self.api.request("GET", url, headers=headers).json()
            for item in body.get("value") or []:
                if str(item.get("@odata.context", "")).endswith("$deletedEntity") or item.get("reason") == "deleted":
                    changes.deleted.append(str(item["id"]))
                else:
                    changes.rows.append(item)
            link = body.get("@odata.nextLink")
            url = follow_link(self.settings.url, link, "Dataverse") if link else None
            if not link:
                changes.delta_link = body.get("@odata.deltaLink")
        if not changes.delta_link:
            raise ApiError("Dataverse", f"change tracking on {entity_set} returned no delta link; is it enabled?")
        return changes

    def get(self, entity_set: str, row_id: str, *, select: Sequence[str] | None = None) -> dict[str, Any]:
        params = {"$select": ",".join(select)} if select else {}
        return dict(self.api.request("GET", with_query(self._url(self.row(entity_set, row_id)), params)).json())

    # -- writes -----------------------------------------------------------------------------
    def create(
        self, entity_set: str, data: Mapping[str, Any], *, return_representation: bool = False
    ) -> str | dict[str, Any]:
        """``POST``: the new row's id (204 + ``OData-EntityId``), or the row itself (201) with
        ``return_representation``. The primary key is generated here unless given, so that a
        retry after a lost answer finds the row instead of creating a second one."""
        key = primary_key(entity_set)
        body = dict(data)
        row_id = str(body.setdefault(key, str(uuid.uuid4())))
        headers = {"Prefer": "return=representation"} if return_representation else {}

        def landed() -> requests.Response | None:
            try:
                return self.api.request("GET", self._url(self.row(entity_set, row_id)))
            except NotFoundError:
                return None

        resp = self.api.request(
            "POST", self._url(entity_set), json=body, headers=headers, idempotent=False, before_retry=landed
        )
        if return_representation:
            return dict(resp.json()) if resp.content else self.get(entity_set, row_id)
        return entity_id_from_url(resp.headers.get("OData-EntityId")) or row_id

    def update(
        self,
        entity_set: str,
        row_id: str,
        data: Mapping[str, Any],
        *,
        etag: str = "*",
        return_representation: bool = False,
    ) -> dict[str, Any] | None:
        """``PATCH`` an existing row: ``If-Match`` is its ETag (412 when it changed since it was
        read) or ``*`` (update only: 404 instead of creating)."""
        headers = {"If-Match": etag}
        if return_representation:
            headers["Prefer"] = "return=representation"
        resp = self.api.request("PATCH", self._url(self.row(entity_set, row_id)), json=dict(data), headers=headers)
        return dict(resp.json()) if return_representation and resp.content else None

    def upsert(self, entity_set: str, key: Mapping[str, str], data: Mapping[str, Any]) -> UpsertResult:
        """Upsert through an alternate key (``PATCH /set(key='v')`` with neither If-Match nor
        If-None-Match). The key columns must not be in the body."""
        clash = set(key) & set(data)
        if clash:
            raise ValueError(f"{entity_set}: alternate key column(s) {sorted(clash)} must not be in the body")
        pk = primary_key(entity_set)
        url = with_query(self._url(self.alternate_key(entity_set, **key)), {"$select": pk})
        resp = self.api.request("PATCH", url, json=dict(data), headers={"Prefer": "return=representation"})
        row = dict(resp.json()) if resp.content else {}
        row_id = row.get(pk) or entity_id_from_url(resp.headers.get("OData-EntityId"))
        return UpsertResult(created=resp.status_code == 201, id=str(row_id), etag=row.get("@odata.etag"))

    def delete(self, entity_set: str, row_id: str) -> None:
        self.api.request("DELETE", self._url(self.row(entity_set, row_id)))

    def batch(
        self,
        items: Sequence[BatchRequest | ChangeSet],
        *,
        continue_on_error: bool = True,
    ) -> list[BatchResponse]:
        """One ``$batch`` call (at most 1,000 requests); returns one response per request.

        With ``continue_on_error`` every request is attempted and a failed one is reported
        in its own response; without it, Dataverse stops at the first failure. A change set
        is atomic and answers with a single error when any of its requests fails.
        """
        content_type, body = build_batch(items, API_PATH)
        headers = {"Content-Type": content_type}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        # A create that names its row's primary key is safe to send again: a copy of one that
        # landed (its answer lost) is refused as DuplicateRecord instead of making a second row.
        idempotent = all(
            r.method.upper() in ("GET", "PATCH", "PUT", "DELETE") or keyed_create(r)
            for item in items
            for r in (item.requests if isinstance(item, ChangeSet) else [item])
        )
        resp = self.api.request(
            "POST",
            self._url("$batch"),
            data=body,
            headers=headers,
            idempotent=idempotent,
            # Without continue-on-error, a failing request makes the whole answer a 400 that
            # still carries the parts processed so far, the last one being the error.
            accept=lambda r: r.status_code == 400 and r.headers.get("Content-Type", "").startswith("multipart/"),
        )
        return parse_batch(resp.headers.get("Content-Type", ""), resp.content)

    def _multiple(
        self, entity_set: str, action: str, logical_name: str, targets: Sequence[Mapping[str, Any]]
    ) -> requests.Response:
        if not targets:
            raise ValueError(f"{action} needs at least one target")
        typed = [{**t, "@odata.type": f"Microsoft.Dynamics.CRM.{logical_name}"} for t in targets]
        return self.api.request(
            "POST",
            self._url(f"{entity_set}/Microsoft.Dynamics.CRM.{action}"),
            json={"Targets": typed},
            idempotent=action != "CreateMultiple",
        )

    def create_multiple(self, entity_set: str, logical_name: str, targets: Sequence[Mapping[str, Any]]) -> list[str]:
        """``CreateMultiple``: all rows or none (standard tables roll back on any error)."""
        return [str(i) for i in self._multiple(entity_set, "CreateMultiple", logical_name, targets).json()["Ids"]]

    def update_multiple(self, entity_set: str, logical_name: str, targets: Sequence[Mapping[str, Any]]) -> None:
        self._multiple(entity_set, "UpdateMultiple", logical_name, targets)

    def upsert_multiple(
        self,
        entity_set: str,
        logical_name: str,
        targets: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
    ) -> None:
        """``UpsertMultiple`` (all or nothing). A target names its row by primary key, or, with
        ``key``, by that alternate key column, sent as ``@odata.id`` as Dataverse requires."""
        if key is not None:
            if any(not t.get(key) for t in targets):
                raise ValueError(f"upsert_multiple: every target needs {key}")
            targets = [{**t, "@odata.id": self.alternate_key(entity_set, **{key: str(t[key])})} for t in targets]
        self._multiple(entity_set, "UpsertMultiple", logical_name, targets)

    def _close_opportunity(self, action: str, opportunity_id: str, status: int, close: Mapping[str, Any]) -> None:
        body = {
            "OpportunityClose": {"opportunityid@odata.bind": self.bind("opportunities", opportunity_id), **close},
            "Status": status,
        }
        target_state = WON if action == "WinOpportunity" else LOST

        def landed() -> requests.Response | None:
            resp = self.api.request("GET", self._url(self.row("opportunities", opportunity_id)) + "?$select=statecode")
            return resp if resp.json().get("statecode") == target_state else None

        self.api.request("POST", self._url(action), json=body, idempotent=False, before_retry=landed)

    def win_opportunity(self, opportunity_id: str, subject: str, *, status: int = 3, **close: Any) -> None:
        """Close as won through the ``WinOpportunity`` action (``statecode`` cannot be patched)."""
        self._close_opportunity("WinOpportunity", opportunity_id, status, {"subject": subject, **close})

    def lose_opportunity(self, opportunity_id: str, subject: str, *, status: int = 4, **close: Any) -> None:
        """Close as lost (4 Canceled, 5 Out-Sold) through the ``LoseOpportunity`` action."""
        self._close_opportunity("LoseOpportunity", opportunity_id, status, {"subject": subject, **close})

    # -- lookups ----------------------------------------------------------------------------
    def currency_id(self, iso_code: str) -> str:
        """The ``transactioncurrencyid`` for an ISO 4217 code; the table is read once per process."""
        cache_key = self.settings.url
        with _currency_lock:
            table = _currencies.get(cache_key)
        if table is None:
            rows = self.query("transactioncurrencies", select=["transactioncurrencyid", "isocurrencycode"])
            table = {str(r["isocurrencycode"]).upper(): str(r["transactioncurrencyid"]) for r in rows}
            with _currency_lock:
                _currencies[cache_key] = table
        try:
            return table[iso_code.strip().upper()]
        except KeyError:
            raise LookupError(
                f"Dataverse has no transactioncurrency with isocurrencycode {iso_code!r} "
                f"(known: {', '.join(sorted(table)) or 'none'})"
            ) from None

    def choice_options(self, entity_set: str, columns: Sequence[str]) -> dict[str, dict[str, int]]:
        """Each choice column's options, label -> value (every label of an option: the user's and
        each localized one), read from the table's metadata: one call for its
        ``PicklistAttributeMetadata`` columns and one per state/status column asked for. A column
        that is not a choice column of the table (a text column an enum maps to) is left out."""
        logical = LOGICAL_NAMES.get(entity_set)
        if logical is None:
            raise ConfigurationError(f"unknown entity set {entity_set!r}; known: {sorted(LOGICAL_NAMES)}")
        for column in columns:
            if not _LOGICAL_NAME.fullmatch(column):
                raise ConfigurationError(f"{column!r} is not a Dataverse column name")
        table = f"EntityDefinitions(LogicalName={quote(logical)})/Attributes"
        expand = {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}
        wanted = set(columns)
        found: dict[str, dict[str, int]] = {}
        paths = []
        if wanted - set(CHOICE_CASTS):
            paths.append(f"{table}/Microsoft.Dynamics.CRM.PicklistAttributeMetadata")
        paths += [
            f"{table}(LogicalName={quote(c)})/Microsoft.Dynamics.CRM.{CHOICE_CASTS[c]}"
            for c in sorted(wanted & set(CHOICE_CASTS))
        ]
        for path in paths:
            body = self.api.request("GET", with_query(self._url(path), expand)).json()
            for attribute in body.get("value", [body]):
                name = str(attribute.get("LogicalName"))
                if name in wanted:
                    options = (attribute.get("OptionSet") or {}).get("Options") or []
                    found[name] = {label: int(o["Value"]) for o in options for label in _option_labels(o)}
        return found  # a column asked for that is no choice column (text): its values are used as they are

    def whoami(self) -> dict[str, Any]:
        return dict(self.api.request("GET", self._url("WhoAmI")).json())

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's Test button: a client-credentials token, then ``WhoAmI``."""
        try:
            me = self.whoami()
        except Exception as exc:
            return False, str(exc)  # typed errors carry the cause (e.g. AADSTS7000215), never a credential
        return True, (
            f"Connected: token acquired; WhoAmI answered as application user {me.get('UserId')} "
            f"(organization {me.get('OrganizationId')})."
        )
