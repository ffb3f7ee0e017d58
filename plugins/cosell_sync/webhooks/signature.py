"""Verification of Partner Center webhook signatures.

A delivery carries ``Authorization: Signature <base64>`` (or ``x-ms-signature``), the
URL of the signing certificate in ``X-MS-Certificate-Url`` and
``X-MS-Signature-Algorithm: rsa-sha256``. The signature is RSA PKCS#1 v1.5 with
SHA-256 over the raw body bytes. The certificate must chain to a configured trust
root before its key is believed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class SignatureError(ValueError):
    """The delivery is not provably from Partner Center; the message says which check failed."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def signature_from_headers(headers: Mapping[str, str]) -> bytes:
    """The raw signature bytes from ``Authorization: Signature ...`` or ``x-ms-signature``."""
    algorithm = _header(headers, "X-MS-Signature-Algorithm")
    if algorithm is None or algorithm.lower() != "rsa-sha256":
        raise SignatureError("X-MS-Signature-Algorithm must be rsa-sha256")
    value = _header(headers, "x-ms-signature")
    if value is None:
        auth = _header(headers, "Authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "signature" or not value.strip():
            raise SignatureError("no 'Authorization: Signature' or 'x-ms-signature' header")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature is not valid base64") from None


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate in DER (the ``.cer`` Partner Center serves) or PEM."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise SignatureError("the signing certificate cannot be parsed") from None


def verify_chain(cert: x509.Certificate, trust_roots: Sequence[x509.Certificate], now: datetime | None = None) -> None:
    """The certificate is valid now and was issued (signed) directly by one of ``trust_roots``."""
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SignatureError("the signing certificate is expired or not yet valid")
    for root in trust_roots:
        if root.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if root.not_valid_before_utc <= now <= root.not_valid_after_utc:
            return
    raise SignatureError("the signing certificate does not chain to a trusted root")


def verify_signature(body: bytes, signature: bytes, cert: x509.Certificate) -> None:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SignatureError("the signing certificate does not hold an RSA key")
    try:
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise SignatureError("the signature does not match the body") from None
