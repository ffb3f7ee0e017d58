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

This module wires the routes; the work is done by one module per concern: :mod:`.records`
(fields, validation, JSON Patch), :mod:`.query`, :mod:`.writes`, :mod:`.registration` (the webhook
API), :mod:`.webhooks` (signed deliveries), :mod:`.control` (the control plane and seeding) and
:mod:`.clock`. The shared ``/_sandbox/`` endpoints come from :class:`~cosell_sandbox.server.EmulatorApp`."""

from __future__ import annotations

import re
import uuid
from collections import deque
from typing import Any

from ..entra import EntraEmulator
from ..server import EmulatorApp, HTTPError, Request, Response, Router, new_request_id
from .control import ControlMixin
from .query import QueryMixin
from .records import (
    CERT_PATH,
    NEXTLINK_PATH,
    REFERRALS_AUDIENCE,
    REFERRALS_PATH,
    WEBHOOKS_AUDIENCE,
    WEBHOOKS_PATH,
    ReferralStore,
)
from .registration import RegistrationMixin
from .webhooks import WebhookDispatcher
from .writes import WritesMixin


class PartnerCenterEmulator(ControlMixin, RegistrationMixin, WritesMixin, QueryMixin, EmulatorApp):
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
        # control plane (reset, seed, state, config, age, faults and requests: EmulatorApp's)
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
