"""The Partner Center emulator's control plane: reset, time, seed, state, raw referrals, and
Microsoft's side (new incoming referrals, edits, engagement actions) and webhook deliveries."""

from __future__ import annotations

import copy
import random
from datetime import timedelta
from typing import Any

from ..seed import iso, make_referral
from ..server import HTTPError, Request, Response
from . import clock
from .records import (
    INCOMING_EXPIRY_DAYS,
    MICROSOFT_ACTIONS,
    MICROSOFT_ORG_ID,
    _bad,
    _deep_merge,
    _etag,
    _microsoft_action,
    _parse_stamp,
    validate_referral,
)
from .webhooks import DispatchConfig


class ControlMixin:
    """Control methods and handlers of :class:`PartnerCenterEmulator`."""

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
        super().reset()

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

    def seed(self, count: int = 10, seed: int = 0) -> list[str]:
        """``count`` realistic referrals (the organization's own, in a mix of statuses); their ids."""
        rng = random.Random(seed)
        now = clock.now()
        ids = []
        with self.lock:
            start = len(self.referrals)
            for i in range(count):
                doc = make_referral(rng, now, self.organization_id, start + i + 1)
                doc["eTag"] = _etag()
                self.referrals[doc["id"]] = doc
                ids.append(doc["id"])
        return ids

    def seed_request(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {"ids": self.seed(**doc)}

    def state(self) -> dict[str, Any]:
        with self.lock:
            by_status: dict[str, int] = {}
            for d in self.referrals.values():
                key = f"{d.get('status')}/{d.get('substatus')}"
                by_status[key] = by_status.get(key, 0) + 1
            deliveries = list(self.dispatcher.deliveries.values())
            return {
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

    def configure(self, nextlink_style: str | None = None) -> dict[str, Any]:
        """``nextlink_style``: "documented" (the documented odd nextLink) or "clean"; returns the state."""
        style = nextlink_style or self.nextlink_style
        if style not in ("documented", "clean"):
            raise _bad("nextlink_style must be 'documented' or 'clean'.")
        self.nextlink_style = style
        return self.state()

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
        base = make_referral(rng, clock.now(), self.organization_id, len(self.referrals) + 1)
        base.update(status="New", substatus="Pending", direction="Incoming", type="Shared")
        base.update(doc)
        validate_referral(base, creating=True)
        with self.lock:
            stored = self._store_new(base, direction="Incoming", via="Microsoft")
            stored["expirationDateTime"] = iso(clock.now() + timedelta(days=INCOMING_EXPIRY_DAYS))
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
