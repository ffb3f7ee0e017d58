"""Partner Center writes: create, replace (``PUT`` with ``If-Match``) and JSON Patch, engagements
and Microsoft's side of a shared referral."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from ..seed import iso
from ..server import HTTPError, Request, Response, json_copy
from . import clock
from .records import (
    INCOMING_EXPIRY_DAYS,
    MICROSOFT_ORG_ID,
    MICROSOFT_ORG_NAME,
    PARTNER_ORG_NAME,
    READ_ONLY,
    REFERRALS_AUDIENCE,
    _bad,
    _etag,
    _targets_microsoft,
    apply_json_patch,
    check_not_terminal,
    check_transition,
    strip_annotations,
    validate_referral,
)


class WritesMixin:
    """The write handlers of :class:`PartnerCenterEmulator`."""

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
        body = json_copy(doc)
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
        stored["expirationDateTime"] = iso(clock.now() + timedelta(days=INCOMING_EXPIRY_DAYS))
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
        now = clock.stamp()
        org_id, org_name = organization or (self.organization_id, PARTNER_ORG_NAME)
        stored = json_copy(doc)
        stored.update(
            {
                "id": str(uuid.uuid4()),
                "engagementId": doc.get("engagementId") or str(uuid.uuid4()),
                "organizationId": org_id,
                "organizationName": org_name,
                "createdDateTime": now,
                "updatedDateTime": now,
                "direction": direction,
                "eTag": _etag(),
                "lastModifiedVia": via,
            }
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
        now = clock.stamp()
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
            new = strip_annotations(json_copy(body))
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
