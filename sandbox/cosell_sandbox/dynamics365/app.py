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
from :mod:`.metadata`; the option sets of :mod:`.choices` also validate choice-column writes and
label reads (``Prefer: odata.include-annotations``).

Errors are ``{"error": {"code": "0x...", "message": "..."}}`` with
``Content-Type: application/json; odata.metadata=minimal``; every API response carries
``REQ_ID`` and ``OData-Version: 4.0``.

Wiring: ``Dynamics365Emulator(entra)``, start it in an ``EmulatorServer``, then
``entra.register_resource(emulator.audience())``.

Control plane (no token, no faults), each also a Python method:

* the shared endpoints of :class:`~cosell_sandbox.server.EmulatorApp`: ``POST /_sandbox/reset``
  (:meth:`reset`), ``POST /_sandbox/seed`` (:meth:`seed`), ``GET /_sandbox/state`` (:meth:`state`),
  ``POST /_sandbox/age`` (:meth:`age`), ``/_sandbox/faults`` and ``/_sandbox/requests``;
* ``GET /_sandbox/tables/<set>`` (:meth:`rows`), ``GET /_sandbox/tables/<set>/<id>`` (:meth:`row`),
  ``POST /_sandbox/tables/<set>/<id>/edit`` (:meth:`edit`), ``DELETE /_sandbox/tables/<set>/<id>``
  (:meth:`delete`); :meth:`create` adds a row as a CRM user would;
* ``GET|POST /_sandbox/limits`` (:meth:`configure_limits`): the service protection limits and
  the delta token lifetime; ``GET|POST /_sandbox/config`` (:meth:`configure`).

This module wires the routes; the work is done by one module per concern: :mod:`.schema` (tables),
:mod:`.records` (errors, helpers, the row store), :mod:`.validation`, :mod:`.query` with the
:mod:`.odata` parser, :mod:`.writes`, :mod:`.batch`, :mod:`.limits`, :mod:`.metadata`,
:mod:`.seed` and :mod:`.control`.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..entra import EntraEmulator
from ..server import EmulatorApp, HTTPError, Request, Response, Router, new_request_id
from .batch import BatchMixin
from .control import ControlMixin
from .customizations import CustomizationMixin, Customizations
from .limits import ServiceProtection
from .metadata import Metadata
from .query import QueryMixin
from .records import DataverseConfig, StoreMixin, _err, _json, _seconds, _throttle, _wants_formatted_values
from .schema import API, TABLES, Table
from .seed import SeedMixin
from .validation import ValidationMixin
from .writes import WritesMixin


class Dynamics365Emulator(
    CustomizationMixin,
    ControlMixin,
    SeedMixin,
    BatchMixin,
    WritesMixin,
    QueryMixin,
    ValidationMixin,
    StoreMixin,
    EmulatorApp,
):
    name = "dynamics365"
    control_error_code = "0x80040203"

    def __init__(self, entra: EntraEmulator) -> None:
        self.entra = entra
        self.organization_id = str(uuid.uuid4())
        self.business_unit_id = str(uuid.uuid4())
        self.protection = ServiceProtection()
        self.config = DataverseConfig()
        self.custom = Customizations()
        self.metadata = Metadata(
            list(TABLES.values()),
            lambda: self.config.choice_value_base,
            self.audience,
            lambda: self.custom,
            self._key_status,
        )
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
            ("POST", api + r"/EntityDefinitions(?P<rest>\(.*)", self._create_definition),
            ("POST", api + r"/InsertOptionValue", self._insert_option_value),
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
