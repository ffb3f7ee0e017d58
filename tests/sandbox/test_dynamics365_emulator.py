"""The Dataverse Web API emulator, driven over HTTPS with plain ``requests`` (no project
client code): a token from the Entra emulator, then the documented wire behaviour."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

from cosell_sandbox.dynamics365 import Dynamics365Emulator, ProtectionLimits, ServiceProtection
from cosell_sandbox.entra import EntraEmulator
from cosell_sandbox.server import EmulatorServer, HTTPError
from cosell_sandbox.tls import SandboxPKI

GUID = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}")


@dataclass
class Dataverse:
    emulator: Dynamics365Emulator
    origin: str
    entra_origin: str
    tenant: str
    ca: str
    token: str

    @property
    def api(self) -> str:
        return f"{self.origin}/api/data/v9.2"

    def request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {token or self.token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            **kwargs.pop("headers", {}),
        }
        url = path if path.startswith("https://") else f"{self.api}/{path}"
        # verify= on every call: REQUESTS_CA_BUNDLE would otherwise override a session's setting.
        return requests.request(method, url, headers=headers, verify=self.ca, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def create(self, entity_set: str, body: dict[str, Any]) -> str:
        resp = self.post(entity_set, json=body)
        assert resp.status_code == 204, resp.text
        match = GUID.search(resp.headers["OData-EntityId"])
        assert match
        return match.group(0)

    def control(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.origin}/_sandbox/{path}", verify=self.ca, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataverse]:
    pki = SandboxPKI.ensure(tmp_path_factory.mktemp("pki"))
    context = pki.server_context()
    entra = EntraEmulator()
    client_id, secret = entra.add_client()
    entra_server = EmulatorServer(entra, context).start()
    emulator = Dynamics365Emulator(entra)
    dataverse_server = EmulatorServer(emulator, context).start()
    try:
        entra.register_resource(emulator.audience())
        resp = requests.post(
            f"{entra_server.origin}/{entra.config.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
                "scope": f"{dataverse_server.origin}/.default",
            },
            verify=str(pki.ca_cert),
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        yield Dataverse(
            emulator,
            dataverse_server.origin,
            entra_server.origin,
            entra.config.tenant_id,
            str(pki.ca_cert),
            resp.json()["access_token"],
        )
    finally:
        dataverse_server.stop()
        entra_server.stop()


@pytest.fixture
def dv(server: Dataverse) -> Iterator[Dataverse]:
    server.emulator.reset()
    yield server
    server.emulator.reset()


def error_of(resp: requests.Response) -> tuple[str, str]:
    err = resp.json()["error"]
    return err["code"], err["message"]


def opportunity(name: str = "Contoso - Azure migration", **extra: Any) -> dict[str, Any]:
    return {"name": name, "estimatedvalue": 125000.5, "estimatedclosedate": "2026-09-30", **extra}


# ---------------------------------------------------------------------------
# $batch helpers, written from the documented wire format


@dataclass
class Part:
    status: int
    headers: dict[str, str]
    body: Any
    content_id: str | None


def http_part(method: str, url: str, body: dict[str, Any] | None = None, content_id: str | None = None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{method} {url} HTTP/1.1"]
    if body is not None:
        lines += ["Content-Type: application/json; type=entry", "", json.dumps(body)]
    else:
        lines += ["", ""]
    return "\r\n".join(lines)


def batch_body(items: list[str | list[str]], boundary: str = "batch_test") -> str:
    out = []
    for item in items:
        out.append(f"--{boundary}")
        if isinstance(item, list):
            cs = f"changeset_{uuid.uuid4().hex}"
            out += [f"Content-Type: multipart/mixed; boundary={cs}", ""]
            for part in item:
                out += [f"--{cs}", part]
            out.append(f"--{cs}--")
        else:
            out.append(item)
    out += [f"--{boundary}--", ""]
    return "\r\n".join(out)


def send_batch(dv: Dataverse, body: str, *, continue_on_error: bool = False) -> requests.Response:
    headers = {"Content-Type": "multipart/mixed; boundary=batch_test"}
    if continue_on_error:
        headers["Prefer"] = "odata.continue-on-error"
    return dv.post("$batch", data=body.encode(), headers=headers)


def _boundary(content_type: str) -> str:
    match = re.search(r"boundary=([^;\s]+)", content_type)
    assert match, content_type
    return match.group(1)


def _sections(body: str, boundary: str) -> list[str]:
    assert body.endswith(f"--{boundary}--\r\n"), body[-200:]
    chunks = body.split(f"--{boundary}")
    assert chunks[0] == ""
    return [c[2:] for c in chunks[1:-1]]  # strip the CRLF after each delimiter


def _http(text: str, content_id: str | None) -> Part:
    head, _, body = text.partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .+", status_line)
    assert match, status_line
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert body.endswith("\r\n")  # the line break before the next delimiter
    body = body[:-2]
    return Part(int(match.group(1)), headers, json.loads(body) if body else None, content_id)


def parse_parts(resp: requests.Response) -> list[Part | list[Part]]:
    text = resp.content.decode()
    assert "\n" not in text.replace("\r\n", ""), "only CRLF line endings"
    out: list[Part | list[Part]] = []
    for section in _sections(text, _boundary(resp.headers["Content-Type"])):
        head, _, rest = section.partition("\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.split("\r\n"))
        if headers["Content-Type"].startswith("multipart/mixed"):
            inner_boundary = _boundary(headers["Content-Type"])
            assert inner_boundary.startswith("changesetresponse_")
            parts = []
            for inner in _sections(rest, inner_boundary):
                inner_head, _, inner_rest = inner.partition("\r\n\r\n")
                inner_headers = dict(line.split(": ", 1) for line in inner_head.split("\r\n"))
                assert inner_headers["Content-Transfer-Encoding"] == "binary"
                parts.append(_http(inner_rest, inner_headers.get("Content-ID")))
            out.append(parts)
        else:
            assert headers == {"Content-Type": "application/http", "Content-Transfer-Encoding": "binary"} or (
                "Content-ID" in headers
            )
            out.append(_http(rest, headers.get("Content-ID")))
    return out


# ---------------------------------------------------------------------------
# Auth, headers, WhoAmI


def test_401_without_or_with_a_foreign_token(dv: Dataverse) -> None:
    resp = requests.get(f"{dv.api}/opportunities", verify=dv.ca, timeout=30)
    assert resp.status_code == 401
    assert resp.content == b""
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith(f"Bearer authorization_uri={dv.entra_origin}/{dv.tenant}/oauth2/authorize")
    assert f"resource_id={dv.origin}/" in challenge
    assert dv.get("opportunities", token="not.a.token").status_code == 401


def test_every_response_carries_req_id_and_odata_version(dv: Dataverse) -> None:
    ok = dv.get("WhoAmI")
    assert ok.status_code == 200
    body = ok.json()
    assert body["@odata.context"].endswith("/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
    assert GUID.fullmatch(body["UserId"]) and GUID.fullmatch(body["OrganizationId"])
    assert ok.headers["Content-Type"] == "application/json; odata.metadata=minimal"
    bad = dv.get("nosuchset")
    assert bad.status_code == 404 and error_of(bad) == ("0x8006088a", "Resource not found for the segment 'nosuchset'.")
    for resp in (ok, bad):
        assert GUID.fullmatch(resp.headers["REQ_ID"])
        assert resp.headers["OData-Version"] == "4.0"
    # Missing OData-Version/Accept headers are tolerated.
    bare = requests.get(f"{dv.api}/WhoAmI", headers={"Authorization": f"Bearer {dv.token}"}, verify=dv.ca, timeout=30)
    assert bare.status_code == 200


# ---------------------------------------------------------------------------
# Reads


def test_paging_over_5000_rows_follows_an_opaque_nextlink(dv: Dataverse) -> None:
    ids = dv.emulator.seed(opportunities=5200, accounts=20, seed=3)["opportunities"]
    seen: list[str] = []
    url: str | None = "opportunities?$select=name&$count=true"
    pages = []
    while url:
        resp = dv.get(url, headers={"Prefer": "odata.maxpagesize=2000"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["Preference-Applied"] == "odata.maxpagesize=2000"
        body = resp.json()
        assert body["@odata.count"] == 5000  # the count stops at 5,000
        assert set(body["value"][0]) == {"@odata.etag", "name", "opportunityid"}
        pages.append(len(body["value"]))
        seen += [row["opportunityid"] for row in body["value"]]
        url = body.get("@odata.nextLink")
        if url:
            query = parse_qs(urlsplit(url).query)
            assert query["$select"] == ["name"] and "$skiptoken" in query
            assert unquote(query["$skiptoken"][0]).startswith("<cookie pagenumber=")
    assert pages == [2000, 2000, 1200]
    assert len(seen) == len(set(seen)) == 5200 and set(seen) == set(ids)

    first = dv.get("opportunities?$select=name").json()  # no preference: 5,000 per page
    assert len(first["value"]) == 5000 and "@odata.nextLink" in first
    link = first["@odata.nextLink"]
    rest = dv.get(link).json()
    assert len(rest["value"]) == 200 and "@odata.nextLink" not in rest

    # The nextLink is opaque: editing the query or the token is refused.
    tampered = dv.get(link.replace("$select=name", "$select=name,estimatedvalue"))
    assert tampered.status_code == 400 and error_of(tampered)[0] == "0x80060888"
    token = parse_qs(urlsplit(link).query)["$skiptoken"][0]
    forged = token.replace('pagenumber="2"', 'pagenumber="3"').replace('pagingcookie="e', 'pagingcookie="f')
    assert dv.get("opportunities", params={"$select": "name", "$skiptoken": forged}).status_code == 400


def test_top_limits_rows_and_is_ignored_with_maxpagesize(dv: Dataverse) -> None:
    dv.emulator.seed(opportunities=30, accounts=3, seed=1)
    top = dv.get("opportunities?$top=7").json()
    assert len(top["value"]) == 7 and "@odata.nextLink" not in top
    both = dv.get("opportunities?$top=7", headers={"Prefer": "odata.maxpagesize=10"})
    assert len(both.json()["value"]) == 10 and "@odata.nextLink" in both.json()  # $top is ignored (documented)
    too_big = dv.get("opportunities", headers={"Prefer": "odata.maxpagesize=9000"})
    assert "Preference-Applied" not in too_big.headers and len(too_big.json()["value"]) == 30


def test_skip_and_unknown_options_are_rejected(dv: Dataverse) -> None:
    resp = dv.get("opportunities?$skip=10")
    assert resp.status_code == 400
    assert error_of(resp) == ("0x80060888", "The query parameter $skip is not supported")
    assert dv.get("opportunities?$top=-1").status_code == 400
    assert dv.get("opportunities?$filter=name eq 'a'&$filter=name eq 'b'").status_code == 400


def test_select_filter_orderby_and_count(dv: Dataverse) -> None:
    account = dv.create("accounts", {"name": "Fabrikam", "address1_country": "DE"})
    for name, value in (("Contoso alpha", 10), ("CONTOSO beta", 30), ("Northwind", 20), ("contoso gamma", 5)):
        dv.create(
            "opportunities",
            opportunity(name, estimatedvalue=value, **{"parentaccountid@odata.bind": f"/accounts({account})"}),
        )
    resp = dv.get(
        "opportunities",
        params={
            "$select": "name,estimatedvalue,_parentaccountid_value",
            "$filter": "contains(name,'contoso') and estimatedvalue ge 10",
            "$orderby": "estimatedvalue desc",
            "$count": "true",
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["@odata.context"].endswith("$metadata#opportunities(name,estimatedvalue,_parentaccountid_value)")
    assert body["@odata.count"] == 2
    assert [r["name"] for r in body["value"]] == ["CONTOSO beta", "Contoso alpha"]  # case-insensitive contains
    assert all(r["_parentaccountid_value"] == account for r in body["value"])
    assert all(r["@odata.etag"].startswith('W/"') for r in body["value"])
    by_lookup = dv.get("opportunities", params={"$filter": f"_parentaccountid_value eq {account}"}).json()["value"]
    assert len(by_lookup) == 4
    count = dv.get("opportunities/$count", params={"$filter": "estimatedvalue lt 25"})
    assert (count.status_code, count.text, count.headers["Content-Type"]) == (200, "3", "text/plain")
    active = dv.get("accounts", params={"$filter": "statecode eq 0", "$select": "name,statecode,statuscode"})
    assert [(r["name"], r["statecode"], r["statuscode"]) for r in active.json()["value"]] == [("Fabrikam", 0, 1)]

    unknown = dv.get("opportunities?$select=name,nosuch")
    assert error_of(unknown) == (
        "0x80060888",
        "Could not find a property named 'nosuch' on type 'Microsoft.Dynamics.CRM.opportunity'.",
    )
    assert error_of(dv.get("opportunities?$select=Name"))[0] == "0x80060888"  # names are case-sensitive
    assert error_of(dv.get("opportunities?$filter=Name eq 'x'"))[0] == "0x80060888"
    assert error_of(dv.get("opportunities?$select=parentaccountid"))[0] == "0x80060888"  # use _x_value
    syntax = dv.get("opportunities?$filter=name eqq 'x'")
    assert syntax.status_code == 400 and error_of(syntax)[0] == "0x80060888"
    assert dv.get("opportunities?$orderby=nosuch").status_code == 400


def test_filter_literal_with_quote_and_parenthesis_matches_exactly(dv: Dataverse) -> None:
    tricky = "O'Brien & Daughters (Ltd) 50% + more"
    dv.create("accounts", {"name": tricky})
    dv.create("accounts", {"name": "Other"})

    def literal(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    found = dv.get("accounts", params={"$filter": f"name eq {literal(tricky)}"}).json()["value"]
    assert [r["name"] for r in found] == [tricky]
    injection = "x' or name ne 'zz"
    assert dv.get("accounts", params={"$filter": f"name eq {literal(injection)}"}).json()["value"] == []
    unescaped = dv.get("accounts", params={"$filter": f"name eq '{injection}'"}).json()["value"]
    assert len(unescaped) == 2  # what the doubled quotes prevented


def test_retrieve_by_id_and_alternate_key_and_conditional_get(dv: Dataverse) -> None:
    row_id = dv.create("opportunities", opportunity(cosell_referralid="REF-'1'"))
    by_id = dv.get(f"opportunities({row_id})?$select=name,cosell_referralid")
    assert by_id.status_code == 200
    body = by_id.json()
    assert body["@odata.context"].endswith("$metadata#opportunities(name,cosell_referralid)/$entity")
    assert by_id.headers["ETag"] == body["@odata.etag"]
    by_key = dv.get("opportunities(cosell_referralid='ref-''1''')")  # quotes doubled; keys are case-insensitive
    assert by_key.status_code == 200 and by_key.json()["opportunityid"] == row_id
    assert dv.get(f"opportunities({row_id})", headers={"If-None-Match": body["@odata.etag"]}).status_code == 304
    missing = str(uuid.uuid4())
    resp = dv.get(f"opportunities({missing})")
    assert resp.status_code == 404
    assert error_of(resp) == ("0x80040217", f"Entity 'opportunity' With Id = {missing} Does Not Exist")
    resp = dv.get("opportunities(cosell_referralid='nope')")
    assert resp.status_code == 404
    assert error_of(resp) == (
        "0x80060891",
        "A record with the specified key values does not exist in opportunity entity",
    )


# ---------------------------------------------------------------------------
# Change tracking


def test_change_tracking_initial_then_delta_with_update_create_and_delete(dv: Dataverse) -> None:
    a, b, c = (dv.create("opportunities", opportunity(f"Deal {n}")) for n in "abc")
    initial = dv.get("opportunities?$select=name", headers={"Prefer": "odata.track-changes"})
    assert initial.status_code == 200
    assert initial.headers["Preference-Applied"] == "odata.track-changes"
    body = initial.json()
    assert {r["opportunityid"] for r in body["value"]} == {a, b, c}
    delta_link = body["@odata.deltaLink"]
    assert delta_link.startswith(f"{dv.api}/opportunities?$select=name&$deltatoken=")

    assert dv.patch(f"opportunities({a})", json={"name": "Deal a v2"}, headers={"If-Match": "*"}).status_code == 204
    d = dv.create("opportunities", opportunity("Deal d"))
    assert dv.delete(f"opportunities({b})").status_code == 204
    dv.emulator.edit("opportunities", c, {"description": "edited in the CRM"})
    gone = dv.emulator.create("opportunities", opportunity("created and deleted"))["opportunityid"]
    dv.emulator.delete("opportunities", gone)

    delta = dv.get(delta_link)
    assert delta.status_code == 200, delta.text
    changes = delta.json()
    assert changes["@odata.context"].endswith("$metadata#opportunities(name)/$delta")
    value = changes["value"]
    upserted = [r for r in value if "reason" not in r]
    deleted = [r for r in value if r.get("reason") == "deleted"]
    assert {r["opportunityid"] for r in upserted} == {a, c, d}
    assert next(r for r in upserted if r["opportunityid"] == a)["name"] == "Deal a v2"
    assert value[-len(deleted) :] == deleted  # deleted rows come last
    assert {r["id"] for r in deleted} == {b, gone}
    assert all(r["@odata.context"] == f"{dv.api}/$metadata#opportunities/$deletedEntity" for r in deleted)

    again = dv.get(changes["@odata.deltaLink"]).json()
    assert again["value"] == [] and "@odata.deltaLink" in again


def test_change_tracking_pages_a_large_initial_load_and_delta(dv: Dataverse) -> None:
    dv.emulator.seed(opportunities=25, accounts=2, seed=5)
    prefer = {"Prefer": "odata.track-changes, odata.maxpagesize=10"}
    first = dv.get("opportunities?$select=name", headers=prefer)
    assert first.headers["Preference-Applied"] == "odata.track-changes, odata.maxpagesize=10"
    pages, url, rows = 0, None, 0
    body = first.json()
    while True:
        pages += 1
        rows += len(body["value"])
        if "@odata.nextLink" not in body:
            break
        assert "@odata.deltaLink" not in body
        assert 'istracking="True"' in unquote(body["@odata.nextLink"])
        url = body["@odata.nextLink"]
        body = dv.get(url, headers=prefer).json()
    assert (pages, rows) == (3, 25) and "@odata.deltaLink" in body
    for row in dv.emulator.rows("opportunities")[:12]:
        dv.emulator.edit("opportunities", row["opportunityid"], {"salesstage": 3})
    delta = dv.get(body["@odata.deltaLink"], headers=prefer).json()
    assert len(delta["value"]) == 10 and "@odata.nextLink" in delta and "@odata.deltaLink" not in delta
    tail = dv.get(delta["@odata.nextLink"], headers=prefer).json()
    assert len(tail["value"]) == 2 and "@odata.deltaLink" in tail


def test_change_tracking_rejects_filter_orderby_top_and_expired_tokens(dv: Dataverse) -> None:
    prefer = {"Prefer": "odata.track-changes"}
    for option, value in (("$filter", "name eq 'x'"), ("$orderby", "name"), ("$top", "5")):
        resp = dv.get("opportunities", params={option: value}, headers=prefer)
        assert resp.status_code == 400
        assert error_of(resp)[1] == f'The "{option}" query parameter isn\'t supported when Change Tracking is enabled.'
    link = dv.get("opportunities?$select=name", headers=prefer).json()["@odata.deltaLink"]
    assert dv.get(link).status_code == 200
    assert dv.control("POST", "limits", json={"delta_token_lifetime_seconds": 0}).status_code == 200
    time.sleep(1.1)
    expired = dv.get(link)
    assert expired.status_code == 400
    assert error_of(expired) == (
        "0x80044352",
        "Version stamp associated with the client has expired. Please perform a full sync.",
    )
    dv.emulator.reset()
    assert dv.get(link).status_code == 400  # a reset invalidates older tokens


# ---------------------------------------------------------------------------
# Writes


def test_post_answers_204_with_entity_id_or_201_with_the_representation(dv: Dataverse) -> None:
    plain = dv.post("opportunities", json=opportunity())
    assert plain.status_code == 204 and plain.content == b""
    assert re.fullmatch(rf"{re.escape(dv.api)}/opportunities\({GUID.pattern}\)", plain.headers["OData-EntityId"])
    chosen = str(uuid.uuid4())
    rep = dv.post(
        "opportunities?$select=name,statecode,statuscode,_transactioncurrencyid_value",
        json=opportunity("With id", opportunityid=chosen),
        headers={"Prefer": "return=representation"},
    )
    assert rep.status_code == 201, rep.text
    assert "OData-EntityId" not in rep.headers
    assert rep.headers["Preference-Applied"] == "return=representation"
    body = rep.json()
    assert body["opportunityid"] == chosen and body["name"] == "With id"
    assert (body["statecode"], body["statuscode"]) == (0, 1)
    assert body["_transactioncurrencyid_value"]  # the base currency by default
    assert set(body) == {
        "@odata.context",
        "@odata.etag",
        "name",
        "statecode",
        "statuscode",
        "_transactioncurrencyid_value",
        "opportunityid",
    }
    again = dv.post("opportunities", json=opportunity(opportunityid=chosen))
    assert again.status_code == 412 and error_of(again)[0] == "0x80040237"


def test_optimistic_concurrency_and_conditional_upsert(dv: Dataverse) -> None:
    row_id = dv.create("opportunities", opportunity())
    etag = dv.get(f"opportunities({row_id})").json()["@odata.etag"]
    assert dv.patch(f"opportunities({row_id})", json={"name": "v2"}, headers={"If-Match": etag}).status_code == 204
    stale = dv.patch(f"opportunities({row_id})", json={"name": "v3"}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert error_of(stale) == (
        "0x80060882",
        "The version of the existing record doesn't match the RowVersion property provided.",
    )
    assert dv.emulator.row("opportunities", row_id)["name"] == "v2"
    assert dv.delete(f"opportunities({row_id})", headers={"If-Match": etag}).status_code == 412

    exists = dv.patch(f"opportunities({row_id})", json={"name": "x"}, headers={"If-None-Match": "*"})
    assert exists.status_code == 412
    assert error_of(exists) == ("0x80040237", "A record with matching key values already exists.")
    fresh = str(uuid.uuid4())
    created = dv.patch(f"opportunities({fresh})", json=opportunity("new"), headers={"If-None-Match": "*"})
    assert created.status_code == 204 and dv.emulator.row("opportunities", fresh)["name"] == "new"

    missing = str(uuid.uuid4())
    update_only = dv.patch(f"opportunities({missing})", json={"name": "x"}, headers={"If-Match": "*"})
    assert update_only.status_code == 404 and error_of(update_only)[0] == "0x80040217"
    assert missing not in {r["opportunityid"] for r in dv.emulator.rows("opportunities")}
    upsert = dv.patch(f"opportunities({missing})", json=opportunity("upserted"), headers={"If-None-Match": "null"})
    assert upsert.status_code == 204 and dv.emulator.row("opportunities", missing)["name"] == "upserted"
    version = dv.emulator.row("opportunities", missing)["versionnumber"]
    updated = dv.patch(f"opportunities({missing})", json={"name": "u2"}, headers={"Prefer": "return=representation"})
    assert updated.status_code == 200 and updated.json()["@odata.etag"] != f'W/"{version}"'
    assert dv.delete(f"opportunities({missing})").status_code == 204
    assert dv.delete(f"opportunities({missing})").status_code == 404


def test_alternate_key_upsert_creates_then_updates(dv: Dataverse) -> None:
    url = "opportunities(cosell_referralid='a1b2-O''Neil')?$select=opportunityid,name,cosell_referralid"
    prefer = {"Prefer": "return=representation"}
    created = dv.patch(url, json=opportunity("First"), headers=prefer)
    assert created.status_code == 201, created.text
    row = created.json()
    assert row["cosell_referralid"] == "a1b2-O'Neil" and row["name"] == "First"
    updated = dv.patch(url, json={"name": "Second", "cosell_referralid": "ignored"}, headers=prefer)
    assert updated.status_code == 200 and updated.json()["opportunityid"] == row["opportunityid"]
    assert updated.json()["cosell_referralid"] == "a1b2-O'Neil"  # key data in the body is dropped on update
    plain = dv.patch("opportunities(cosell_referralid='a1b2-o''neil')", json={"name": "Third"})
    assert plain.status_code == 204
    assert plain.headers["OData-EntityId"].endswith("opportunities(cosell_referralid='a1b2-o''neil')")
    assert len(dv.emulator.rows("opportunities")) == 1
    assert dv.emulator.rows("opportunities")[0]["name"] == "Third"
    dupe = dv.post("opportunities", json=opportunity(cosell_referralid="A1B2-O'NEIL"))
    assert dupe.status_code == 412 and error_of(dupe)[0] == "0x80040237"
    assert dv.patch("accounts(name='x')", json={"name": "y"}).status_code == 400  # no such alternate key


def test_validation_errors_carry_dataverse_codes(dv: Dataverse) -> None:
    missing = dv.post("opportunities", json={"estimatedvalue": 1})
    assert missing.status_code == 400 and error_of(missing)[0] == "0x80044331" and "'name'" in error_of(missing)[1]

    undeclared = dv.post("opportunities", json=opportunity(**{"parentaccount@odata.bind": "/accounts(x)"}))
    assert undeclared.status_code == 400
    code, message = error_of(undeclared)
    assert code == "0x80048d19"
    assert "An undeclared property 'parentaccount' which only has property annotations in the payload" in message

    unknown = dv.post("opportunities", json=opportunity(nosuchcolumn=1))
    code, message = error_of(unknown)
    assert (unknown.status_code, code) == (400, "0x80048d19")
    assert "The property 'nosuchcolumn' does not exist on type 'Microsoft.Dynamics.CRM.opportunity'" in message

    long = dv.post("opportunities", json=opportunity("x" * 301))
    assert error_of(long) == (
        "0x80044331",
        "A validation error occurred.  The length of the 'name' attribute of the 'opportunity' entity exceeded "
        "the maximum allowed length of '300'.",
    )
    choice = dv.post("opportunities", json=opportunity(cosell_howcanmicrosofthelp=7))
    assert choice.status_code == 400 and error_of(choice)[0] == "0x8004431a"
    assert "Accepted Values: 858880000,858880001" in error_of(choice)[1]  # the emulator's publisher prefix

    for bad in ({"estimatedvalue": "lots"}, {"estimatedclosedate": "2026-13-01"}, {"salesstage": "1"}):
        resp = dv.post("opportunities", json=opportunity(**bad))
        assert resp.status_code == 400 and "Cannot convert the literal" in error_of(resp)[1], bad
    negative = dv.post("opportunities", json=opportunity(estimatedvalue=-5))
    assert negative.status_code == 400
    direct = dv.post("opportunities", json=opportunity(_parentaccountid_value=str(uuid.uuid4())))
    assert direct.status_code == 400 and "Use Navigation properties" in error_of(direct)[1]
    assert dv.post("transactioncurrencies", json={"isocurrencycode": "XXX"}).status_code == 403
    assert dv.emulator.rows("opportunities") == []


def test_lookup_binds_and_missing_target(dv: Dataverse) -> None:
    account = dv.create("accounts", {"name": "Contoso", "address1_country": "US"})
    contact = dv.create(
        "contacts", {"lastname": "Smith", "parentcustomerid_account@odata.bind": f"accounts({account})"}
    )
    eur = dv.get("transactioncurrencies", params={"$filter": "isocurrencycode eq 'EUR'"}).json()["value"][0]
    body = opportunity(
        **{
            "parentaccountid@odata.bind": f"/accounts({account})",
            "parentcontactid@odata.bind": f"{dv.api}/contacts({contact})",  # absolute URLs are accepted
            "transactioncurrencyid@odata.bind": f"/transactioncurrencies({eur['transactioncurrencyid']})",
        }
    )
    row_id = dv.create("opportunities", body)
    row = dv.get(f"opportunities({row_id})").json()
    assert row["_parentaccountid_value"] == account and row["_parentcontactid_value"] == contact
    assert row["_transactioncurrencyid_value"] == eur["transactioncurrencyid"]
    assert dv.get(f"contacts({contact})").json()["_parentcustomerid_value"] == account

    ghost = str(uuid.uuid4())
    missing = dv.post("opportunities", json=opportunity(**{"parentaccountid@odata.bind": f"/accounts({ghost})"}))
    assert missing.status_code == 404
    assert error_of(missing) == ("0x80040217", f"Entity 'account' With Id = {ghost} Does Not Exist")
    wrong_set = dv.post("opportunities", json=opportunity(**{"parentaccountid@odata.bind": f"/contacts({contact})"}))
    assert wrong_set.status_code == 400
    cleared = dv.patch(f"opportunities({row_id})", json={"parentaccountid@odata.bind": None})
    assert cleared.status_code == 204 and dv.emulator.row("opportunities", row_id)["_parentaccountid_value"] is None


def test_win_and_lose_actions_and_statecode_rules(dv: Dataverse) -> None:
    won, lost, other = (dv.create("opportunities", opportunity(f"Deal {n}")) for n in range(3))
    patch = dv.patch(f"opportunities({won})", json={"statecode": 1, "statuscode": 3})
    assert patch.status_code == 400
    assert error_of(patch) == (
        "0x80100005",
        "This message can not be used to set the state of opportunity to won. In order to set state of "
        "opportunity to won, use the won message instead.",
    )
    assert dv.post("opportunities", json=opportunity(statecode=2)).status_code == 400
    mismatch = dv.patch(f"opportunities({won})", json={"statuscode": 3})
    assert (
        mismatch.status_code == 400
        and "is not a valid status code for state code OpportunityState.Open" in (error_of(mismatch)[1])
    )

    def close(action: str, row_id: str, status: int) -> requests.Response:
        body = {
            "OpportunityClose": {
                "opportunityid@odata.bind": f"/opportunities({row_id})",
                "subject": "Closed by the test",
                "actualrevenue": 1000,
                "actualend": "2026-06-30",
            },
            "Status": status,
        }
        return dv.post(action, json=body)

    bad_status = close("WinOpportunity", won, 4)
    assert bad_status.status_code == 400 and "OpportunityState.Won" in error_of(bad_status)[1]
    assert close("WinOpportunity", won, 3).status_code == 204
    row = dv.get(f"opportunities({won})?$select=statecode,statuscode,actualvalue,actualclosedate").json()
    assert (row["statecode"], row["statuscode"], row["actualvalue"], row["actualclosedate"]) == (
        1,
        3,
        1000,
        "2026-06-30",
    )
    assert error_of(close("LoseOpportunity", won, 4)) == ("0x80040515", "The opportunity is already closed.")
    assert close("LoseOpportunity", lost, 6).status_code == 400
    assert close("LoseOpportunity", lost, 5).status_code == 204
    assert dv.emulator.row("opportunities", lost)["statecode"] == 2
    ghost = close("WinOpportunity", str(uuid.uuid4()), 3)
    assert ghost.status_code == 404 and error_of(ghost)[0] == "0x80040217"
    assert dv.emulator.row("opportunities", other)["statecode"] == 0

    # Dataverse lets the API edit and reopen a closed opportunity; the sandbox can be made strict.
    assert dv.patch(f"opportunities({won})", json={"description": "post-mortem"}).status_code == 204
    dv.emulator.configure(closed_opportunity_writes="reject")
    refused = dv.patch(f"opportunities({lost})", json={"description": "x"})
    assert refused.status_code == 400 and error_of(refused)[0] == "0x80040515"
    assert dv.patch(f"opportunities({lost})", json={"statecode": 0}).status_code == 204
    assert (
        dv.emulator.row("opportunities", lost)["statecode"],
        dv.emulator.row("opportunities", lost)["statuscode"],
    ) == (0, 1)


# ---------------------------------------------------------------------------
# Bulk operations


def test_create_update_upsert_multiple(dv: Dataverse) -> None:
    kind = "Microsoft.Dynamics.CRM.opportunity"
    created = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{**opportunity(f"Bulk {n}"), "@odata.type": kind} for n in range(3)]},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse")
    ids = body["Ids"]
    assert len(ids) == 3 and {r["opportunityid"] for r in dv.emulator.rows("opportunities")} == set(ids)

    untyped = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{**opportunity("typed"), "@odata.type": kind}, opportunity("untyped")]},
    )
    assert untyped.status_code == 400 and error_of(untyped)[0] == "0x80048d19"
    atomic = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{**opportunity("ok"), "@odata.type": kind}, {**opportunity("x" * 400), "@odata.type": kind}]},
    )
    assert atomic.status_code == 400
    assert len(dv.emulator.rows("opportunities")) == 3  # nothing of the failed calls was kept

    update = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.UpdateMultiple",
        json={"Targets": [{"@odata.type": kind, "opportunityid": i, "salesstage": 2} for i in ids]},
    )
    assert update.status_code == 204
    assert {r["salesstage"] for r in dv.emulator.rows("opportunities")} == {2}
    rollback = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.UpdateMultiple",
        json={
            "Targets": [
                {"@odata.type": kind, "opportunityid": ids[0], "salesstage": 3},
                {"@odata.type": kind, "opportunityid": str(uuid.uuid4()), "salesstage": 3},
            ]
        },
    )
    assert rollback.status_code == 404 and dv.emulator.row("opportunities", ids[0])["salesstage"] == 2

    upsert = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={
            "Targets": [
                {"@odata.type": kind, "@odata.id": "opportunities(cosell_referralid='R-1')", **opportunity("Ref 1")},
                {"@odata.type": kind, "opportunityid": ids[1], "name": "Renamed"},
            ]
        },
    )
    assert upsert.status_code == 204, upsert.text  # UpsertMultiple returns 204 NoContent (documented)
    by_ref = dv.get("opportunities(cosell_referralid='R-1')").json()
    assert by_ref["name"] == "Ref 1"
    again = dv.post(
        "opportunities/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={
            "Targets": [{"@odata.type": kind, "@odata.id": "opportunities(cosell_referralid='R-1')", "name": "Ref 1b"}]
        },
    )
    assert again.status_code == 204
    assert dv.get(f"opportunities({by_ref['opportunityid']})").json()["name"] == "Ref 1b"
    assert dv.emulator.row("opportunities", ids[1])["name"] == "Renamed"
    assert len(dv.emulator.rows("opportunities")) == 4


# ---------------------------------------------------------------------------
# $batch


def test_batch_of_1000_with_one_bad_row_under_continue_on_error(dv: Dataverse) -> None:
    parts = [
        http_part("POST", "/api/data/v9.2/accounts", {"name": "x" * 200 if n == 500 else f"Account {n}"})
        for n in range(1000)
    ]
    resp = send_batch(dv, batch_body(parts), continue_on_error=True)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert resp.headers["Preference-Applied"] == "odata.continue-on-error"
    results = parse_parts(resp)
    assert len(results) == 1000
    statuses = [r.status for r in results if isinstance(r, Part)]
    assert statuses.count(204) == 999 and statuses[500] == 400
    bad = results[500]
    assert isinstance(bad, Part) and bad.body["error"]["code"] == "0x80044331"
    assert GUID.fullmatch(bad.headers["REQ_ID"]) and bad.headers["Content-Type"].startswith("application/json")
    ok = results[0]
    assert isinstance(ok, Part) and ok.headers["OData-Version"] == "4.0"
    assert ok.headers["OData-EntityId"].startswith(f"{dv.api}/accounts(")
    assert len(dv.emulator.rows("accounts")) == 999


def test_batch_without_continue_on_error_stops_at_the_first_failure(dv: Dataverse) -> None:
    body = batch_body(
        [
            http_part("POST", f"{dv.api}/accounts", {"name": "first"}),  # an absolute URL
            http_part("POST", "accounts", {"nosuch": 1}),  # relative to the API root
            http_part("POST", "/api/data/v9.2/accounts", {"name": "never"}),
        ]
    )
    resp = send_batch(dv, body)
    assert resp.status_code == 400
    results = parse_parts(resp)
    assert [r.status for r in results if isinstance(r, Part)] == [204, 400]
    assert [r["name"] for r in dv.emulator.rows("accounts")] == ["first"]  # earlier requests are kept


def test_batch_change_set_is_atomic_and_gets_are_answered(dv: Dataverse) -> None:
    changeset = [
        http_part("POST", "/api/data/v9.2/accounts", {"name": "in change set"}, content_id="1"),
        http_part("POST", "/api/data/v9.2/accounts", {"name": "y" * 161}, content_id="2"),
    ]
    body = batch_body([changeset, http_part("GET", "/api/data/v9.2/accounts?$select=name")])
    resp = send_batch(dv, body, continue_on_error=True)
    assert resp.status_code == 200
    failed, listing = parse_parts(resp)
    assert isinstance(failed, Part) and failed.status == 400  # one error for the whole change set
    assert isinstance(listing, Part) and listing.status == 200 and listing.body["value"] == []
    assert dv.emulator.rows("accounts") == []

    get_in_changeset = batch_body([[http_part("GET", "/api/data/v9.2/accounts", content_id="1")]])
    refused = send_batch(dv, get_in_changeset)
    assert refused.status_code == 400
    assert "invalid HTTP method 'GET'" in parse_parts(refused)[0].body["error"]["message"]  # type: ignore[union-attr]


def test_batch_content_id_references(dv: Dataverse) -> None:
    changeset = [
        http_part("POST", "/api/data/v9.2/accounts", {"name": "Parent"}, content_id="1"),
        http_part(
            "POST",
            "/api/data/v9.2/contacts",
            {"lastname": "Child", "parentcustomerid_account@odata.bind": "$1"},
            content_id="2",
        ),
        http_part("PATCH", "$1", {"address1_city": "Seattle"}, content_id="3"),
    ]
    resp = send_batch(dv, batch_body([changeset]))
    assert resp.status_code == 200, resp.text
    (parts,) = parse_parts(resp)
    assert isinstance(parts, list) and [p.status for p in parts] == [204, 204, 204]
    assert [p.content_id for p in parts] == ["1", "2", "3"]
    account = dv.emulator.rows("accounts")[0]
    assert account["address1_city"] == "Seattle"
    assert dv.emulator.rows("contacts")[0]["_parentcustomerid_value"] == account["accountid"]

    dangling = send_batch(
        dv,
        batch_body(
            [
                [
                    http_part(
                        "POST",
                        "/api/data/v9.2/contacts",
                        {"lastname": "x", "parentcustomerid_account@odata.bind": "$9"},
                        content_id="1",
                    )
                ]
            ]
        ),
    )
    assert dangling.status_code == 400
    error = parse_parts(dangling)[0]
    assert isinstance(error, Part)
    assert error.body["error"]["message"] == "Content-ID Reference: '$9' does not exist in the batch context."


def test_batch_limits_and_wire_format(dv: Dataverse) -> None:
    too_many = batch_body([http_part("GET", "/api/data/v9.2/WhoAmI") for _ in range(1001)])
    resp = send_batch(dv, too_many)
    assert resp.status_code == 400
    assert "1001" in parse_parts(resp)[0].body["error"]["message"]  # type: ignore[union-attr]

    unterminated = batch_body([http_part("GET", "/api/data/v9.2/WhoAmI")]).removesuffix("\r\n")
    resp = send_batch(dv, unterminated)
    assert resp.status_code == 400 and "Stream was not readable" in resp.text

    text = send_batch(dv, batch_body([http_part("GET", "/api/data/v9.2/WhoAmI")])).content.decode()
    boundary = text.split("\r\n", 1)[0]
    assert re.fullmatch(r"--batchresponse_[0-9a-f-]{36}", boundary)
    assert text.startswith(
        f"{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 200 OK\r\n"
    )
    assert text.endswith(f"}}\r\n{boundary}--\r\n")


# ---------------------------------------------------------------------------
# Limits, faults and the control plane


def test_service_protection_limits_answer_429_with_retry_after(dv: Dataverse) -> None:
    limits = dv.control("POST", "limits", json={"requests": 5, "window_seconds": 5})
    assert limits.status_code == 200 and limits.json()["requests"] == 5
    for _ in range(5):
        assert dv.get("WhoAmI").status_code == 200
    throttled = dv.get("WhoAmI")
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= 5
    assert error_of(throttled) == (
        "0x80072322",
        "Number of requests exceeded the limit of 5 over time window of 5 seconds.",
    )
    assert dv.control("GET", "state").status_code == 200  # the control plane is not limited

    dv.emulator.configure_limits(requests=1000, execution_ms=1000, request_cost_ms=600)
    assert dv.get("WhoAmI").status_code == 200 and dv.get("WhoAmI").status_code == 200
    slow = dv.get("WhoAmI")
    assert slow.status_code == 429 and error_of(slow)[0] == "0x80072321"
    assert "Retry-After" in slow.headers


def test_service_protection_window_and_concurrency_rules() -> None:
    now = [1000.0]
    protection = ServiceProtection(clock=lambda: now[0])
    protection.reset(ProtectionLimits(requests=3, window_seconds=10, concurrent=2, execution_ms=10_000))
    first = protection.enter("app")
    second = protection.enter("app")
    with pytest.raises(HTTPError) as concurrent:
        protection.enter("app")  # two in flight already
    assert (concurrent.value.status, concurrent.value.code) == (429, "0x80072326")
    assert protection.enter("other-user")  # limits are per user
    protection.leave("app", first, 5)
    protection.leave("app", second, 5)
    now[0] += 4
    protection.leave("app", protection.enter("app"), 5)
    with pytest.raises(HTTPError) as count:
        protection.enter("app")
    err = count.value
    assert (err.status, err.code, err.headers["Retry-After"]) == (429, "0x80072322", "6")
    now[0] += 6  # the two oldest requests leave the sliding window
    assert protection.enter("app")


def test_bulk_writes_are_atomic_for_concurrent_readers(dv: Dataverse) -> None:
    kind = "Microsoft.Dynamics.CRM.account"
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(len(dv.get("accounts?$select=name").json()["value"]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for attempt in range(3):
            targets = [{"@odata.type": kind, "name": f"Bulk {attempt}-{n}"} for n in range(300)]
            targets[-1]["name"] = "z" * 161  # the last one fails: nothing may be visible, ever
            assert (
                dv.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": targets}).status_code == 400
            )
        good = [{"@odata.type": kind, "name": f"Good {n}"} for n in range(300)]
        assert dv.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": good}).status_code == 200
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert seen <= {0, 300} and 300 in seen


def test_injected_faults_look_like_dataverse(dv: Dataverse) -> None:
    assert dv.control("POST", "faults", json={"rate_429": 1.0, "retry_after": 7}).status_code == 200
    resp = dv.get("WhoAmI")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
    assert error_of(resp)[0] == "0x80072322" and GUID.fullmatch(resp.headers["REQ_ID"])
    dv.control("POST", "faults", json={"rate_5xx": 1.0, "status_5xx": 503})
    unavailable = dv.get("WhoAmI")
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "1"
    dv.control("DELETE", "faults")
    assert dv.get("WhoAmI").status_code == 200


def test_control_plane_seed_state_edit_and_delete(dv: Dataverse) -> None:
    seeded = dv.control("POST", "seed", json={"opportunities": 12, "accounts": 3, "flagged": 4, "seed": 9}).json()
    assert len(seeded["accounts"]) == 3 and len(seeded["opportunities"]) == 12 and seeded["contacts"]
    counts = dv.control("GET", "state").json()["counts"]
    assert counts["opportunities"] == 12 and counts["accounts"] == 3 and counts["transactioncurrencies"] == 11
    rows = dv.control("GET", "tables/opportunities").json()["value"]
    flagged = [r for r in rows if r["cosell_syncwithpartnercenter"]]
    assert len(flagged) == 4
    assert all(
        r["cosell_howcanmicrosofthelp"] and re.fullmatch(r"SOL-\d+-[A-Z]+", r["cosell_solutions"]) for r in flagged
    )
    assert all(r["_parentaccountid_value"] in seeded["accounts"] and r["_transactioncurrencyid_value"] for r in rows)
    account = dv.control("GET", f"tables/accounts/{seeded['accounts'][0]}").json()
    assert account["name"] and account["address1_country"] and account["address1_postalcode"]

    target = seeded["opportunities"][0]
    link = dv.get("opportunities?$select=name", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    before = dv.emulator.row("opportunities", target)["versionnumber"]
    edited = dv.control("POST", f"tables/opportunities/{target}/edit", json={"name": "Edited in CRM", "statecode": 1})
    assert edited.status_code == 200 and edited.json()["versionnumber"] > before
    assert edited.json()["statuscode"] == 3  # a CRM user may close it; the status follows the state
    assert dv.control("DELETE", f"tables/opportunities/{seeded['opportunities'][1]}").status_code == 204
    delta = dv.get(link).json()["value"]
    assert [r.get("name") for r in delta if "reason" not in r] == ["Edited in CRM"]
    assert [r["id"] for r in delta if r.get("reason") == "deleted"] == [seeded["opportunities"][1]]
    assert dv.control("POST", "reset").status_code == 204
    assert dv.control("GET", "state").json()["counts"]["opportunities"] == 0
