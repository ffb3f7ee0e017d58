"""The webhook receiver (issue 6, part 2): security, replay, the inbox, and a real HTTPS delivery.

The app runs in-process through Starlette's TestClient, configured exactly as an Airflow
deployment would be: ``AIRFLOW__COSELL__WEBHOOK_*`` from ``Sandbox.env()`` (what
``cosell-sandbox env`` prints) and ``AIRFLOW_CONN_COSELL_STATE`` pointing at a SQLite file
under tmp_path. Signed bodies come from the sandbox's own signer (the dispatcher's key).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosell_sandbox.partner_center.records import CERT_PATH
from cosell_sandbox.runtime import Sandbox
from cosell_sandbox.tls import CA_ORGANIZATION
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS
from cosell_sync.state import StateStore
from cosell_sync.webhooks.receiver import (
    URL_PREFIX,
    WEBHOOK_PATH,
    EventError,
    ReceiverApp,
    ReceiverSettings,
    create_app,
    parse_event,
)
from tests.helpers import Receiver, issue_certificate

REFERRAL_ID = "3f1c2b9e-8d4a-4c55-9a57-1d2e3f4a5b6c"


# --------------------------------------------------------------------------- fixtures and helpers


def inbox(url: str) -> list[dict]:
    with StateStore(url) as st:
        st.migrate()
        return st.inbox_pending()


def event_body(
    pc: Sandbox, referral_id: str = REFERRAL_ID, event: str = "referral-updated", when: str | None = None
) -> bytes:
    payload = {
        "EventName": event,
        "ResourceUri": f"{pc.origin('partner_center')}/engagements/v1/referrals/{referral_id}",
        "ResourceName": "referral",
        "AuditUri": None,
        "ResourceChangeUtcDate": when or dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
    }
    return json.dumps(payload).encode()


def signed_headers(pc: Sandbox, body: bytes, **overrides: str | None) -> dict[str, str]:
    assert pc.dispatcher is not None
    headers: dict[str, str | None] = {
        "Content-Type": "application/json; charset=utf-8",
        "X-MS-Certificate-Url": pc.origin("partner_center") + CERT_PATH,
        "X-MS-Signature-Algorithm": "rsa-sha256",
        "Authorization": f"Signature {pc.dispatcher.sign(body)}",
    }
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v is not None}


def post(client: TestClient, body: bytes, headers: dict[str, str]):
    return client.post(WEBHOOK_PATH, content=body, headers=headers)


def error_code(resp) -> str:
    return resp.json()["error"]["code"]


class CertServer:
    """An HTTPS server on 127.0.0.1 (an allowlisted host) serving one certificate file."""

    def __init__(self, ssl_context: ssl.SSLContext, data: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-cert")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/cert/signer.cer"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_cert(
    subject_cn: str,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None = None,
    *,
    org: str = CA_ORGANIZATION,
    ca: bool = False,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
    )
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(name, key, issuer, ca=ca, not_before=now - dt.timedelta(days=2), not_after=not_after)
    return cert, key


def rogue_signature(key: rsa.RSAPrivateKey, body: bytes) -> str:
    import base64

    return base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


# --------------------------------------------------------------------------- accepted deliveries


def test_a_real_sandbox_delivery_lands_in_the_inbox(pc: Sandbox, hook, client: TestClient, state_url: str):
    """A delivery the sandbox signed and sent (captured on the wire) is accepted and stored with its referral id."""
    pc.partner_center.seed(5)
    referral_id = next(i for i, d in pc.partner_center.referrals.items() if d["status"] != "Closed")
    wire = Receiver(pc.pki.server_context())
    try:
        hook.create_webhook_registration(wire.url, list(REFERRAL_EVENTS))
        requests.post(
            f"{pc.origin('partner_center')}/_sandbox/referrals/{referral_id}/microsoft-edit",
            json={"action": "update", "changes": {"details": {"notes": "from a Microsoft seller"}}},
            verify=str(pc.pki.ca_cert),
            timeout=10,
        ).raise_for_status()
        wire.wait_for(1)
    finally:
        wire.close()
    headers, body = wire.received[0]

    resp = post(client, body, dict(headers))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "accepted", "eventName": "referral-updated", "referralId": referral_id}
    rows = inbox(state_url)
    assert len(rows) == 1
    row = rows[0]
    assert row["referral_id"] == referral_id
    assert row["event_name"] == "referral-updated"
    assert row["resource_uri"] == json.loads(body)["ResourceUri"]
    assert row["status"] == "pending" and row["change_date"] is not None


def test_x_ms_signature_header_and_every_referral_event_are_accepted(pc: Sandbox, client: TestClient, state_url: str):
    ids = [str(uuid.UUID(int=n + 1)) for n in range(len(REFERRAL_EVENTS))]
    for n, event in enumerate(REFERRAL_EVENTS):
        body = event_body(pc, ids[n], event)
        headers = signed_headers(pc, body)
        headers["x-ms-signature"] = headers.pop("Authorization").removeprefix("Signature ")
        resp = post(client, body, headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "accepted"
    assert [(r["event_name"], r["referral_id"]) for r in inbox(state_url)] == [
        (event, ids[n]) for n, event in enumerate(REFERRAL_EVENTS)
    ]


def test_the_documented_payload_is_accepted_on_a_configured_host(
    pc: Sandbox, monkeypatch: pytest.MonkeyPatch, webhook_env, state_url: str
):
    """The payload as documented (production host, seven fractional digits), once its host is configured."""
    monkeypatch.setenv("AIRFLOW__COSELL__WEBHOOK_RESOURCE_HOSTS", "127.0.0.1, API.PartnerCenter.Microsoft.com")
    payload = {
        "EventName": "related-referral-created",
        "ResourceUri": f"https://api.partnercenter.microsoft.com/engagements/v1/referrals/{REFERRAL_ID}",
        "ResourceName": "referral",
        "AuditUri": None,
        "ResourceChangeUtcDate": "2018-02-17T00:05:39.5485487+00:00",
    }
    body = json.dumps(payload).encode()
    app = create_app()
    try:
        with TestClient(app) as c:
            assert post(c, body, signed_headers(pc, body)).status_code == 200
    finally:
        app.state.runtime.close()
    (row,) = inbox(state_url)
    assert row["referral_id"] == REFERRAL_ID
    assert row["change_date"] == dt.datetime(2018, 2, 17, 0, 5, 39, 548548, tzinfo=dt.UTC)


def test_test_event_is_acknowledged_and_other_events_ignored_without_storing(
    pc: Sandbox, client: TestClient, state_url: str
):
    test = json.dumps(
        {
            "EventName": "test-created",
            "ResourceUri": f"{pc.origin('partner_center')}/webhooks/v1/registration/validationEvents/abc",
            "ResourceName": "test",
            "AuditUri": None,
            "ResourceChangeUtcDate": "2025-01-01T00:00:00+00:00",
        }
    ).encode()
    resp = post(client, test, signed_headers(pc, test))
    assert resp.status_code == 200 and resp.json()["status"] == "acknowledged"
    other = event_body(pc, event="subscription-updated")
    resp = post(client, other, signed_headers(pc, other))
    assert resp.status_code == 200 and resp.json()["status"] == "ignored"
    assert inbox(state_url) == []


def test_validation_event_from_the_sandbox_completes_against_the_receiver(pc, hook, client, state_url):
    """The registration's validation event round trip works once the captured test event is answered 200."""
    wire = Receiver(pc.pki.server_context())
    try:
        hook.create_webhook_registration(wire.url, ["test-created"])
        hook.create_validation_event()
        wire.wait_for(1)
    finally:
        wire.close()
    headers, body = wire.received[0]
    resp = post(client, body, dict(headers))
    assert resp.status_code == 200 and resp.json()["status"] == "acknowledged"


