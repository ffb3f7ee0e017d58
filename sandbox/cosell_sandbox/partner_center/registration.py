"""The Partner Center webhook registration API (``/webhooks/v1``): registration, events,
validation events, the signing certificate, and firing events to the dispatcher."""

from __future__ import annotations

import copy
import re
import time
import uuid
from typing import Any

from ..server import HTTPError, Request, Response
from . import clock
from .records import VALIDATION_EVENTS_PER_MINUTE, WEBHOOK_EVENTS, WEBHOOKS_AUDIENCE, WEBHOOKS_PATH, _bad
from .webhooks import Delivery


class RegistrationMixin:
    """The webhook handlers of :class:`PartnerCenterEmulator`."""

    # -- webhooks ------------------------------------------------------------------
    def _fire(self, event: str, doc: dict[str, Any], resource_uri: str | None = None) -> Delivery | None:
        payload = {
            "EventName": event,
            "ResourceUri": resource_uri or f"{self._webhook_resource_origin()}/engagements/v1/referrals/{doc['id']}",
            "ResourceName": "referral" if event != "test-created" else "test",
            "AuditUri": None,
            "ResourceChangeUtcDate": clock.now().isoformat(timespec="microseconds"),
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
                "ResourceChangeUtcDate": clock.now().isoformat(timespec="microseconds"),
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
                            "dateTimeUtc": clock.now().isoformat(timespec="seconds"),
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
