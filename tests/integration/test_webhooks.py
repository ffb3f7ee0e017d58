"""Webhook registration through the hook, and signed deliveries from the sandbox."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests
from cryptography import x509

from cosell_sync.errors import ConflictError, ThrottledError
from cosell_sync.hooks.http import RetryPolicy
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook, registration_value
from cosell_sync.webhooks.signature import (
    SignatureError,
    load_certificate,
    signature_from_headers,
    verify_chain,
    verify_signature,
)
from tests.helpers import Receiver


@pytest.fixture
def receiver(pc) -> Iterator[Receiver]:
    r = Receiver(pc.pki.server_context())
    yield r
    r.close()


def test_registration_lifecycle(pc, hook, receiver):
    assert hook.get_webhook_registration() is None
    events = hook.list_webhook_events()
    assert set(REFERRAL_EVENTS) <= set(events) and "test-created" in events

    created = hook.create_webhook_registration(receiver.url, [*REFERRAL_EVENTS, "test-created"])
    assert registration_value(created, "webhookUrl") == receiver.url
    assert set(registration_value(created, "WebhookEvents")) == {*REFERRAL_EVENTS, "test-created"}
    assert registration_value(created, "subscriberId")

    with pytest.raises(ConflictError) as err:
        hook.create_webhook_registration(receiver.url, REFERRAL_EVENTS)
    assert err.value.status == 409 and "PUT" in err.value.message

    updated = hook.update_webhook_registration(receiver.url + "?v=2", ["referral-updated", "test-created"])
    assert registration_value(updated, "WebhookEvents") == ["test-created", "referral-updated"]
    assert registration_value(hook.get_webhook_registration(), "WebhookUrl").endswith("?v=2")


def test_validation_event_completes_and_is_rate_limited(pc, pc_conn, receiver):
    # Fail fast instead of waiting out the (up to 60 s) Retry-After of the rate limit.
    hook = PartnerCenterHook(retry_policy=RetryPolicy(max_retry_after=5))
    hook.create_webhook_registration(receiver.url, ["test-created"])
    correlation_id = hook.create_validation_event()
    deadline = time.monotonic() + 10
    status = {}
    while time.monotonic() < deadline:
        status = hook.get_validation_event(correlation_id)
        if status["status"] == "completed":
            break
        time.sleep(0.05)
    assert status["status"] == "completed"
    assert status["results"][0]["responseCode"] == "OK"
    _, body = receiver.received[0]
    assert b'"EventName": "test-created"' in body

    hook.create_validation_event()  # the second in this minute is allowed
    with pytest.raises(ThrottledError) as err:  # the third is not (2 per minute)
        hook.create_validation_event()
    assert err.value.retry_after and err.value.retry_after > 0


def test_delivery_verifies_against_sandbox_certificate_and_tampering_fails(pc, hook, receiver):
    pc.partner_center.seed(20)
    ids = [i for i, d in pc.partner_center.referrals.items() if d["status"] != "Closed"]
    hook.create_webhook_registration(receiver.url, list(REFERRAL_EVENTS))
    edit = requests.post(
        f"{pc.origin('partner_center')}/_sandbox/referrals/{ids[0]}/microsoft-edit",
        json={"action": "update", "changes": {"details": {"notes": "Microsoft seller note"}}},
        verify=str(pc.pki.ca_cert),
        timeout=10,
    )
    edit.raise_for_status()
    receiver.wait_for(1)
    headers, body = receiver.received[0]

    assert headers["X-MS-Signature-Algorithm"] == "rsa-sha256"
    assert headers["Authorization"].startswith("Signature ")
    cert_resp = requests.get(headers["X-MS-Certificate-Url"], verify=str(pc.pki.ca_cert), timeout=10)
    cert = load_certificate(cert_resp.content)
    root = x509.load_pem_x509_certificate(pc.pki.ca_cert.read_bytes())
    verify_chain(cert, [root])
    signature = signature_from_headers(headers)
    verify_signature(body, signature, cert)  # genuine: no exception

    payload = requests.models.complexjson.loads(body)
    assert payload["EventName"] == "referral-updated"
    assert payload["ResourceUri"].endswith(f"/engagements/v1/referrals/{ids[0]}")

    tampered = body.replace(b"referral-updated", b"referral-created")
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(tampered, signature, cert)
    with pytest.raises(SignatureError, match="does not chain"):
        verify_chain(root, [cert])  # the wrong way round: not issued by a trusted root


def test_failed_deliveries_are_retried_with_backoff(pc, hook):
    r = Receiver(pc.pki.server_context(), fail_first=3)
    try:
        hook.create_webhook_registration(r.url, ["referral-created"])
        resp = requests.post(
            f"{pc.origin('partner_center')}/_sandbox/referrals", json={}, verify=str(pc.pki.ca_cert), timeout=10
        )
        assert resp.status_code == 201
        r.wait_for(4)
        deliveries = requests.get(
            f"{pc.origin('partner_center')}/_sandbox/webhooks/deliveries", verify=str(pc.pki.ca_cert), timeout=10
        ).json()["value"]
        assert len(deliveries) == 1
        assert [a["status"] for a in deliveries[0]["attempts"]] == [500, 500, 500, 200]
        assert deliveries[0]["state"] == "delivered"
        # identical signed body every attempt
        assert len({body for _, body in r.received}) == 1
    finally:
        r.close()


def test_undeliverable_events_stop_after_ten_attempts(pc, hook):
    r = Receiver(pc.pki.server_context(), fail_first=10**6)
    try:
        assert pc.dispatcher is not None
        pc.dispatcher.config.backoff_cap = 0.05
        hook.create_webhook_registration(r.url, ["referral-created"])
        requests.post(
            f"{pc.origin('partner_center')}/_sandbox/referrals", json={}, verify=str(pc.pki.ca_cert), timeout=10
        ).raise_for_status()
        r.wait_for(10)
        time.sleep(0.3)
        assert len(r.received) == 10
        state = requests.get(
            f"{pc.origin('partner_center')}/_sandbox/state", verify=str(pc.pki.ca_cert), timeout=10
        ).json()
        assert state["deliveries"]["parked"] == 1
    finally:
        pc.dispatcher.config.backoff_cap = 60.0
        r.close()


def test_signature_header_variants():
    with pytest.raises(SignatureError, match="rsa-sha256"):
        signature_from_headers({"Authorization": "Signature AAAA"})
    with pytest.raises(SignatureError, match="no 'Authorization"):
        signature_from_headers({"X-MS-Signature-Algorithm": "rsa-sha256", "Authorization": "Bearer x"})
    with pytest.raises(SignatureError, match="base64"):
        signature_from_headers({"X-MS-Signature-Algorithm": "rsa-sha256", "x-ms-signature": "%%%"})
    assert (
        signature_from_headers({"x-ms-signature-algorithm": "RSA-SHA256", "X-MS-Signature": "AAEC"}) == b"\x00\x01\x02"
    )