# --------------------------------------------------------------------------- replay


def test_a_redelivered_event_is_stored_once(pc: Sandbox, client: TestClient, state_url: str):
    body = event_body(pc)
    headers = signed_headers(pc, body)
    first = post(client, body, headers)
    again = post(client, body, headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "accepted"
    assert again.json()["status"] == "duplicate"
    # the same event re-serialised (other key order and spacing) is still the same event
    reserialised = json.dumps(dict(reversed(json.loads(body).items())), indent=2).encode()
    third = post(client, reserialised, signed_headers(pc, reserialised))
    assert third.status_code == 200 and third.json()["status"] == "duplicate"
    # a later change of the same referral is a new event
    later = event_body(pc, when="2030-01-01T00:00:00+00:00")
    assert post(client, later, signed_headers(pc, later)).json()["status"] == "accepted"
    rows = inbox(state_url)
    assert [r["referral_id"] for r in rows] == [REFERRAL_ID, REFERRAL_ID]
    assert len({r["dedup_key"] for r in rows}) == 2


def test_concurrent_redeliveries_store_one_row(pc: Sandbox, client: TestClient, state_url: str):
    body = event_body(pc)
    headers = signed_headers(pc, body)
    statuses: list[str] = []

    def send() -> None:
        statuses.append(post(client, body, headers).json()["status"])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(statuses) == ["accepted"] + ["duplicate"] * 7
    assert len(inbox(state_url)) == 1


# --------------------------------------------------------------------------- refused deliveries


def test_unsigned_and_badly_signed_deliveries_get_401(pc: Sandbox, client: TestClient, state_url: str):
    body = event_body(pc)
    cases = {
        "unsigned": signed_headers(pc, body, Authorization=None),
        "no algorithm": signed_headers(pc, body, **{"X-MS-Signature-Algorithm": None}),
        "other algorithm": signed_headers(pc, body, **{"X-MS-Signature-Algorithm": "rsa-sha1"}),
        "bearer": signed_headers(pc, body, Authorization="Bearer abc"),
        "not base64": signed_headers(pc, body, Authorization="Signature %%%not-base64%%%"),
        "no certificate url": signed_headers(pc, body, **{"X-MS-Certificate-Url": None}),
        "signature of another body": signed_headers(pc, body, Authorization=f"Signature {pc.dispatcher.sign(b'{}')}"),
    }
    for case, headers in cases.items():
        resp = post(client, body, headers)
        assert resp.status_code == 401, (case, resp.text)
        assert error_code(resp) == "unauthenticated"
        assert resp.headers["WWW-Authenticate"] == "Signature"
    assert inbox(state_url) == []


def test_a_tampered_body_gets_401(pc: Sandbox, client: TestClient, state_url: str):
    body = event_body(pc)
    headers = signed_headers(pc, body)
    tampered = body.replace(REFERRAL_ID.encode(), b"00000000-0000-0000-0000-000000000000")
    resp = post(client, tampered, headers)
    assert resp.status_code == 401 and "does not match" in resp.json()["error"]["message"]
    resp = post(client, body + b" ", headers)  # even one trailing byte
    assert resp.status_code == 401
    assert inbox(state_url) == []


def test_a_certificate_host_off_the_allowlist_gets_403_without_a_fetch(pc: Sandbox, client: TestClient, monkeypatch):
    fetched: list[str] = []
    monkeypatch.setattr(requests.Session, "get", lambda self, url, **kw: fetched.append(url))
    body = event_body(pc)
    port = pc.origin("partner_center").rsplit(":", 1)[1]
    for url in (
        "https://evil.example/cert/pcnotifications-dispatch.microsoft.com.cer",
        f"https://localhost:{port}{CERT_PATH}",  # same server, a name that is not on the list
        f"http://127.0.0.1:{port}{CERT_PATH}",  # allowlisted host, but not https
        f"https://user@127.0.0.1:{port}{CERT_PATH}",
        "ftp://127.0.0.1/cert.cer",
        "not a url",
    ):
        resp = post(client, body, signed_headers(pc, body, **{"X-MS-Certificate-Url": url}))
        assert resp.status_code == 403, (url, resp.text)
        assert error_code(resp) == "forbidden"
    assert fetched == []


def test_a_certificate_not_from_the_trust_root_gets_403(pc: Sandbox, client: TestClient, state_url: str):
    ca_name = x509.load_pem_x509_certificate(pc.pki.ca_cert.read_bytes()).subject
    body = event_body(pc)
    # 1. self-signed, 2. "issued" by a look-alike of the sandbox CA (same name, another key)
    self_signed, self_key = make_cert("pcnotifications-dispatch.microsoft.com")
    fake_ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    lookalike, lookalike_key = make_cert("pcnotifications-dispatch.microsoft.com", (ca_name, fake_ca_key))
    for cert, key in ((self_signed, self_key), (lookalike, lookalike_key)):
        server = CertServer(pc.pki.server_context(), cert.public_bytes(serialization.Encoding.DER))
        try:
            headers = signed_headers(
                pc,
                body,
                **{"X-MS-Certificate-Url": server.url, "Authorization": f"Signature {rogue_signature(key, body)}"},
            )
            resp = post(client, body, headers)
        finally:
            server.close()
        assert resp.status_code == 403, resp.text
        assert "does not chain to a trusted root" in resp.json()["error"]["message"]
    assert inbox(state_url) == []


def test_a_certificate_that_cannot_be_fetched_gets_403(pc: Sandbox, client: TestClient):
    body = event_body(pc)
    for url in (pc.origin("partner_center") + "/cert/missing.cer", "https://127.0.0.1:1/cert.cer"):
        resp = post(client, body, signed_headers(pc, body, **{"X-MS-Certificate-Url": url}))
        assert resp.status_code == 403, resp.text


def test_an_expired_certificate_or_a_wrong_issuer_gets_403(pc: Sandbox, tmp_path: Path, state_url: str):
    body = event_body(pc)
    ca, ca_key = make_cert("test root", ca=True, org="Test Org")
    roots = tmp_path / "roots.pem"
    roots.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    expired, expired_key = make_cert(
        "signer", (ca.subject, ca_key), not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    )
    settings = ReceiverSettings(
        certificate_hosts=("127.0.0.1",),
        trust_roots=(str(roots),),
        issuer_organization="Test Org",
        ca_bundle=str(pc.pki.ca_cert),
    )
    server = CertServer(pc.pki.server_context(), expired.public_bytes(serialization.Encoding.DER))
    app = create_app(settings)
    try:
        with TestClient(app) as c:
            headers = signed_headers(
                pc,
                body,
                **{
                    "X-MS-Certificate-Url": server.url,
                    "Authorization": f"Signature {rogue_signature(expired_key, body)}",
                },
            )
            resp = post(c, body, headers)
            assert resp.status_code == 403 and "expired" in resp.json()["error"]["message"]
    finally:
        server.close()
        app.state.runtime.close()

    # the genuine sandbox certificate, but the receiver insists on Microsoft as the issuer
    app = create_app(
        ReceiverSettings(
            certificate_hosts=("127.0.0.1",),
            trust_roots=(str(pc.pki.ca_cert),),
            issuer_organization="Microsoft Corporation",
            ca_bundle=str(pc.pki.ca_cert),
        )
    )
    try:
        with TestClient(app) as c:
            resp = post(c, body, signed_headers(pc, body))
            assert resp.status_code == 403 and "O=Microsoft Corporation" in resp.json()["error"]["message"]
    finally:
        app.state.runtime.close()
    assert inbox(state_url) == []


def test_an_oversized_body_gets_413_before_it_is_read(pc: Sandbox, client: TestClient, state_url: str):
    padding_ = "x" * (64 * 1024)
    body = json.dumps({**json.loads(event_body(pc)), "Padding": padding_}).encode()
    resp = post(client, body, signed_headers(pc, body))
    assert resp.status_code == 413 and error_code(resp) == "payloadTooLarge"

    # no Content-Length (chunked): the stream is cut at the cap
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 1024

    resp = client.post(WEBHOOK_PATH, content=chunks(), headers=signed_headers(pc, body))
    assert resp.status_code == 413
    assert inbox(state_url) == []


def test_the_body_cap_is_configurable(pc: Sandbox, monkeypatch: pytest.MonkeyPatch, webhook_env, state_url: str):
    monkeypatch.setenv("AIRFLOW__COSELL__WEBHOOK_MAX_BODY_BYTES", "100")
    app = create_app()
    try:
        with TestClient(app) as c:
            body = event_body(pc)
            assert len(body) > 100
            assert post(c, body, signed_headers(pc, body)).status_code == 413
    finally:
        app.state.runtime.close()


def test_bad_json_and_missing_fields_get_400(pc: Sandbox, client: TestClient, state_url: str):
    origin = pc.origin("partner_center")
    good = json.loads(event_body(pc))
    bodies = {
        "not json": b"{not json",
        "empty": b"",
        "not utf-8": b'{"EventName": "\xff\xfe"}',
        "an array": b"[]",
        "a string": b'"referral-updated"',
        "deeply nested": b"[" * 100_00 + b"]" * 100_00,
        "no EventName": json.dumps({k: v for k, v in good.items() if k != "EventName"}).encode(),
        "no ResourceUri": json.dumps({k: v for k, v in good.items() if k != "ResourceUri"}).encode(),
        "EventName not a string": json.dumps({**good, "EventName": 7}).encode(),
        "ResourceUri not a URL": json.dumps({**good, "ResourceUri": "referrals/abc"}).encode(),
        "ResourceUri with spaces": json.dumps({**good, "ResourceUri": f"{origin}/referrals/a b"}).encode(),
        "path traversal id": json.dumps({**good, "ResourceUri": f"{origin}/referrals/..%2F..%2Fetc"}).encode(),
        "quote in id": json.dumps({**good, "ResourceUri": f"{origin}/referrals/x'or'1'='1"}).encode(),
        "no id": json.dumps({**good, "ResourceUri": f"{origin}/"}).encode(),
        "too long id": json.dumps({**good, "ResourceUri": f"{origin}/referrals/{'a' * 200}"}).encode(),
        "bad date": json.dumps({**good, "ResourceChangeUtcDate": "yesterday"}).encode(),
        "date not a string": json.dumps({**good, "ResourceChangeUtcDate": 12}).encode(),
    }
    for case, body in bodies.items():
        resp = post(client, body, signed_headers(pc, body))
        assert resp.status_code == 400, (case, resp.status_code, resp.text)
        assert error_code(resp) == "invalidRequest", case
    assert inbox(state_url) == []


def test_wrong_method_and_content_type(pc: Sandbox, client: TestClient):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        resp = client.request(method, WEBHOOK_PATH)
        assert resp.status_code == 405, method
        assert resp.headers["Allow"] == "POST"
    body = event_body(pc)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        resp = post(client, body, signed_headers(pc, body, **{"Content-Type": content_type}))
        assert resp.status_code == 415, content_type
    resp = post(client, body, signed_headers(pc, body, **{"Content-Type": None}))  # tolerated
    assert resp.status_code == 200
    assert client.get("/").status_code == 404
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_a_store_that_cannot_write_answers_503_so_partner_center_retries(pc: Sandbox, webhook_env):
    def broken():
        raise sa.exc.OperationalError("connect", {}, Exception("the database is down"))

    app = create_app(store_factory=broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        body = event_body(pc)
        resp = post(c, body, signed_headers(pc, body))
    assert resp.status_code == 503 and resp.headers["Retry-After"]


def test_a_missing_trust_roots_file_answers_503(pc: Sandbox, webhook_env, monkeypatch, tmp_path, state_url):
    monkeypatch.setenv("AIRFLOW__COSELL__WEBHOOK_TRUST_ROOTS", str(tmp_path / "missing.pem"))
    app = create_app()
    with TestClient(app, raise_server_exceptions=False) as c:
        body = event_body(pc)
        resp = post(c, body, signed_headers(pc, body))
    assert resp.status_code == 503 and error_code(resp) == "misconfigured"
    assert "missing.pem" not in resp.text  # the path is logged, not told to the caller


# --------------------------------------------------------------------------- hostile events (issue 12)
#
# Each body below is signed by the sandbox's dispatcher: the signature is valid, so only the
# event checks stand between it and the inbox.


def raw_event(
    pc: Sandbox, resource_uri: str | None = None, *, extra: str = "", referral_id: str = REFERRAL_ID
) -> bytes:
    """An event body written as text, so that it can hold what ``json.dumps`` never writes."""
    uri = (
        resource_uri
        if resource_uri is not None
        else f"{pc.origin('partner_center')}/engagements/v1/referrals/{referral_id}"
    )
    return (
        '{"EventName": "referral-updated", "ResourceUri": ' + json.dumps(uri) + ', "ResourceName": "referral", '
        '"AuditUri": null, "ResourceChangeUtcDate": "2026-11-30T09:00:00.000000+00:00"' + extra + "}"
    ).encode()


def assert_refused(pc: Sandbox, client: TestClient, cases: dict[str, bytes], *, secrets: tuple[str, ...] = ()) -> None:
    """Every signed body in ``cases`` answers 400 invalidRequest, echoing none of ``secrets``."""
    for case, body in cases.items():
        resp = post(client, body, signed_headers(pc, body))
        assert resp.status_code == 400, (case, resp.status_code, resp.text)
        assert error_code(resp) == "invalidRequest", case
        for secret in secrets:
            assert secret not in resp.text, (case, resp.text)


def test_resource_uris_off_the_configured_hosts_get_400_and_are_not_stored(
    pc: Sandbox, client: TestClient, state_url: str, caplog: pytest.LogCaptureFixture
):
    port = pc.origin("partner_center").rsplit(":", 1)[1]
    path = f"/engagements/v1/referrals/{REFERRAL_ID}"
    uris = {
        "another host": f"https://evil.example{path}",
        "a look-alike suffix": f"https://127.0.0.1.evil.example:{port}{path}",
        "localhost for 127.0.0.1": f"https://localhost:{port}{path}",
        # the production host is a default, but this deployment (the sandbox's) configures only its own
        "a default host this deployment replaced": f"https://api.partnercenter.microsoft.com{path}",
        "user info naming the host": f"https://127.0.0.1:{port}@evil.example{path}",
        "user info before the host": f"https://evil.example@127.0.0.1:{port}{path}",
        "a backslash before @": f"https://127.0.0.1:{port}\\@evil.example{path}",
        "plain http": f"http://127.0.0.1:{port}{path}",
        "no host": f"https:///{path}",
        "an empty port": f"https://127.0.0.1:{path}",
        "a port out of range": f"https://127.0.0.1:99999{path}",
        "a trailing-dot host": f"https://127.0.0.1.:{port}{path}",
        "scheme-relative": f"//127.0.0.1:{port}{path}",
    }
    caplog.set_level(logging.WARNING, logger="cosell_sync.webhooks.receiver")
    cases = {case: raw_event(pc, uri) for case, uri in uris.items()}
    assert_refused(pc, client, cases, secrets=("evil.example",))
    assert inbox(state_url) == []
    # logged without the body, the URI or the signature
    refusals = [r.getMessage() for r in caplog.records if "refused (400)" in r.getMessage()]
    assert len(refusals) == len(cases)
    signature = signed_headers(pc, cases["another host"])["Authorization"].removeprefix("Signature ")
    for line in refusals:
        assert "evil.example" not in line and signature not in line and REFERRAL_ID not in line, line


def test_traversal_and_non_canonical_resource_uris_get_400_and_are_not_stored(
    pc: Sandbox, client: TestClient, state_url: str
):
    origin = pc.origin("partner_center")
    uris = {
        "dot-dot segments": f"{origin}/webhooks/v1/../../engagements/v1/referrals/{REFERRAL_ID}",
        "dot-dot after the id": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}/..",
        "dot-dot to another id": f"{origin}/engagements/v1/referrals/x/../{REFERRAL_ID}",
        "a dot segment": f"{origin}/engagements/./v1/referrals/{REFERRAL_ID}",
        "encoded dot-dot": f"{origin}/engagements/v1/%2e%2e/referrals/{REFERRAL_ID}",
        "encoded dot-dot, upper case": f"{origin}/engagements/%2E%2E/v1/referrals/{REFERRAL_ID}",
        "encoded slash in the id": f"{origin}/engagements/v1/referrals/..%2F{REFERRAL_ID}",
        "double-encoded": f"{origin}/engagements/v1/%252e%252e/referrals/{REFERRAL_ID}",
        "encoded id": f"{origin}/engagements/v1/referrals/{REFERRAL_ID.replace('-', '%2D')}",
        "doubled slashes": f"{origin}//engagements/v1/referrals/{REFERRAL_ID}",
        "doubled slash before the id": f"{origin}/engagements/v1/referrals//{REFERRAL_ID}",
        "a trailing slash": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}/",
        "a query": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}?next=../../x",
        "an empty query": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}?",
        "a fragment": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}#../x",
        "the id in the query": f"{origin}/engagements/v1/other?referrals/{REFERRAL_ID}",
        "the id in the fragment": f"{origin}/x#/referrals/{REFERRAL_ID}",
        "path parameters": f"{origin}/engagements/v1/referrals/{REFERRAL_ID};x=1",
        "backslashes": f"{origin}\\engagements\\v1\\referrals\\{REFERRAL_ID}",
        "another resource": f"{origin}/engagements/v1/opportunities/{REFERRAL_ID}",
        "referrals as a prefix": f"{origin}/engagements/v1/myreferrals/{REFERRAL_ID}",
        "a NUL": f"{origin}/engagements/v1/referrals/{REFERRAL_ID}\u0000",
        "non-ASCII": f"{origin}/engagements/v1/r\u0435ferrals/{REFERRAL_ID}",  # a Cyrillic e
    }
    cases = {case: raw_event(pc, uri) for case, uri in uris.items()}
    # JSON escapes decode before any check: "\u002e\u002e" is ".."
    dotdot = raw_event(pc, f"{origin}/engagements/v1/DOTDOT/referrals/{REFERRAL_ID}")
    cases["JSON-escaped dot-dot"] = dotdot.replace(b"DOTDOT", b"\\u002e\\u002e")
    assert_refused(pc, client, cases)
    assert inbox(state_url) == []


