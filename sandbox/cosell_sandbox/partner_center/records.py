"""Referrals of the Partner Center emulator: the documented fields, enums and status transitions,
validation, JSON Patch, and the fields a list may filter, order and select on."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from ..seed import HELP_CODES
from ..server import HTTPError, json_copy

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
    "inviteContext.assistanceRequestCode": {"Unknown", *HELP_CODES},
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
# The scalar fields of a referral: each can be filtered on and selected.
SCALARS = frozenset(
    {
        "id",
        "engagementId",
        "organizationId",
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
    }
)
FILTER_PATHS = SCALARS | {
    "customerProfile/name",
    "customerProfile/address/country",
    "customerProfile/address/postalCode",
    "customerProfile/address/city",
    "customerProfile/address/state",
    "details/currency",
    "details/dealValue",
    "details/closingDateTime",
}
ORDERBY_PATHS = frozenset({"createdDateTime", "updatedDateTime"})
SELECTABLE = SCALARS | {
    "organizationName",
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
    result = json_copy(doc)
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
        value = json_copy(op["value"])
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
