"""Partner Center emulator: the Referrals API, the webhook registration API, signed
webhook deliveries and a control plane.

Real hosts and paths it stands in for:

* Referrals ``https://api.partner.microsoft.com/v1.0/engagements/referrals``
  (token audience ``https://api.partner.microsoft.com``);
* Webhooks ``https://api.partnercenter.microsoft.com/webhooks/v1``
  (token audience ``https://api.partnercenter.microsoft.com``).

Both are served from one sandbox origin. List pages return ``@odata.nextLink`` in the
documented odd shape: ``http://<host>/v1.0/referrals?$skiptoken=...`` (an ``http``
scheme and no ``/engagements``), which this emulator also serves over HTTPS.

Engagements: every referral has an ``engagementId``; a POST with the id of an existing engagement
joins it, and a POST targeting ``BusinessProfileLocation``/``msft`` there creates Microsoft's own
referral (organizationId ``msft``). ``GET /_sandbox/engagements/{id}`` shows an engagement and
``POST /_sandbox/engagements/{id}/microsoft`` plays Microsoft (accept, decline, win, lose, update);
the partner's referrals in the engagement then get ``related-referral-*`` events.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from .entra import EntraEmulator
from .odata import FilterOptions, ODataError, compile_filter, parse_orderby, resolve_path
from .seed import iso, make_referral
from .server import EmulatorApp, HTTPError, Request, Response, Router, new_request_id
from .webhooks import Delivery, DispatchConfig, WebhookDispatcher

REFERRALS_AUDIENCE = "https://api.partner.microsoft.com"
WEBHOOKS_AUDIENCE = "https://api.partnercenter.microsoft.com"
REFERRALS_PATH = "/v1.0/engagements/referrals"
NEXTLINK_PATH = "/v1.0/referrals"
WEBHOOKS_PATH = "/webhooks/v1"
CERT_PATH = "/cert/pcnotifications-dispatch.microsoft.com.cer"
MAX_TOP = 100

STATUS = {"None", "New", "Active", "Closed"}
SUBSTATUS = {"None", "Pending", "Received", "Accepted", "Won", "Lost", "Declined", "Expired"}
SUBSTATUS_FOR = {
    "New": {"Pending", "Received"},
    "Active": {"Accepted"},
    "Closed": {"Won", "Lost", "Declined", "Expired"},
}
TRANSITIONS = {"New": {"New", "Active", "Closed"}, "Active": {"Active", "Closed"}, "Closed": set()}
# "No actions are permitted after any deal reaches a terminal state, such as Declined, Expired, Won,
# or Lost." (Microsoft Learn, "Bulk operations for Co-sell opportunities",
# https://learn.microsoft.com/partner-center/bulk-operations). Closed has exactly these substatuses.
TERMINAL_SUBSTATUS = frozenset(SUBSTATUS_FOR["Closed"])
# Co-sell with Microsoft: the second referral of an engagement targets Microsoft's business profile
# location "msft" (Microsoft Learn, "Create a referral", section "Create a shared referral":
# https://learn.microsoft.com/partner-center/developer/create-a-referral). Microsoft's organization id
# in the docs' examples is "msft" (inviteContext.invitedBy.organizationId).
MICROSOFT_ORG_ID = "msft"
# What a Microsoft seller can do to a referral (control plane): the status each action sets.
MICROSOFT_ACTIONS: dict[str, dict[str, str]] = {
    "accept": {"status": "Active", "substatus": "Accepted"},
    "decline": {"status": "Closed", "substatus": "Declined"},
    "win": {"status": "Closed", "substatus": "Won"},
    "lose": {"status": "Closed", "substatus": "Lost"},
    "update": {},
}
MICROSOFT_ORG_NAME = "Microsoft"
PARTNER_ORG_NAME = "Sandbox Partner Ltd"
ENUMS: dict[str, set[str]] = {
    "status": STATUS,
    "substatus": SUBSTATUS,
    "type": {"Independent", "Shared"},
    "qualification": {"None", "Direct", "MarketingQualified", "SalesQualified"},
    "direction": {"Incoming", "Outgoing"},
    "salesStage": {"Qualify", "Develop", "Propose", "Close"},
    "inviteContext.assistanceRequestCode": {
        "Unknown",
        "GeneralOrOther",
        "CustomerTechnicalArchitecture",
        "ProofOfConceptOrDemo",
        "QuotesOrLicensing",
        "PostSalesCustomerSuccess",
        "WorkloadSpecificValueProposition",
    },
}
READ_ONLY = {
    "id",
    "engagementId",
    "organizationId",
    "organizationName",
    "createdDateTime",
    "updatedDateTime",
    "eTag",
    "links",
    "acceptedDateTime",
    "closedDateTime",
    "expirationDateTime",
}
FILTER_PATHS = frozenset(
    {
        "id",
        "engagementId",
        "name",
        "externalReferenceId",
        "status",
        "substatus",
        "statusReason",
        "type",
        "qualification",
        "direction",
        "salesStage",
        "createdDateTime",
        "updatedDateTime",
        "expirationDateTime",
        "acceptedDateTime",
        "closedDateTime",
        "organizationId",
        "customerProfile/name",
        "customerProfile/address/country",
        "customerProfile/address/postalCode",
        "customerProfile/address/city",
        "customerProfile/address/state",
        "details/currency",
        "details/dealValue",
        "details/closingDateTime",
    }
)
ORDERBY_PATHS = frozenset({"createdDateTime", "updatedDateTime"})
SELECTABLE = frozenset(
    {
        "id",
        "engagementId",
        "organizationId",
        "organizationName",
        "name",
        "externalReferenceId",
        "createdDateTime",
        "updatedDateTime",
        "expirationDateTime",
        "acceptedDateTime",
        "closedDateTime",
        "status",
        "substatus",
        "statusReason",
        "type",
        "qualification",
        "direction",
        "salesStage",
        "customerProfile",
        "consent",
        "details",
        "team",
        "inviteContext",
        "target",
        "eTag",
        "links",
        "registrationStatus",
        "tags",
        "lastModifiedVia",
        "trackingInfo",
    }
)
WEBHOOK_EVENTS = [
    "test-created",
    "subscription-updated",
    "threshold-exceeded",
    "usagerecords-updated",
    "customer-created",
    "invoice-ready",
    "azure-role-assignment-changed",
    "referral-created",
    "referral-updated",
    "related-referral-created",
    "related-referral-updated",
    "dailyusage-updated",
]
VALIDATION_EVENTS_PER_MINUTE = 2
INCOMING_EXPIRY_DAYS = 14  # incoming referrals with no response expire after 14 days


def _now() -> str:
    return iso(datetime.now(UTC))


def _etag() -> str:
    return f'"{uuid.uuid4()}"'


def _bad(message: str) -> HTTPError:
    return HTTPError(400, "invalidRequest", message)


def _microsoft_action(doc: dict[str, Any]) -> str:
    """The control-plane action a Microsoft seller takes (one of :data:`MICROSOFT_ACTIONS`)."""
    action = doc.get("action", "update")
    if action not in MICROSOFT_ACTIONS:
        raise _bad(f"action must be one of {sorted(MICROSOFT_ACTIONS)}.")
    return str(action)


def _field(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def strip_annotations(doc: dict[str, Any]) -> dict[str, Any]:
    """OData instance annotations (``@odata.context`` ...) in a request body are ignored."""
    return {k: v for k, v in doc.items() if not k.startswith("@")}


def validate_referral(doc: Any, *, creating: bool) -> None:
    """The validation Partner Center applies to a referral body; raises 400 naming the field."""
    if not isinstance(doc, dict):
        raise _bad("The referral must be a JSON object.")
    for dotted, allowed in ENUMS.items():
        value = _field(doc, dotted)
        if value is not None and value not in allowed:
            raise _bad(f"The value '{value}' is not valid for '{dotted}'. Allowed values: {sorted(allowed)}.")
    for obj_field in ("customerProfile", "details", "consent", "inviteContext", "customerProfile.address"):
        value = _field(doc, obj_field)
        if value is not None and not isinstance(value, dict):
            raise _bad(f"The field '{obj_field}' must be an object.")
    for list_field in (
        "team",
        "target",
        "tags",
        "customerProfile.team",
        "customerProfile.ids",
        "details.requirements.solutions",
    ):
        value = _field(doc, list_field)
        if value is not None and not isinstance(value, list):
            raise _bad(f"The field '{list_field}' must be an array.")
    for i, target in enumerate(doc.get("target") or []):
        if not isinstance(target, dict) or target.get("type") not in ("BusinessProfileLocation", "SolutionProfile"):
            raise _bad(f"The field 'target[{i}].type' must be BusinessProfileLocation or SolutionProfile.")
    deal = _field(doc, "details.dealValue")
    if deal is not None and (isinstance(deal, bool) or not isinstance(deal, int | float) or deal < 0):
        raise _bad("The field 'details.dealValue' must be a non-negative number.")
    currency = _field(doc, "details.currency")
    if currency is not None and not (isinstance(currency, str) and re.fullmatch(r"[A-Z]{3}", currency)):
        raise _bad("The field 'details.currency' must be an ISO 4217 currency code.")
    country = _field(doc, "customerProfile.address.country")
    if country is not None and not (isinstance(country, str) and re.fullmatch(r"[A-Z]{2}", country)):
        raise _bad("The field 'customerProfile.address.country' must be an ISO 3166 alpha-2 country code.")
    for name in ("name", "externalReferenceId", "details.notes", "customerProfile.name"):
        value = _field(doc, name)
        if value is not None and not isinstance(value, str):
            raise _bad(f"The field '{name}' must be a string.")
    if creating:
        for required in (
            "name",
            "customerProfile.name",
            "customerProfile.address.country",
            "details.dealValue",
            "details.currency",
            "status",
            "substatus",
        ):
            if _field(doc, required) in (None, ""):
                raise _bad(f"The field '{required}' is required.")
    status, substatus = doc.get("status"), doc.get("substatus")
    if status in SUBSTATUS_FOR and substatus not in SUBSTATUS_FOR[status]:
        raise _bad(
            f"The substatus '{substatus}' is not valid for status '{status}'. Allowed: {sorted(SUBSTATUS_FOR[status])}."
        )


def is_terminal(doc: dict[str, Any]) -> bool:
    """Closed (Won, Lost, Declined or Expired): see TERMINAL_SUBSTATUS for the source."""
    return doc.get("status") == "Closed" or doc.get("substatus") in TERMINAL_SUBSTATUS


def check_not_terminal(doc: dict[str, Any]) -> None:
    """Nothing may change a referral in a terminal state. The docs give no dedicated code; a request the
    service cannot process because it is incorrect is 400 Bad Request ("Referrals API Response Codes",
    https://learn.microsoft.com/partner-center/developer/referrals-api-response-codes), body code
    invalidRequest as for every other rejected change."""
    if is_terminal(doc):
        raise HTTPError(
            400,
            "invalidRequest",
            f"No actions are permitted after the referral reaches a terminal state "
            f"({doc.get('status')}/{doc.get('substatus')}).",
            target="status",
        )


def check_transition(old: dict[str, Any], new: dict[str, Any]) -> None:
    check_not_terminal(old)
    current = old.get("status")
    target = new.get("status")
    if current in TRANSITIONS and target not in TRANSITIONS[current]:
        raise HTTPError(400, "invalidRequest", f"The status transition from '{current}' to '{target}' is not allowed.")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise _bad(f"The JSON Patch path '{path}' must start with '/'.")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch(doc: dict[str, Any], ops: Any) -> dict[str, Any]:
    """RFC 6902 ``replace`` and ``add`` (the two operations Partner Center supports)."""
    if not isinstance(ops, list) or not ops:
        raise _bad("The request body must be a non-empty JSON Patch array.")
    result = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or "path" not in op or "op" not in op:
            raise _bad(f"JSON Patch operation {i} must have 'op' and 'path'.")
        kind = op["op"]
        # "The API currently only supports the replace and add operations." (Microsoft Learn, "Update a
        # lead or opportunity", https://learn.microsoft.com/partner-center/developer/patch-a-referral)
        if kind not in ("replace", "add"):
            raise HTTPError(
                400,
                "invalidRequest",
                f"JSON Patch operation '{kind}' is not supported; only 'replace' and 'add' are.",
                target=f"[{i}].op",
            )
        if "value" not in op:
            raise _bad(f"JSON Patch operation {i} needs a 'value'.")
        parts = _pointer(str(op["path"]))
        if parts[0] in READ_ONLY or parts == [""]:
            raise _bad(f"The field '{parts[0]}' is read-only.")
        parent: Any = result
        for depth, part in enumerate(parts[:-1]):
            if isinstance(parent, dict) and isinstance(parent.get(part), dict | list):
                parent = parent[part]  # RFC 6902: the target's parent must already exist
            elif isinstance(parent, list) and part.isdigit() and int(part) < len(parent):
                parent = parent[int(part)]
            else:
                raise _bad(f"The path '/{'/'.join(parts[: depth + 1])}' does not exist.")
        last = parts[-1]
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-" and kind == "add":
                parent.append(value)
            elif last.isdigit() and int(last) <= len(parent) and kind == "add":
                parent.insert(int(last), value)
            elif last.isdigit() and int(last) < len(parent):
                parent[int(last)] = value
            else:
                raise _bad(f"The array index in '{op['path']}' is out of range.")
        elif isinstance(parent, dict):
            if kind == "replace" and last not in parent:
                raise _bad(f"The path '{op['path']}' does not exist.")
            parent[last] = value
        else:
            raise _bad(f"The path '{op['path']}' does not point into an object or array.")
    return result


class ReferralStore(dict[str, dict[str, Any]]):
    """The referrals by id, in creation order. It counts its writes (``version``: a listing's
    sorted matches are reused across its pages while nothing changed) and indexes engagements
    (every referral of an engagement without scanning them all, as the service's own store
    would). Writes go through item assignment; a change made to a stored document in place
    must call :meth:`touch`."""

    # Top-level properties indexed by their case-folded text value: engagements, and the
    # externalReferenceId lookups a sync makes before it creates.
    INDEXED = ("engagementId", "externalReferenceId")

    def __init__(self) -> None:
        super().__init__()
        self.version = 0
        self._index: dict[str, dict[Any, dict[str, None]]] = {path: {} for path in self.INDEXED}

    @staticmethod
    def _key(value: Any) -> Any:
        return value.casefold() if isinstance(value, str) else value

    def _unindex(self, key: str, doc: dict[str, Any]) -> None:
        for path, index in self._index.items():
            group = index.get(self._key(doc.get(path)))
            if group is not None:
                group.pop(key, None)

    def __setitem__(self, key: str, doc: dict[str, Any]) -> None:
        old = self.get(key)
        if old is not None:
            self._unindex(key, old)
        super().__setitem__(key, doc)
        for path, index in self._index.items():
            index.setdefault(self._key(doc.get(path)), {})[key] = None
        self.version += 1

    def __delitem__(self, key: str) -> None:
        self._unindex(key, self[key])
        super().__delitem__(key)
        self.version += 1

    def clear(self) -> None:
        super().clear()
        for index in self._index.values():
            index.clear()
        self.version += 1

    def candidates(self, predicate: Any) -> Any:
        """The referrals a filter can match: through an index for ``p eq 'a' or p eq 'b' ...``
        on an indexed property (a superset, in no particular order: the filter still decides,
        and a listing sorts by a unique key last), else all of them."""
        path, values = getattr(predicate, "any_of", (None, None))
        if path not in self._index:
            return self.values()
        index = self._index[path]
        return [self[key] for key in {key for value in values for key in index.get(value.casefold(), ())}]

    def touch(self) -> None:
        self.version += 1

    def engagement(self, engagement_id: Any) -> list[dict[str, Any]]:
        """The engagement's referrals, in creation order."""
        group = self._index["engagementId"].get(self._key(engagement_id), ())
        return [doc for key in group if (doc := self[key]).get("engagementId") == engagement_id]


class PartnerCenterEmulator(EmulatorApp):
    name = "partner_center"

    def __init__(self, entra: EntraEmulator, dispatcher: WebhookDispatcher, organization_id: str | None = None) -> None:
        self.entra = entra
        self.dispatcher = dispatcher
        self.organization_id = organization_id or str(uuid.uuid4())
        self.referrals = ReferralStore()
        # A listing's matches, sorted, while the store is unchanged: (filter, orderby, version),
        # the matches, and where each page served ended (its last key, as JSON) in them.
        self._listing: tuple[tuple[str, str, int], list[dict[str, Any]], dict[str, int]] | None = None
        self.registration: dict[str, Any] | None = None
        self.validation_events: dict[str, dict[str, Any]] = {}
        self._validation_times: deque[float] = deque()
        self.nextlink_style = "documented"
        self.events_fired: list[dict[str, Any]] = []
        super().__init__()
        entra.register_resource(REFERRALS_AUDIENCE)
        entra.register_resource(WEBHOOKS_AUDIENCE)

    # -- routing -----------------------------------------------------------------
    def routes(self, router: Router) -> None:
        ref = re.escape(REFERRALS_PATH)
        rid = r"/(?P<id>[^/]+)"
        router.add("GET", ref, self._list)
        router.add("GET", re.escape(NEXTLINK_PATH), self._list)
        router.add("POST", ref, self._create)
        router.add("GET", ref + rid, self._get)
        router.add("PUT", ref + rid, self._replace)
        router.add("PATCH", ref + rid, self._patch)
        hooks = re.escape(WEBHOOKS_PATH)
        router.add("GET", hooks + "/registration", self._get_registration)
        router.add("POST", hooks + "/registration", self._create_registration)
        router.add("PUT", hooks + "/registration", self._update_registration)
        router.add("GET", hooks + "/registration/events", self._events)
        router.add("POST", hooks + "/registration/validationEvents", self._create_validation)
        router.add("GET", hooks + r"/registration/validationEvents/(?P<cid>[^/]+)", self._get_validation)
        router.add("GET", re.escape(CERT_PATH), self._cert)
        # control plane
        router.add("POST", r"/_sandbox/reset", self._reset)
        router.add("POST", r"/_sandbox/seed", self._seed)
        router.add("GET", r"/_sandbox/state", self._state)
        router.add("POST", r"/_sandbox/config", self._config)
        router.add("GET", r"/_sandbox/referrals", self._raw_list)
        router.add("POST", r"/_sandbox/referrals", self._microsoft_create)
        router.add("GET", r"/_sandbox/referrals/(?P<id>[^/]+)", self._raw_get)
        router.add("POST", r"/_sandbox/referrals/(?P<id>[^/]+)/microsoft-edit", self._microsoft_edit)
        router.add("GET", r"/_sandbox/engagements/(?P<eid>[^/]+)", self._raw_engagement)
        router.add("POST", r"/_sandbox/engagements/(?P<eid>[^/]+)/microsoft", self._microsoft_engagement_action)
        router.add("GET", r"/_sandbox/webhooks/deliveries", self._deliveries)
        router.add("POST", r"/_sandbox/webhooks/config", self._dispatch_config)
        router.add("POST", r"/_sandbox/webhooks/redeliver", self._redeliver)

    def decorate(self, request: Request, response: Response) -> None:
        response.headers.set("request-id", new_request_id())
        if request.headers.get("client-request-id"):
            response.headers.set("client-request-id", request.headers.get("client-request-id") or "")

    def error_response(self, err: HTTPError, request: Request) -> Response:
        body: dict[str, Any] = {"error": {"code": err.code, "message": err.message}}
        if err.extra.get("target"):
            body["error"]["target"] = err.extra["target"]
        return Response.json(body, err.status, err.headers)

    def _auth(self, request: Request, audience: str) -> None:
        self.entra.validate_bearer(request.headers.get("Authorization"), audience)

    # -- referrals ---------------------------------------------------------------
    def _public(self, doc: dict[str, Any], origin: str) -> dict[str, Any]:
        out = copy.deepcopy(doc)
        out["links"] = {
            "self": {"uri": f"{origin}{REFERRALS_PATH}/{doc['id']}", "method": "GET", "headers": []},
            "relatedReferrals": {
                "uri": f"{origin}{REFERRALS_PATH}?$filter=engagementId eq '{doc['engagementId']}'",
                "method": "GET",
                "headers": [],
            },
        }
        return out

    def _single(self, doc: dict[str, Any], request: Request, status: int = 200) -> Response:
        headers = {"ETag": doc["eTag"]}
        if status == 201:
            headers["Location"] = f"{request.origin}{REFERRALS_PATH}/{doc['id']}"
        body = {"@odata.context": f"{request.origin}/v1.0/engagements/referrals/$metadata#Referrals/$entity"}
        body.update(self._public(doc, request.origin))
        return Response.json(body, status, headers)

    def _lookup(self, referral_id: str) -> dict[str, Any]:
        doc = self.referrals.get(referral_id)
        if doc is None:
            raise HTTPError(404, "itemNotFound", f"Referral '{referral_id}' was not found.")
        return doc

    def _list(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        token = request.arg("$skiptoken") or request.arg("$skipToken")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
                expr, order_expr, top, last = state["f"], state["o"], int(state["t"]), state["k"]
                select = state.get("s") or []
            except (ValueError, KeyError, TypeError):
                raise _bad("The $skiptoken is invalid.") from None
        else:
            expr = request.arg("$filter") or ""
            order_expr = request.arg("$orderby") or "createdDateTime desc"
            top_arg = request.arg("$top") or str(MAX_TOP)
            if not top_arg.isdigit() or not 1 <= int(top_arg) <= MAX_TOP:
                raise _bad(f"The value of $top must be an integer between 1 and {MAX_TOP}.")
            top, last = int(top_arg), None
            select = [f.strip() for f in (request.arg("$select") or "").split(",") if f.strip()]
            unknown = [f for f in select if f not in SELECTABLE]
            if unknown:
                raise _bad(f"Could not find a property named '{unknown[0]}' for $select.")
        try:
            predicate = compile_filter(expr, FilterOptions(allowed_paths=FILTER_PATHS)) if expr else None
            order = parse_orderby(order_expr, ORDERBY_PATHS)
        except ODataError as exc:
            raise _bad(str(exc)) from None
        order = [*order, ("id", order[-1][1] if order else False)]

        def key(doc: dict[str, Any]) -> list[Any]:
            return [resolve_path(doc, path) or "" for path, _ in order]

        def after(item_key: list[Any]) -> bool:
            for (_, desc), a, b in zip(order, item_key, last, strict=True):
                if a != b:
                    return a < b if desc else a > b
            return False

        with self.lock:
            cache_key = (expr, order_expr, self.referrals.version)
            if self._listing is not None and self._listing[0] == cache_key:
                _, ordered, ends = self._listing
            else:
                scope = self.referrals.values() if predicate is None else self.referrals.candidates(predicate)
                ordered = [d for d in scope if predicate is None or predicate(d)]
                for path, desc in reversed(order):
                    ordered.sort(key=lambda d, p=path: resolve_path(d, p) or "", reverse=desc)
                ends = {}
                self._listing = (cache_key, ordered, ends)
        if last is None:
            matches = ordered
        elif (start := ends.get(json.dumps(last))) is not None:
            matches = ordered[start:]  # the previous page of this listing ended there
        else:
            matches = [d for d in ordered if after(key(d))]
        page = matches[:top]
        if page:
            ends[json.dumps(key(page[-1]))] = len(ordered) - len(matches) + len(page)
        body: dict[str, Any] = {
            "@odata.context": f"{request.origin}/v1.0/$metadata#Referrals",
            # The count of the items on this page: the documented list response shows
            # "@odata.count": 1 next to one item and an @odata.nextLink (Microsoft Learn, "Get a list of
            # referrals", https://learn.microsoft.com/partner-center/developer/get-a-list-of-referrals).
            "@odata.count": len(page),
            "value": [self._select(self._public(d, request.origin), select) for d in page],
        }
        if len(matches) > top:
            next_state = {"f": expr, "o": order_expr, "t": top, "k": key(page[-1]), "s": select}
            skiptoken = base64.urlsafe_b64encode(json.dumps(next_state).encode()).decode().rstrip("=")
            if self.nextlink_style == "documented":
                host = request.origin.removeprefix("https://")
                body["@odata.nextLink"] = f"http://{host}{NEXTLINK_PATH}?$skiptoken={skiptoken}"
            else:
                body["@odata.nextLink"] = f"{request.origin}{REFERRALS_PATH}?$skiptoken={skiptoken}"
        return Response.json(body)

    @staticmethod
    def _select(doc: dict[str, Any], select: list[str]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k in select} if select else doc

    def _get(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        with self.lock:
            return self._single(self._lookup(request.params["id"]), request)

    def _create(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        doc = request.json()
        validate_referral(doc, creating=True)
        doc = strip_annotations(doc)
        for key in READ_ONLY - {"engagementId"}:
            if doc.get(key) is not None:
                raise _bad(f"The field '{key}' is read-only and cannot be set on create.")
        with self.lock:
            engagement_id = doc.get("engagementId")
            if engagement_id is not None:
                self._check_engagement(engagement_id)
            if _targets_microsoft(doc):
                stored = self._invite_microsoft(doc)
            else:
                stored = self._store_new(doc, direction=doc.get("direction") or "Outgoing", via="API")
            self._fire_changed(stored, created=True)
            return self._single(stored, request, 201)

    # -- engagements -------------------------------------------------------------
    # "EngagementID ... Multiple referrals can be associated to a single EngagementID" (Microsoft Learn,
    # "Referral resources", https://learn.microsoft.com/partner-center/developer/referral-resources).
    # A POST without engagementId starts an engagement; one with the engagementId of an existing
    # engagement joins it ("Create a referral", "Create a connected referral": "Include the engagementId
    # from your referral so they are tied together").
    def _engagement(self, engagement_id: str) -> list[dict[str, Any]]:
        return self.referrals.engagement(engagement_id)  # in creation order

    def _check_engagement(self, engagement_id: Any) -> None:
        """An engagementId that names no engagement is an incorrect request: 400 invalidRequest. (The docs
        document no specific answer; 404 would say the request URI names nothing, and the URI here is the
        collection, so 400 per "Referrals API Response Codes" is the plausible one.)"""
        if not isinstance(engagement_id, str) or not self._engagement(engagement_id):
            raise HTTPError(
                400,
                "invalidRequest",
                f"The engagement '{engagement_id}' does not exist; omit engagementId to start a new engagement.",
                target="engagementId",
            )

    def _owned(self, doc: dict[str, Any]) -> bool:
        return doc.get("organizationId") == self.organization_id

    def _invite_microsoft(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The second step of co-selling with Microsoft: a referral for Microsoft in an existing engagement
        whose partner referral is Shared ("Create a referral", "Create a shared referral"; a Shared
        referral is the one visible to both parties, "Referrals API introduction"). The referral is
        Microsoft's: organizationId msft, Incoming from Microsoft's point of view, New/Pending until
        Microsoft acts on it (control plane: POST /_sandbox/engagements/{id}/microsoft)."""
        engagement_id = doc.get("engagementId")
        if engagement_id is None:
            raise HTTPError(
                400,
                "invalidRequest",
                "A referral for Microsoft must join an engagement: create your Shared referral first and "
                "include its engagementId.",
                target="engagementId",
            )
        mine = [d for d in self._engagement(engagement_id) if self._owned(d)]
        if not any(d.get("type") == "Shared" for d in mine):
            raise HTTPError(
                400,
                "invalidRequest",
                "Microsoft can only be invited to an engagement whose referral is of type 'Shared'.",
                target="type",
            )
        body = copy.deepcopy(doc)
        body.update(status="New", substatus="Pending", type="Shared")
        invite = dict(body.get("inviteContext") or {})
        invite["invitedBy"] = {"organizationId": self.organization_id, "organizationName": PARTNER_ORG_NAME}
        body["inviteContext"] = invite
        stored = self._store_new(
            body,
            direction="Incoming",
            via="API",
            organization=(MICROSOFT_ORG_ID, MICROSOFT_ORG_NAME),
        )
        stored["expirationDateTime"] = iso(datetime.now(UTC) + timedelta(days=INCOMING_EXPIRY_DAYS))
        return stored

    def _fire_changed(self, doc: dict[str, Any], *, created: bool) -> None:
        """Events reach the partner about its own referrals: referral-* for the referral itself when it is
        the partner's, and related-referral-* for each of the partner's other referrals in the engagement
        (their related referral changed; ResourceUri names the partner's referral, to re-fetch and then
        follow its links.relatedReferrals)."""
        kind = "created" if created else "updated"
        if self._owned(doc):
            self._fire(f"referral-{kind}", doc)
        for sibling in self._siblings(doc):
            if self._owned(sibling):
                self._fire(f"related-referral-{kind}", sibling)

    def _store_new(
        self,
        doc: dict[str, Any],
        *,
        direction: str,
        via: str,
        organization: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        now = _now()
        org_id, org_name = organization or (self.organization_id, PARTNER_ORG_NAME)
        stored = copy.deepcopy(doc)
        stored.update(
            id=str(uuid.uuid4()),
            engagementId=doc.get("engagementId") or str(uuid.uuid4()),
            organizationId=org_id,
            organizationName=org_name,
            createdDateTime=now,
            updatedDateTime=now,
            direction=direction,
            eTag=_etag(),
            lastModifiedVia=via,
        )
        stored.setdefault("type", "Independent")
        stored.setdefault("team", [])
        stored.setdefault("qualification", "None")
        if stored["status"] == "Active":
            stored["acceptedDateTime"] = now
        stored.pop("links", None)
        self.referrals[stored["id"]] = stored
        return stored

    def _check_if_match(self, request: Request, doc: dict[str, Any], required: bool) -> None:
        if_match = request.headers.get("If-Match")
        if if_match is None:
            if required:
                raise _bad("The If-Match header is required for this operation.")
            return
        if if_match.strip() not in ("*", doc["eTag"]):
            raise HTTPError(
                412,
                "preconditionFailed",
                "The referral has been modified since it was read; the If-Match ETag does not match.",
            )

    def _commit_update(self, old: dict[str, Any], new: dict[str, Any], via: str) -> dict[str, Any]:
        validate_referral(new, creating=False)
        for key in READ_ONLY - {"links"}:
            if new.get(key) != old.get(key):
                raise _bad(f"The field '{key}' is read-only.")
        check_transition(old, new)
        now = _now()
        if new.get("status") == "Active" and old.get("status") != "Active":
            new["acceptedDateTime"] = now
        if new.get("status") == "Closed":
            new["closedDateTime"] = now
        new.update(updatedDateTime=now, eTag=_etag(), lastModifiedVia=via)
        new.pop("links", None)
        self.referrals[new["id"]] = new
        self._fire_changed(new, created=False)
        return new

    def _replace(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        body = request.json()
        if not isinstance(body, dict):
            raise _bad("The referral must be a JSON object.")
        # The PUT body is the referral as read, with If-Match and without `links` (Microsoft Learn,
        # "Update a referral", https://learn.microsoft.com/partner-center/developer/update-a-referral):
        # a body that still carries them is a malformed request, 400 ("Referrals API Response Codes").
        if "links" in body:
            raise HTTPError(
                400, "invalidRequest", "Remove 'links' from the request body; it is read-only.", target="links"
            )
        with self.lock:
            old = self._lookup(request.params["id"])
            check_not_terminal(old)
            self._check_if_match(request, old, required=True)
            new = strip_annotations(copy.deepcopy(body))
            for key in READ_ONLY - {"links"}:  # server-owned values are kept; a different value is an error
                new.setdefault(key, old.get(key))
            return self._single(self._commit_update(old, new, "API"), request)

    def _patch(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        ops = request.json()
        with self.lock:
            old = self._lookup(request.params["id"])
            check_not_terminal(old)
            self._check_if_match(request, old, required=False)
            new = self._commit_update(old, apply_json_patch(old, ops), "API")
            if "return=representation" in (request.headers.get("Prefer") or ""):
                return self._single(new, request)
            return Response.empty(204, {"ETag": new["eTag"]})

    def _siblings(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [d for d in self.referrals.engagement(doc["engagementId"]) if d["id"] != doc["id"]]

    # -- webhooks ------------------------------------------------------------------
    def _fire(self, event: str, doc: dict[str, Any], resource_uri: str | None = None) -> Delivery | None:
        payload = {
            "EventName": event,
            "ResourceUri": resource_uri or f"{self._webhook_resource_origin()}/engagements/v1/referrals/{doc['id']}",
            "ResourceName": "referral" if event != "test-created" else "test",
            "AuditUri": None,
            "ResourceChangeUtcDate": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
        self.events_fired.append(payload)
        reg = self.registration
        if not reg or event not in reg["WebhookEvents"]:
            return None
        return self.dispatcher.enqueue(reg["WebhookUrl"], payload, ms_signature_header=reg["ms_signature"])

    def _webhook_resource_origin(self) -> str:
        assert self.server is not None
        return self.server.origin

    @staticmethod
    def _ci(doc: dict[str, Any], name: str) -> Any:
        for key, value in doc.items():
            if key.lower() == name.lower():
                return value
        return None

    def _registration_body(self) -> dict[str, Any]:
        assert self.registration is not None
        return {k: v for k, v in self.registration.items() if k != "ms_signature"}

    def _parse_registration(self, request: Request) -> dict[str, Any]:
        doc = request.json()
        if not isinstance(doc, dict):
            raise _bad("The registration must be a JSON object.")
        url = self._ci(doc, "WebhookUrl")
        events = self._ci(doc, "WebhookEvents")
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            raise _bad("WebhookUrl must be an absolute http(s) URL.")
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise _bad("WebhookEvents must be a non-empty array of event names.")
        unknown = [e for e in events if e.lower() not in WEBHOOK_EVENTS]
        if unknown:
            raise _bad(f"Unknown webhook event(s): {unknown}. See GET /registration/events.")
        return {
            "SubscriberId": self.organization_id,
            "WebhookUrl": url,
            "WebhookEvents": sorted({e.lower() for e in events}, key=WEBHOOK_EVENTS.index),
            "ms_signature": bool(self._ci(doc, "SignatureTokenToMsSignatureHeader")),
        }

    def _get_registration(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        with self.lock:
            if self.registration is None:
                raise HTTPError(404, "itemNotFound", "No webhook registration exists for this partner.")
            return Response.json(self._registration_body())

    def _create_registration(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        reg = self._parse_registration(request)
        with self.lock:
            if self.registration is not None:
                raise HTTPError(409, "conflict", "A webhook registration already exists. Use PUT to update it.")
            self.registration = reg
            return Response.json(self._registration_body())

    def _update_registration(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        reg = self._parse_registration(request)
        with self.lock:
            if self.registration is None:
                raise HTTPError(404, "itemNotFound", "No webhook registration exists; use POST to create one.")
            self.registration = reg
            return Response.json(self._registration_body())

    def _events(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        return Response.json(WEBHOOK_EVENTS)

    def _create_validation(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        with self.lock:
            if self.registration is None or "test-created" not in self.registration["WebhookEvents"]:
                raise _bad("A registration for the 'test-created' event is required to send validation events.")
            now = time.monotonic()
            while self._validation_times and now - self._validation_times[0] > 60:
                self._validation_times.popleft()
            if len(self._validation_times) >= VALIDATION_EVENTS_PER_MINUTE:
                wait = int(60 - (now - self._validation_times[0])) + 1
                raise HTTPError(
                    429,
                    "tooManyRequests",
                    f"At most {VALIDATION_EVENTS_PER_MINUTE} validation events per minute.",
                    headers={"Retry-After": str(wait)},
                )
            self._validation_times.append(now)
            correlation_id = str(uuid.uuid4())
            record: dict[str, Any] = {
                "correlationId": correlation_id,
                "partnerId": self.organization_id,
                "status": "pending",
                "results": [],
            }
            self.validation_events[correlation_id] = record
            uri = f"{request.origin}{WEBHOOKS_PATH}/registration/validationEvents/{correlation_id}"
            payload = {
                "EventName": "test-created",
                "ResourceUri": uri,
                "ResourceName": "test",
                "AuditUri": None,
                "ResourceChangeUtcDate": datetime.now(UTC).isoformat(timespec="microseconds"),
            }

            def done(delivery: Delivery) -> None:
                attempt = delivery.attempts[-1]
                ok = attempt.status is not None and 200 <= attempt.status < 300
                with self.lock:
                    record["status"] = "completed"
                    record["results"] = [
                        {
                            "responseCode": "OK" if ok else str(attempt.status or "ConnectionFailed"),
                            "responseMessage": "" if ok else (attempt.error or f"HTTP {attempt.status}"),
                            "systemMessage": "Request completed successfully." if ok else "Delivery failed.",
                            "dateTimeUtc": datetime.now(UTC).isoformat(timespec="seconds"),
                        }
                    ]

            self.dispatcher.enqueue(
                self.registration["WebhookUrl"],
                payload,
                ms_signature_header=self.registration["ms_signature"],
                max_attempts=1,
                on_done=done,
            )
            return Response.json({"correlationId": correlation_id})

    def _get_validation(self, request: Request) -> Response:
        self._auth(request, WEBHOOKS_AUDIENCE)
        with self.lock:
            record = self.validation_events.get(request.params["cid"])
            if record is None:
                raise HTTPError(404, "itemNotFound", "No validation event with that correlation id.")
            return Response.json(copy.deepcopy(record))

    def _cert(self, request: Request) -> Response:
        resp = Response(200, self.signer_der)
        resp.headers.set("Content-Type", "application/pkix-cert")
        return resp

    signer_der: bytes = b""

    # -- control plane -----------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.referrals.clear()
            self.registration = None
            self.validation_events.clear()
            self._validation_times.clear()
            self.events_fired.clear()
            self.nextlink_style = "documented"
        self.dispatcher.clear()
        self.faults.clear()
        self.log.clear()

    AGED_STAMPS = ("createdDateTime", "updatedDateTime", "acceptedDateTime", "closedDateTime")

    def age(self, seconds: float) -> int:
        """Time passes: every referral's stamps (created, updated, accepted, closed) move
        ``seconds`` into the past, as if everything had happened that much earlier; the
        server's own clock (the ``Date`` of its answers) is not touched. Returns the
        referrals aged."""
        delta = timedelta(seconds=seconds)
        with self.lock:
            for doc in self.referrals.values():
                for key in self.AGED_STAMPS:
                    value = doc.get(key)
                    if isinstance(value, str) and value:
                        doc[key] = iso(_parse_stamp(value) - delta)
            self.referrals.touch()
            return len(self.referrals)

    def seed(self, count: int, seed: int = 0) -> list[str]:
        rng = random.Random(seed)
        now = datetime.now(UTC)
        ids = []
        with self.lock:
            start = len(self.referrals)
            for i in range(count):
                doc = make_referral(rng, now, self.organization_id, start + i + 1)
                doc["eTag"] = _etag()
                self.referrals[doc["id"]] = doc
                ids.append(doc["id"])
        return ids

    def _reset(self, request: Request) -> Response:
        self.reset()
        return Response.empty()

    def _seed(self, request: Request) -> Response:
        doc = json.loads(request.body or b"{}")
        ids = self.seed(int(doc.get("count", 10)), int(doc.get("seed", 0)))
        return Response.json({"ids": ids})

    def _state(self, request: Request) -> Response:
        with self.lock:
            by_status: dict[str, int] = {}
            for d in self.referrals.values():
                key = f"{d.get('status')}/{d.get('substatus')}"
                by_status[key] = by_status.get(key, 0) + 1
            deliveries = list(self.dispatcher.deliveries.values())
            return Response.json(
                {
                    "organizationId": self.organization_id,
                    "referrals": len(self.referrals),
                    "byStatus": by_status,
                    "registration": self._registration_body() if self.registration else None,
                    "eventsFired": len(self.events_fired),
                    "deliveries": {
                        s: sum(1 for d in deliveries if d.state == s) for s in ("pending", "delivered", "parked")
                    },
                    "nextlinkStyle": self.nextlink_style,
                }
            )

    def _config(self, request: Request) -> Response:
        doc = request.json()
        style = doc.get("nextlink_style", self.nextlink_style)
        if style not in ("documented", "clean"):
            raise _bad("nextlink_style must be 'documented' or 'clean'.")
        self.nextlink_style = style
        return self._state(request)

    def _raw_list(self, request: Request) -> Response:
        with self.lock:
            return Response.json({"value": [copy.deepcopy(d) for d in self.referrals.values()]})

    def _raw_get(self, request: Request) -> Response:
        with self.lock:
            return Response.json(copy.deepcopy(self._lookup(request.params["id"])))

    def _microsoft_create(self, request: Request) -> Response:
        """A Microsoft seller shares a new incoming referral; fires referral-created."""
        doc = request.json()
        if not isinstance(doc, dict):
            raise _bad("The body must be a JSON object of referral fields to set.")
        rng = random.Random(doc.pop("seed", None))
        base = make_referral(rng, datetime.now(UTC), self.organization_id, len(self.referrals) + 1)
        base.update(status="New", substatus="Pending", direction="Incoming", type="Shared")
        base.update(doc)
        validate_referral(base, creating=True)
        with self.lock:
            stored = self._store_new(base, direction="Incoming", via="Microsoft")
            stored["expirationDateTime"] = iso(datetime.now(UTC) + timedelta(days=INCOMING_EXPIRY_DAYS))
            self._fire("referral-created", stored)
            return Response.json(copy.deepcopy(stored), 201)

    def _microsoft_edit(self, request: Request) -> Response:
        """A Microsoft seller acts on a referral: accept, win, lose, decline, or update fields."""
        doc = request.json()
        if not isinstance(doc, dict):
            raise _bad("The body must be a JSON object with 'action' and optional 'changes'.")
        action = _microsoft_action(doc)
        presets = MICROSOFT_ACTIONS
        with self.lock:
            old = self._lookup(request.params["id"])
            new = copy.deepcopy(old)
            new.update(presets[action])
            _deep_merge(new, doc.get("changes") or {})
            updated = self._commit_update(old, new, "Microsoft")
            return Response.json(copy.deepcopy(updated))

    def _raw_engagement(self, request: Request) -> Response:
        """The engagement as the emulator holds it: its id and every referral in it, oldest first."""
        with self.lock:
            docs = self._engagement(request.params["eid"])
            if not docs:
                raise HTTPError(404, "itemNotFound", f"Engagement '{request.params['eid']}' was not found.")
            return Response.json({"engagementId": request.params["eid"], "referrals": copy.deepcopy(docs)})

    def _microsoft_engagement_action(self, request: Request) -> Response:
        """Microsoft acts on its referral in an engagement the partner invited it to.

        Body ``{"action": "accept"|"decline"|"win"|"lose"|"update", "changes": {...}, "statusReason": "...",
        "seller": {firstName, lastName, email, phoneNumber}}``. Accepting makes Microsoft's referral
        Active/Accepted and adds the Microsoft seller to its team; declining closes it (Closed/Declined).
        The partner's referrals in the engagement get ``related-referral-updated``. Answers the
        engagement (as GET /_sandbox/engagements/{id})."""
        doc = request.json()
        if not isinstance(doc, dict):
            raise _bad("The body must be a JSON object with 'action' and optional 'changes'.")
        action = _microsoft_action(doc)
        presets = MICROSOFT_ACTIONS
        engagement_id = request.params["eid"]
        with self.lock:
            docs = self._engagement(engagement_id)
            if not docs:
                raise HTTPError(404, "itemNotFound", f"Engagement '{engagement_id}' was not found.")
            theirs = [d for d in docs if d.get("organizationId") == MICROSOFT_ORG_ID]
            if not theirs:
                raise HTTPError(409, "conflict", f"Microsoft has not been invited to engagement '{engagement_id}'.")
            old = theirs[-1]
            new = copy.deepcopy(old)
            new.update(presets[action])
            if action in ("decline", "lose") or doc.get("statusReason") is not None:
                new["statusReason"] = str(doc.get("statusReason") or f"Microsoft: {action}")
            if action == "accept":
                seller = doc.get("seller") or {
                    "firstName": "Morgan",
                    "lastName": "Seller",
                    "email": "morgan.seller@microsoft.example",
                    "phoneNumber": "+1 425 555 0100",
                }
                new["team"] = [*(new.get("team") or []), seller]
            _deep_merge(new, doc.get("changes") or {})
            self._commit_update(old, new, "Microsoft")
            return Response.json(
                {"engagementId": engagement_id, "referrals": copy.deepcopy(self._engagement(engagement_id))}
            )

    def _deliveries(self, request: Request) -> Response:
        with self.lock:
            return Response.json({"value": [d.summary() for d in self.dispatcher.deliveries.values()]})

    def _dispatch_config(self, request: Request) -> Response:
        doc = request.json()
        cfg = self.dispatcher.config
        self.dispatcher.config = DispatchConfig(
            max_attempts=int(doc.get("max_attempts", cfg.max_attempts)),
            backoff_base=float(doc.get("backoff_base", cfg.backoff_base)),
            backoff_cap=float(doc.get("backoff_cap", cfg.backoff_cap)),
            timeout=float(doc.get("timeout", cfg.timeout)),
        )
        return Response.json(vars(self.dispatcher.config))

    def _redeliver(self, request: Request) -> Response:
        return Response.json({"redelivered": self.dispatcher.redeliver_parked()})


def _parse_stamp(value: str) -> datetime:
    """A stamp as :func:`iso` writes it (7 fractional digits and Z), or any ISO 8601 time."""
    text = value.strip().removesuffix("Z").removesuffix("+00:00")
    whole, _, fraction = text.partition(".")
    moment = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    return moment + timedelta(microseconds=int((fraction + "000000")[:6])) if fraction else moment


def _targets_microsoft(doc: dict[str, Any]) -> bool:
    return any(
        isinstance(t, dict) and t.get("type") == "BusinessProfileLocation" and t.get("id") == MICROSOFT_ORG_ID
        for t in doc.get("target") or []
    )


def _deep_merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value