def test_referral_ids_that_are_not_guids_get_400_and_are_not_stored(pc: Sandbox, client: TestClient, state_url: str):
    ids = {
        "a name": "abc-123",
        "a number": "12345",
        "braces": "{" + REFERRAL_ID + "}",
        "no hyphens": REFERRAL_ID.replace("-", ""),
        "one digit short": REFERRAL_ID[:-1],
        "one digit long": REFERRAL_ID + "0",
        "not hex": REFERRAL_ID[:-1] + "g",
        "a suffix": REFERRAL_ID + ".json",
        "urn form": "urn:uuid:" + REFERRAL_ID,
    }
    cases = {case: raw_event(pc, referral_id=rid) for case, rid in ids.items()}
    assert_refused(pc, client, cases)
    assert inbox(state_url) == []


def test_non_standard_json_numbers_get_400_and_are_not_stored(pc: Sandbox, client: TestClient, state_url: str):
    cases = {
        "NaN": raw_event(pc, extra=', "Score": NaN'),
        "Infinity": raw_event(pc, extra=', "Score": Infinity'),
        "-Infinity": raw_event(pc, extra=', "Score": -Infinity'),
        "NaN nested": raw_event(pc, extra=', "Extra": {"a": [1, NaN]}'),
        "NaN as AuditUri": raw_event(pc).replace(b'"AuditUri": null', b'"AuditUri": NaN'),
        "a number that overflows to infinity": raw_event(pc, extra=', "Score": 1e999'),
        "a negative one": raw_event(pc, extra=', "Score": -1e400'),
    }
    assert_refused(pc, client, cases)
    assert inbox(state_url) == []


