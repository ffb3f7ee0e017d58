"""The Partner Center emulator over HTTPS with plain ``requests`` (no project client code): engagements,
co-sell with Microsoft and Microsoft's side of it, and the documented rules on updates and paging."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from cosell_sandbox.partner_center.records import REFERRALS_PATH, WEBHOOKS_PATH
from tests.helpers import Receiver

REFERRALS = "https://api.partner.microsoft.com"
WEBHOOKS = "https://api.partnercenter.microsoft.com"
MSFT_TARGET = [{"type": "BusinessProfileLocation", "id": "msft"}]


@dataclass
class PC:
    origin: str
    entra: str
    tenant: str
    ca: str
    creds: Any

    def token(self, resource: str) -> str:
        resp = requests.post(
            f"{self.entra}/{self.tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "password",
                "client_id": self.creds.client_id,
                "client_secret": self.creds.client_secret,
                "username": self.creds.username,
                "password": self.creds.password,
                "scope": f"{resource}/.default offline_access",
            },
            verify=self.ca,
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["access_token"]

    def call(self, method: str, url: str, *, resource: str = REFERRALS, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token(resource)}", "Accept": "application/json"}
        headers.update(kwargs.pop("headers", {}))
        if not url.startswith("http"):
            url = f"{self.origin}{REFERRALS_PATH}{url}"
        return requests.request(method, url, headers=headers, verify=self.ca, timeout=30, **kwargs)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.call("POST", "", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def get(self, referral_id: str) -> dict[str, Any]:
        resp = self.call("GET", f"/{referral_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def control(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.origin}/_sandbox/{path}", verify=self.ca, timeout=30, **kwargs)


@pytest.fixture
def api(pc) -> PC:
    creds = pc.credentials
    return PC(pc.origin("partner_center"), pc.origin("entra"), creds.tenant_id, str(pc.pki.ca_cert), creds)


@pytest.fixture
def receiver(pc) -> Iterator[Receiver]:
    r = Receiver(pc.pki.server_context())
    yield r
    r.close()


def referral(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "Contoso - Azure migration",
        "externalReferenceId": "opp-0001",
        "status": "New",
        "substatus": "Pending",
        "type": "Shared",
        "qualification": "SalesQualified",
        "customerProfile": {
            "name": "Contoso Ltd",
            "address": {"addressLine1": "1 Main St", "city": "Seattle", "postalCode": "98101", "country": "US"},
            "team": [{"firstName": "Ada", "lastName": "Lovelace", "email": "ada@contoso.example"}],
        },
        "consent": {"consentToContact": True, "consentToShareReferralWithMicrosoftSellers": True},
        "details": {
            "dealValue": 125000.0,
            "currency": "USD",
            "notes": "first",
            "closingDateTime": "2027-01-31T00:00:00Z",
        },
        "inviteContext": {"notes": "Please help with the architecture.", "assistanceRequestCode": "GeneralOrOther"},
        "target": [{"type": "SolutionProfile", "id": "SOL-6115380-IPC"}],
    }
    doc.update(overrides)
    return doc


def assert_error(resp: requests.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


def verify_signed(headers: Any, body: bytes, ca: str) -> dict[str, Any]:
    """Check a delivery as a receiver would: headers, certificate from its URL, RSA-SHA256 over the body."""
    assert headers["X-MS-Signature-Algorithm"] == "rsa-sha256"
    assert headers["Authorization"].startswith("Signature ")
    cert = x509.load_der_x509_certificate(requests.get(headers["X-MS-Certificate-Url"], verify=ca, timeout=10).content)
    signature = base64.b64decode(headers["Authorization"].removeprefix("Signature "))
    cert.public_key().verify(signature, body, padding.PKCS1v15(), hashes.SHA256())  # raises if not genuine
    return json.loads(body)


# -- documented rules ------------------------------------------------------------------------------------


def test_put_carrying_links_is_rejected_and_without_them_accepted(api):
    created = api.create(referral(type="Independent", target=[]))
    current = api.get(created["id"])
    body = {k: v for k, v in current.items() if not k.startswith("@")}
    body["details"]["notes"] = "changed"
    etag = {"If-Match": current["eTag"]}

    error = assert_error(api.call("PUT", f"/{created['id']}", json=body, headers=etag), 400, "invalidRequest", "links")
    assert error.get("target") == "links"
    assert api.get(created["id"])["details"]["notes"] == "first"

    body.pop("links")
    ok = api.call("PUT", f"/{created['id']}", json=body, headers=etag)
    assert ok.status_code == 200, ok.text
    assert ok.json()["details"]["notes"] == "changed"


@pytest.mark.parametrize(
    "op",
    [
        {"op": "remove", "path": "/details/notes"},
        {"op": "move", "from": "/details/notes", "path": "/statusReason"},
        {"op": "copy", "from": "/details/notes", "path": "/statusReason"},
        {"op": "test", "path": "/details/notes", "value": "first"},
    ],
)
def test_json_patch_accepts_only_add_and_replace(api, op):
    rid = api.create(referral())["id"]
    replace = {"op": "replace", "path": "/details/notes", "value": "patched"}
    error = assert_error(api.call("PATCH", f"/{rid}", json=[replace, op]), 400, "invalidRequest", op["op"])
    assert error.get("target") == "[1].op"
    assert api.get(rid)["details"]["notes"] == "first"  # nothing of a rejected patch is applied

    add = {"op": "add", "path": "/team/-", "value": {"firstName": "Jane", "lastName": "Doe", "email": "j@x.example"}}
    ok = api.call("PATCH", f"/{rid}", json=[replace, add], headers={"Prefer": "return=representation"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["details"]["notes"] == "patched" and ok.json()["team"][-1]["lastName"] == "Doe"


@pytest.mark.parametrize("substatus", ["Won", "Lost", "Declined", "Expired"])
def test_nothing_changes_a_referral_in_a_terminal_state(api, substatus):
    rid = api.create(referral())["id"]
    closing = [
        {"op": "replace", "path": "/status", "value": "Closed"},
        {"op": "replace", "path": "/substatus", "value": substatus},
    ]
    assert api.call("PATCH", f"/{rid}", json=closing).status_code == 204
    closed = api.get(rid)
    assert (closed["status"], closed["substatus"]) == ("Closed", substatus)

    patch = [{"op": "replace", "path": "/details/notes", "value": "too late"}]
    for resp in (
        api.call("PATCH", f"/{rid}", json=patch),
        api.call("PATCH", f"/{rid}", json=patch, headers={"If-Match": closed["eTag"]}),
        api.call("PATCH", f"/{rid}", json=[{"op": "replace", "path": "/status", "value": "Active"}]),
    ):
        assert_error(resp, 400, "invalidRequest", "terminal", substatus)
    body = {k: v for k, v in closed.items() if not k.startswith("@") and k != "links"}
    body["details"]["notes"] = "too late"
    assert_error(
        api.call("PUT", f"/{rid}", json=body, headers={"If-Match": closed["eTag"]}), 400, "invalidRequest", "terminal"
    )
    after = api.get(rid)
    assert after["eTag"] == closed["eTag"] and after["details"]["notes"] == "first"


def test_odata_count_is_the_count_of_the_page(api):
    ids = {api.create(referral(name=f"Deal {i}", type="Independent", target=[]))["id"] for i in range(7)}
    url = f"{api.origin}{REFERRALS_PATH}?$top=3&$orderby=createdDateTime asc"
    counts, seen = [], []
    while url:
        page = api.call("GET", url).json()
        counts.append(page["@odata.count"])
        assert page["@odata.count"] == len(page["value"])
        seen += [d["id"] for d in page["value"]]
        url = page.get("@odata.nextLink", "").replace("http://", "https://", 1)
    assert counts == [3, 3, 1]
    assert set(seen) == ids and len(seen) == 7
    filtered = api.call("GET", "?$filter=name eq 'Deal 4'").json()
    assert filtered["@odata.count"] == 1 and filtered["value"][0]["name"] == "Deal 4"


def test_listings_stay_right_while_the_store_changes_between_pages(api):
    """The emulator reuses a listing's sorted matches across its pages and looks externalReferenceId
    up by index: a write between two pages, or a changed externalReferenceId, is seen at once."""
    made = [
        api.create(referral(name=f"Deal {i}", type="Independent", target=[], externalReferenceId=f"opp-{i}"))
        for i in range(5)
    ]
    url = f"{api.origin}{REFERRALS_PATH}?$top=2&$orderby=createdDateTime asc"
    first = api.call("GET", url).json()
    assert [d["id"] for d in first["value"]] == [made[0]["id"], made[1]["id"]]
    late = api.create(referral(name="Deal late", type="Independent", target=[], externalReferenceId="opp-late"))
    seen = [d["id"] for d in first["value"]]
    url = first["@odata.nextLink"].replace("http://", "https://", 1)
    while url:
        page = api.call("GET", url).json()
        seen += [d["id"] for d in page["value"]]
        url = page.get("@odata.nextLink", "").replace("http://", "https://", 1)
    assert seen == [d["id"] for d in made] + [late["id"]]  # the page after the write holds it

    def lookup(*refs: str) -> list[str]:
        terms = " or ".join(f"externalReferenceId eq '{r}'" for r in refs)
        return sorted(d["id"] for d in api.call("GET", f"?$filter={terms}").json()["value"])

    assert lookup("opp-1", "opp-3", "opp-none") == sorted([made[1]["id"], made[3]["id"]])
    assert lookup("OPP-1") == []  # a text literal that is not a GUID matches exactly
    ops = [{"op": "replace", "path": "/externalReferenceId", "value": "opp-renamed"}]
    assert api.call("PATCH", f"/{made[1]['id']}", json=ops).status_code == 204
    assert lookup("opp-1") == []
    assert lookup("opp-renamed", "opp-3") == sorted([made[1]["id"], made[3]["id"]])


# -- engagements -----------------------------------------------------------------------------------------


def test_every_referral_has_an_engagement_and_a_post_without_one_starts_a_new_one(api, pc):
    pc.partner_center.seed(12, seed=3)
    first, second = api.create(referral()), api.create(referral(name="Other"))
    assert first["engagementId"] and second["engagementId"] and first["engagementId"] != second["engagementId"]
    docs = api.call("GET", "").json()["value"]
    assert len(docs) == 14 and len({d["engagementId"] for d in docs}) == 14  # seeded ones: one engagement each
    seeded = next(d for d in docs if d["id"] not in (first["id"], second["id"]))
    related = api.call("GET", seeded["links"]["relatedReferrals"]["uri"]).json()
    assert [d["id"] for d in related["value"]] == [seeded["id"]]


def test_a_post_with_an_unknown_engagement_id_is_rejected(api):
    resp = api.call("POST", "", json=referral(engagementId="7b6f9c1e-0000-4000-8000-000000000000"))
    assert assert_error(resp, 400, "invalidRequest", "7b6f9c1e")["target"] == "engagementId"
    assert api.call("GET", "").json()["value"] == []


def test_a_referral_joining_an_engagement_and_related_referrals_link(api):
    first = api.create(referral())
    joined = api.create(referral(name="Second party", engagementId=first["engagementId"]))
    assert joined["engagementId"] == first["engagementId"] and joined["id"] != first["id"]

    link = api.get(first["id"])["links"]["relatedReferrals"]
    assert link["method"] == "GET"
    assert f"$filter=engagementId eq '{first['engagementId']}'" in link["uri"]
    listed = api.call("GET", link["uri"]).json()
    assert sorted(d["id"] for d in listed["value"]) == sorted([first["id"], joined["id"]])
    assert listed["@odata.count"] == 2
    assert all(d["links"]["relatedReferrals"]["uri"] == link["uri"] for d in listed["value"])
    api.create(referral(name="unrelated"))
    assert len(api.call("GET", link["uri"]).json()["value"]) == 2


def test_inviting_microsoft_needs_an_engagement_with_a_shared_referral(api):
    no_engagement = api.call("POST", "", json=referral(target=MSFT_TARGET))
    assert assert_error(no_engagement, 400, "invalidRequest", "engagementId")["target"] == "engagementId"
    independent = api.create(referral(type="Independent", target=[]))
    resp = api.call("POST", "", json=referral(engagementId=independent["engagementId"], target=MSFT_TARGET))
    assert_error(resp, 400, "invalidRequest", "Shared")
    assert len(api.call("GET", "").json()["value"]) == 1


def test_co_sell_with_microsoft_engagement_and_microsofts_side(api, pc, receiver):
    reg = api.call(
        "POST",
        f"{api.origin}{WEBHOOKS_PATH}/registration",
        resource=WEBHOOKS,
        json={
            "WebhookUrl": receiver.url,
            "WebhookEvents": [
                "referral-created",
                "referral-updated",
                "related-referral-created",
                "related-referral-updated",
            ],
        },
    )
    assert reg.status_code == 200, reg.text
    mine = api.create(referral())
    receiver.wait_for(1)

    # step 2: the referral for Microsoft, in the same engagement
    help_request = referral(
        engagementId=mine["engagementId"],
        target=MSFT_TARGET,
        inviteContext={"notes": "Need a PoC", "assistanceRequestCode": "ProofOfConceptOrDemo"},
    )
    theirs = api.create(help_request)
    assert theirs["engagementId"] == mine["engagementId"]
    assert theirs["organizationId"] == "msft" and theirs["organizationName"] == "Microsoft"
    assert (theirs["status"], theirs["substatus"], theirs["direction"]) == ("New", "Pending", "Incoming")
    assert theirs["type"] == "Shared" and theirs["target"] == MSFT_TARGET
    assert theirs["inviteContext"]["assistanceRequestCode"] == "ProofOfConceptOrDemo"
    assert theirs["inviteContext"]["invitedBy"]["organizationId"] == mine["organizationId"]
    assert theirs["expirationDateTime"]
    receiver.wait_for(2)

    related = api.call("GET", api.get(mine["id"])["links"]["relatedReferrals"]["uri"]).json()["value"]
    assert sorted(d["id"] for d in related) == sorted([mine["id"], theirs["id"]])
    raw = pc.partner_center.referrals
    assert raw[mine["id"]]["organizationId"] == pc.partner_center.organization_id

    accepted = api.control("POST", f"engagements/{mine['engagementId']}/microsoft", json={"action": "accept"})
    assert accepted.status_code == 200, accepted.text
    engagement = accepted.json()
    assert engagement["engagementId"] == mine["engagementId"]
    assert [d["id"] for d in engagement["referrals"]] == [mine["id"], theirs["id"]]
    microsoft = api.get(theirs["id"])
    assert (microsoft["status"], microsoft["substatus"]) == ("Active", "Accepted") and microsoft["acceptedDateTime"]
    assert microsoft["team"][-1]["email"].endswith("microsoft.example")
    assert microsoft["lastModifiedVia"] == "Microsoft"
    assert api.get(mine["id"])["eTag"] == mine["eTag"]  # the partner's own referral is untouched
    receiver.wait_for(3)

    events = [verify_signed(headers, body, api.ca) for headers, body in receiver.received]
    assert [(e["EventName"], e["ResourceUri"].rsplit("/", 1)[-1]) for e in events] == [
        ("referral-created", mine["id"]),
        ("related-referral-created", mine["id"]),
        ("related-referral-updated", mine["id"]),
    ]
    assert all(e["ResourceName"] == "referral" for e in events)
    assert api.control("GET", f"engagements/{mine['engagementId']}").json() == engagement

    # a change to the partner's referral: referral-updated for it, no event about Microsoft's referral
    patch = [{"op": "replace", "path": "/details/notes", "value": "second"}]
    assert api.call("PATCH", f"/{mine['id']}", json=patch).status_code == 204
    receiver.wait_for(4)
    last = json.loads(receiver.received[3][1])
    assert (last["EventName"], last["ResourceUri"].rsplit("/", 1)[-1]) == ("referral-updated", mine["id"])
    assert all(theirs["id"] not in e["ResourceUri"] for e in pc.partner_center.events_fired)


def test_microsoft_declines_and_its_referral_is_then_terminal(api, pc):
    mine = api.create(referral())
    theirs = api.create(referral(engagementId=mine["engagementId"], target=MSFT_TARGET))
    path = f"engagements/{mine['engagementId']}/microsoft"
    declined = api.control("POST", path, json={"action": "decline", "statusReason": "No capacity this quarter"})
    assert declined.status_code == 200, declined.text
    microsoft = api.get(theirs["id"])
    assert (microsoft["status"], microsoft["substatus"]) == ("Closed", "Declined")
    assert microsoft["statusReason"] == "No capacity this quarter" and microsoft["closedDateTime"]
    names = [(e["EventName"], e["ResourceUri"].rsplit("/", 1)[-1]) for e in pc.partner_center.events_fired]
    assert names[-1] == ("related-referral-updated", mine["id"])

    again = api.control("POST", path, json={"action": "accept"})
    assert_error(again, 400, "invalidRequest", "terminal")
    patch = [{"op": "replace", "path": "/details/notes", "value": "x"}]
    assert_error(api.call("PATCH", f"/{theirs['id']}", json=patch), 400, "invalidRequest", "terminal")


def test_microsoft_action_errors(api):
    mine = api.create(referral())
    assert api.control("POST", "engagements/nope/microsoft", json={"action": "accept"}).status_code == 404
    not_invited = api.control("POST", f"engagements/{mine['engagementId']}/microsoft", json={"action": "accept"})
    assert not_invited.status_code == 409 and "not been invited" in not_invited.json()["error"]["message"]
    api.create(referral(engagementId=mine["engagementId"], target=MSFT_TARGET))
    bad = api.control("POST", f"engagements/{mine['engagementId']}/microsoft", json={"action": "approve"})
    assert bad.status_code == 400 and "accept" in bad.json()["error"]["message"]
    changed = api.control(
        "POST",
        f"engagements/{mine['engagementId']}/microsoft",
        json={"action": "update", "changes": {"details": {"notes": "Microsoft seller note"}}},
    ).json()
    assert changed["referrals"][1]["details"]["notes"] == "Microsoft seller note"
    assert changed["referrals"][0]["details"]["notes"] == "first"
    assert changed["referrals"][1]["status"] == "New"