def test_duplicate_keys_get_400_and_are_not_stored(pc: Sandbox, client: TestClient, state_url: str):
    origin = pc.origin("partner_center")
    other = str(uuid.UUID(int=7))
    second_uri = json.dumps(f"{origin}/engagements/v1/referrals/{other}")
    cases = {
        "ResourceUri twice": raw_event(pc, extra=f', "ResourceUri": {second_uri}'),
        "ResourceUri twice, other case": raw_event(pc, extra=f', "resourceUri": {second_uri}'),
        "EventName twice": raw_event(pc, extra=', "EventName": "test-created"'),
        "an unknown key twice": raw_event(pc, extra=', "X": 1, "X": 1'),
        "a nested key twice": raw_event(pc, extra=', "X": {"a": 1, "a": 2}'),
    }
    assert_refused(pc, client, cases, secrets=(other,))
    assert inbox(state_url) == []


def test_the_signature_is_still_checked_before_the_event(pc: Sandbox, client: TestClient, state_url: str):
    """A hostile event that is not signed is 401 (unauthenticated), not 400: no event check runs first."""
    for body in (
        raw_event(pc, extra=', "Score": NaN'),
        raw_event(pc, "https://evil.example/engagements/v1/referrals/" + REFERRAL_ID),
        raw_event(pc, extra=', "X": 1, "X": 2'),
    ):
        resp = post(client, body, signed_headers(pc, body, Authorization=None))
        assert resp.status_code == 401, resp.text
        good = event_body(pc)
        resp = post(client, body, signed_headers(pc, good))  # a valid signature of another body
        assert resp.status_code == 401, resp.text
    assert inbox(state_url) == []


def test_a_valid_event_among_hostile_ones_is_accepted_and_stored_once(pc: Sandbox, client: TestClient, state_url: str):
    origin = pc.origin("partner_center")
    hostile = [
        raw_event(pc, f"https://evil.example/engagements/v1/referrals/{REFERRAL_ID}"),
        raw_event(pc, f"{origin}/engagements/v1/../v1/referrals/{REFERRAL_ID}"),
        raw_event(pc, extra=', "Score": NaN'),
        raw_event(pc, extra=', "ResourceUri": "x"'),
    ]
    body = raw_event(pc)
    answers = []
    for hostile_body in hostile:
        assert post(client, hostile_body, signed_headers(pc, hostile_body)).status_code == 400
        answers.append(post(client, body, signed_headers(pc, body)))
    assert [a.status_code for a in answers] == [200] * len(hostile)
    assert answers[0].json() == {"status": "accepted", "eventName": "referral-updated", "referralId": REFERRAL_ID}
    assert [a.json()["status"] for a in answers[1:]] == ["duplicate"] * (len(hostile) - 1)
    # the sandbox's path, a Referrals API-like path and upper-case hex are all fine
    for uri in (f"{origin}/v1.0/engagements/referrals/{REFERRAL_ID.upper()}", f"{origin}/referrals/{REFERRAL_ID}"):
        other = raw_event(pc, uri)
        assert post(client, other, signed_headers(pc, other)).json()["status"] == "accepted", uri
    rows = inbox(state_url)
    assert [r["referral_id"] for r in rows] == [REFERRAL_ID, REFERRAL_ID.upper(), REFERRAL_ID]


def test_resource_hosts_default_to_the_documented_hosts_and_are_configurable(monkeypatch: pytest.MonkeyPatch):
    for key in [k for k in os.environ if k.startswith("AIRFLOW__COSELL__")]:
        monkeypatch.delenv(key)
    assert ReceiverSettings.from_airflow().resource_hosts == (
        "api.partnercenter.microsoft.com",
        "api.partner.microsoft.com",
    )
    monkeypatch.setenv("AIRFLOW__COSELL__WEBHOOK_RESOURCE_HOSTS", " pc.example.test , 127.0.0.1 ")
    assert ReceiverSettings.from_airflow().resource_hosts == ("pc.example.test", "127.0.0.1")
    good = f"https://api.partnercenter.microsoft.com/engagements/v1/referrals/{REFERRAL_ID}"
    event = parse_event(raw_event_text(good))
    assert event.referral_id == REFERRAL_ID  # the defaults accept the documented payload's host
    with pytest.raises(EventError, match="configured Partner Center host"):
        parse_event(raw_event_text(good), resource_hosts=("pc.example.test",))


def raw_event_text(uri: str) -> bytes:
    return json.dumps({"EventName": "referral-updated", "ResourceUri": uri}).encode()


# --------------------------------------------------------------------------- fuzz


def test_a_few_hundred_random_requests_get_no_5xx(pc: Sandbox, client: TestClient, state_url: str):
    rng = random.Random(20250601)
    origin = pc.origin("partner_center")
    good = event_body(pc)
    cert_urls = [
        origin + CERT_PATH,
        origin + CERT_PATH,
        origin + "/cert/other.cer",
        origin + "/_sandbox/state",  # JSON, not a certificate
        "https://127.0.0.1:1/x.cer",
        "https://evil.example/x.cer",
        "http://127.0.0.1/x.cer",
        "https://[::1/x",
        "https://127.0.0.1:99999/x",
        "//127.0.0.1/x",
        "\u00e9\u00e8".encode(),  # raw non-ASCII header bytes
        "",
    ]

    def random_text(n: int) -> str:
        return "".join(rng.choice(string.printable) for _ in range(n))

    def random_json(depth: int = 0):
        kind = rng.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return rng.randint(-(10**20), 10**20)
        if kind == 1:
            return random_text(rng.randrange(20))
        if kind == 2:
            return rng.choice([None, True, False, 1.5e308, -0.0])
        if kind == 3:
            return "\ud800\u2603\u0000"
        if kind in (4, 5):
            return {random_text(rng.randrange(1, 12)): random_json(depth + 1) for _ in range(rng.randrange(5))}
        return [random_json(depth + 1) for _ in range(rng.randrange(5))]

    def random_body() -> bytes:
        kind = rng.randrange(9)
        if kind == 0:
            return good
        if kind == 1:  # a few flipped bytes
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return bytes(data)
        if kind == 2:
            return rng.randbytes(rng.randrange(200))
        if kind == 3:
            return json.dumps(random_json()).encode()
        if kind == 4:
            doc = json.loads(good)
            doc[rng.choice(list(doc))] = random_json()
            return json.dumps(doc).encode()
        if kind == 5:
            doc = json.loads(good)
            doc["ResourceUri"] = origin + "/referrals/" + random_text(rng.randrange(1, 40))
            return json.dumps(doc).encode()
        if kind == 6:
            return rng.choice([b"[" * 5000, b"1" * 5000, b'{"a":' * 3000, b"\x00" * 50, b"null", b"{}"])
        if kind == 7:
            referral_id = rng.choice(
                ["x", "a.b_c-9", "ref-" + str(rng.random()), str(uuid.UUID(int=rng.getrandbits(128)))]
            )
            return event_body(pc, referral_id, rng.choice(REFERRAL_EVENTS))
        return b"y" * rng.choice([65_536, 65_537, 200_000])

    def random_headers(body: bytes) -> dict[str, str | bytes]:
        headers: dict[str, str | bytes] = {}
        if rng.random() < 0.9:
            headers["Content-Type"] = (
                "application/json; charset=utf-8"
                if rng.random() < 0.8
                else rng.choice(["application/json", "text/plain", "application/x+json", "", "*/*"])
            )
        if rng.random() < 0.95:
            headers["X-MS-Signature-Algorithm"] = (
                "rsa-sha256" if rng.random() < 0.8 else rng.choice(["RSA-SHA256", "rsa-sha1", "", "none"])
            )
        if rng.random() < 0.95:
            headers["X-MS-Certificate-Url"] = cert_urls[0] if rng.random() < 0.6 else rng.choice(cert_urls)
        r = rng.random()
        signed = pc.dispatcher.sign(body)
        if r < 0.6:
            headers["Authorization"] = f"Signature {signed}"
        elif r < 0.7:
            headers["x-ms-signature"] = rng.choice([signed, signed[:-4], random_text(30), ""])
        elif r < 0.9:
            headers["Authorization"] = rng.choice(
                ["Signature", "Signature ", "Bearer x", f"signature {signed}", "Signature " + random_text(40)]
            )
        if rng.random() < 0.1:
            headers["Content-Length"] = rng.choice(["-1", "abc", "99999999999999999999", "0"])
        return headers

    statuses: dict[int, int] = {}
    accepted = 0
    for _ in range(400):
        method = "POST" if rng.random() < 0.9 else rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        body = random_body()
        resp = client.request(method, WEBHOOK_PATH, content=body, headers=random_headers(body))
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (resp.status_code, resp.text)
        if resp.status_code == 200 and resp.json()["status"] == "accepted":
            accepted += 1
    assert sum(statuses.values()) >= 300
    assert {401, 403, 405, 413}.issubset(statuses), statuses
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
    assert len(inbox(state_url)) == accepted


# --------------------------------------------------------------------------- mounted, and over HTTPS


def test_the_plugin_mounts_the_receiver_at_cosell(pc: Sandbox, webhook_env, state_url: str):
    from airflow.api_fastapi.app import init_plugins

    parent = FastAPI()
    init_plugins(parent)  # Airflow's own mounting of every plugin's fastapi_apps
    body = event_body(pc)
    with TestClient(parent) as c:
        resp = c.post(URL_PREFIX + WEBHOOK_PATH, content=body, headers=signed_headers(pc, body))
        assert resp.status_code == 200, resp.text
        assert c.get(URL_PREFIX + WEBHOOK_PATH).status_code == 405
    assert [r["referral_id"] for r in inbox(state_url)] == [REFERRAL_ID]


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_sandbox_delivery_over_https_reaches_a_uvicorn_served_receiver(pc, hook, webhook_env, state_url):
    import uvicorn

    parent = FastAPI()
    parent.mount(URL_PREFIX, ReceiverApp())  # what the plugin gives Airflow's API server
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        parent,
        log_level="warning",
        ssl_certfile=str(pc.pki.server_cert),
        ssl_keyfile=str(pc.pki.server_key),
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        pc.partner_center.seed(10)
        ids = [i for i, d in pc.partner_center.referrals.items() if d["status"] != "Closed"][:3]
        hook.create_webhook_registration(f"https://127.0.0.1:{port}{URL_PREFIX}{WEBHOOK_PATH}", list(REFERRAL_EVENTS))
        for referral_id in ids:
            requests.post(
                f"{pc.origin('partner_center')}/_sandbox/referrals/{referral_id}/microsoft-edit",
                json={"action": "update", "changes": {"details": {"notes": f"note for {referral_id}"}}},
                verify=str(pc.pki.ca_cert),
                timeout=10,
            ).raise_for_status()
        deadline = time.monotonic() + 20
        while not pc.dispatcher.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        deliveries = requests.get(
            f"{pc.origin('partner_center')}/_sandbox/webhooks/deliveries", verify=str(pc.pki.ca_cert), timeout=10
        ).json()["value"]
        assert [d["state"] for d in deliveries] == ["delivered"] * len(ids)
        assert all(d["attempts"][0]["status"] == 200 for d in deliveries)  # first attempt, no retry needed
        # stored before the 200: nothing to wait for
        assert sorted(r["referral_id"] for r in inbox(state_url)) == sorted(ids)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_loading_the_plugin_imports_no_fastapi_and_opens_no_database(tmp_path: Path):
    code = (
        "import sys, cosell_sync.plugin as p\n"
        "app = p.CosellSyncPlugin.fastapi_apps[0]\n"
        "assert app['url_prefix'] == '/cosell', app\n"
        "assert 'fastapi' not in sys.modules and 'cosell_sync.state' not in sys.modules, 'eager import'\n"
    )
    env = {**os.environ, "AIRFLOW_CONN_COSELL_STATE": f"sqlite:///{tmp_path / 'never.db'}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "never.db").exists()
