"""Verification of Partner Center webhook signatures.

A delivery carries ``Authorization: Signature <base64>`` (or ``x-ms-signature``), the
URL of the signing certificate in ``X-MS-Certificate-Url`` and
``X-MS-Signature-Algorithm: rsa-sha256``. The signature is RSA PKCS#1 v1.5 with
SHA-256 over the raw body bytes. The certificate must chain to a configured trust
root before its key is believed.

The checks run in the documented order (:class:`DeliveryVerifier`):

1. the headers are all there (:func:`signature_from_headers`, :func:`certificate_url_from_headers`);
2. the certificate URL is ``https`` on an allowlisted host (:func:`check_certificate_url`),
   and only then is the certificate fetched (:class:`CertificateFetcher`: ``requests`` with
   an explicit ``verify=``, no redirects, a timeout, a size cap, a bounded TTL cache);
3. the certificate is valid now and chains to a trust root (:func:`verify_chain`), through
   intermediates that came with it or, when enabled, were fetched from its Authority
   Information Access "CA Issuers" URL (an intermediate is believed only because a trust
   root signed it, so the transport it came over does not matter); and its issuer holds
   the configured organisation (``O=Microsoft Corporation`` for Partner Center);
4. the signature over the raw body verifies with the certificate's RSA key (:func:`verify_signature`).

Two exception classes tell the receiver which HTTP status fits: :class:`SignatureError`
(the request is not authenticated: missing or malformed headers, a signature that does
not match) and its subclass :class:`CertificateError` (the certificate offered is not
acceptable: host off the allowlist, not fetchable, not parseable, expired, not from a
trust root, wrong issuer).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from cosell_sync.webhooks.hosts import on_allowed_host, split_https_url

log = logging.getLogger(__name__)

MAX_CHAIN_DEPTH = 4  # intermediates between the signing certificate and a trust root
MAX_CERTIFICATE_URL = 2048


class SignatureError(ValueError):
    """The delivery is not provably from Partner Center; the message says which check failed."""


class CertificateError(SignatureError):
    """The signing certificate offered is not acceptable (where it is, what it is, who issued it)."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def signature_from_headers(headers: Mapping[str, str]) -> bytes:
    """The raw signature bytes from ``Authorization: Signature ...`` or ``x-ms-signature``."""
    algorithm = _header(headers, "X-MS-Signature-Algorithm")
    if algorithm is None or algorithm.strip().lower() != "rsa-sha256":
        raise SignatureError("X-MS-Signature-Algorithm must be rsa-sha256")
    value = _header(headers, "x-ms-signature")
    if value is None:
        auth = _header(headers, "Authorization") or ""
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "signature" or not value.strip():
            raise SignatureError("no 'Authorization: Signature' or 'x-ms-signature' header")
    try:
        signature = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature is not valid base64") from None
    if not signature:
        raise SignatureError("the signature is empty")
    return signature


def certificate_url_from_headers(headers: Mapping[str, str]) -> str:
    """The ``X-MS-Certificate-Url`` header (a :class:`SignatureError` when it is missing or empty)."""
    value = (_header(headers, "X-MS-Certificate-Url") or "").strip()
    if not value:
        raise SignatureError("no X-MS-Certificate-Url header")
    return value


def check_certificate_url(url: str, allowed_hosts: Iterable[str]) -> str:
    """``url`` when it is ``https://`` on a host of ``allowed_hosts`` (exact, case-insensitive; any port)."""
    if len(url) > MAX_CERTIFICATE_URL:
        raise CertificateError("the certificate URL is too long")
    _, host, _ = split_https_url(url, CertificateError, "the certificate URL")
    if not on_allowed_host(host, allowed_hosts, root_dot=True):
        raise CertificateError(f"the certificate host {host!r} is not on the allowlist")
    return url


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in ``data``: one DER certificate (the ``.cer`` Partner Center serves) or a PEM bundle."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CertificateError("the signing certificate cannot be parsed") from None
    if not certs:  # pragma: no cover - cryptography raises on an empty bundle
        raise CertificateError("the signing certificate cannot be parsed")
    return certs


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate in DER (the ``.cer`` Partner Center serves) or PEM (the first of a bundle)."""
    return load_certificates(data)[0]


def load_trust_roots(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    """The certificates of the PEM files ``paths`` (a ``ValueError`` naming a file that is missing or empty)."""
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the webhook trust roots file {str(path)!r}: {exc.strerror}") from None
        try:
            roots.extend(x509.load_pem_x509_certificates(data))
        except ValueError:
            raise ValueError(f"the webhook trust roots file {str(path)!r} holds no PEM certificate") from None
    return roots


def _valid_now(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if issuer.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _next_intermediate(
    cert: x509.Certificate, intermediates: Sequence[x509.Certificate], seen: list[x509.Certificate], now: datetime
) -> x509.Certificate | None:
    for candidate in intermediates:
        if candidate in seen or not _is_ca(candidate) or not _valid_now(candidate, now):
            continue
        if _issued_by(cert, candidate):
            return candidate
    return None


def verify_chain(
    cert: x509.Certificate,
    trust_roots: Sequence[x509.Certificate],
    now: datetime | None = None,
    intermediates: Sequence[x509.Certificate] = (),
) -> list[x509.Certificate]:
    """The certificate is valid now and chains to one of ``trust_roots``; the path (leaf first, root last).

    The path may run through ``intermediates`` (each a time-valid CA certificate); every
    certificate of ``trust_roots`` is an anchor, so a trust-roots file may also pin an
    issuing CA.
    """
    now = now or datetime.now(UTC)
    if not _valid_now(cert, now):
        raise CertificateError("the signing certificate is expired or not yet valid")
    path = [cert]
    current = cert
    for _ in range(MAX_CHAIN_DEPTH + 1):
        for root in trust_roots:
            if _issued_by(current, root) and _valid_now(root, now):
                return [*path, root]
        nxt = _next_intermediate(current, intermediates, path, now)
        if nxt is None:
            break
        path.append(nxt)
        current = nxt
    raise CertificateError("the signing certificate does not chain to a trusted root")


def verify_issuer_organization(cert: x509.Certificate, organization: str) -> None:
    """The certificate's issuer names ``organization`` (``O=...``); an empty ``organization`` skips the check."""
    if not organization:
        return
    orgs = [str(a.value) for a in cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if organization not in orgs:
        raise CertificateError(f"the signing certificate's issuer is not O={organization}")


def verify_signature(body: bytes, signature: bytes, cert: x509.Certificate) -> None:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError("the signing certificate does not hold an RSA key")
    try:
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise SignatureError("the signature does not match the body") from None


def ca_issuers_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) "CA Issuers" URLs of the certificate's Authority Information Access extension."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    ]


# --------------------------------------------------------------------------- fetching and caching


class CertificateFetcher:
    """Downloads certificates with ``requests``: explicit ``verify=``, no redirects, a timeout and a size cap.

    Answers are cached by URL for ``ttl`` seconds (failures for ``negative_ttl``), at most
    ``max_entries`` of them (least recently used first out). ``verify`` is the CA bundle
    path to trust, ``True`` for requests' default (``REQUESTS_CA_BUNDLE`` when set, else
    certifi); it is passed on every request so that it really wins.
    """

    def __init__(
        self,
        *,
        verify: str | bool = True,
        timeout: float = 5.0,
        max_bytes: int = 64 * 1024,
        ttl: float = 3600.0,
        negative_ttl: float = 30.0,
        max_entries: int = 32,
    ) -> None:
        self.verify = verify
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max(1, max_entries)
        self._cache: OrderedDict[str, tuple[float, bytes | CertificateError]] = OrderedDict()
        self._lock = threading.Lock()
        self._session: Any = None

    def get(self, url: str) -> bytes:
        """The bytes at ``url`` (cached); a :class:`CertificateError` when they cannot be had."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(url)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(url)
                if isinstance(hit[1], CertificateError):
                    raise hit[1]
                return hit[1]
        try:
            data: bytes | CertificateError = self.download(url)
            expires = now + self.ttl
        except CertificateError as exc:
            data, expires = exc, now + self.negative_ttl
        with self._lock:
            self._cache[url] = (expires, data)
            self._cache.move_to_end(url)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if isinstance(data, CertificateError):
            raise data
        return data

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def download(self, url: str) -> bytes:
        import requests

        if self._session is None:
            self._session = requests.Session()
        try:
            with self._session.get(
                url, stream=True, timeout=self.timeout, verify=self.verify, allow_redirects=False
            ) as resp:
                if resp.status_code != 200:
                    raise CertificateError(f"fetching the signing certificate answered HTTP {resp.status_code}")
                length = resp.headers.get("Content-Length")
                if length and length.isascii() and length.isdigit() and int(length) > self.max_bytes:
                    raise CertificateError("the signing certificate is too large")
                chunks, size = [], 0
                for chunk in resp.iter_content(8192):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise CertificateError("the signing certificate is too large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except requests.RequestException as exc:
            log.warning("Fetching the webhook signing certificate %s failed: %s", url, type(exc).__name__)
            raise CertificateError("the signing certificate cannot be fetched") from None


class DeliveryVerifier:
    """Every check on a signed delivery, with the certificates cached by the :class:`CertificateFetcher`."""

    def __init__(
        self,
        *,
        allowed_hosts: Iterable[str],
        trust_roots: Sequence[x509.Certificate],
        issuer_organization: str = "Microsoft Corporation",
        fetcher: CertificateFetcher | None = None,
        fetch_intermediates: bool = True,
    ) -> None:
        self.allowed_hosts = tuple(allowed_hosts)
        self.trust_roots = list(trust_roots)
        self.issuer_organization = issuer_organization
        self.fetcher = fetcher or CertificateFetcher()
        self.fetch_intermediates = fetch_intermediates
        self._parsed: OrderedDict[bytes, list[x509.Certificate]] = OrderedDict()
        self._lock = threading.Lock()

    def check_headers(self, headers: Mapping[str, str]) -> tuple[bytes, str]:
        """Step 1 and the allowlist of step 2, before the body is read: (signature, certificate URL)."""
        signature = signature_from_headers(headers)
        url = certificate_url_from_headers(headers)
        return signature, check_certificate_url(url, self.allowed_hosts)

    def _certificates(self, url: str) -> list[x509.Certificate]:
        data = self.fetcher.get(url)
        with self._lock:
            certs = self._parsed.get(data)
        if certs is None:
            certs = load_certificates(data)
            with self._lock:
                self._parsed[data] = certs
                while len(self._parsed) > self.fetcher.max_entries:
                    self._parsed.popitem(last=False)
        return certs

    def certificate(self, url: str, now: datetime | None = None) -> x509.Certificate:
        """The signing certificate at ``url`` once it chains to a trust root and has the right issuer."""
        now = now or datetime.now(UTC)
        leaf, *intermediates = self._certificates(url)
        verify_issuer_organization(leaf, self.issuer_organization)
        fetched = 0
        while True:
            try:
                verify_chain(leaf, self.trust_roots, now, intermediates)
                return leaf
            except CertificateError:
                if not self.fetch_intermediates or fetched >= MAX_CHAIN_DEPTH:
                    raise
                top = self._chain_top(leaf, intermediates, now)
                more = self._fetch_issuer(top, intermediates)
                if more is None:
                    raise
                intermediates.append(more)
                fetched += 1

    @staticmethod
    def _chain_top(leaf: x509.Certificate, intermediates: list[x509.Certificate], now: datetime) -> x509.Certificate:
        path = [leaf]
        while len(path) <= MAX_CHAIN_DEPTH and (nxt := _next_intermediate(path[-1], intermediates, path, now)):
            path.append(nxt)
        return path[-1]

    def _fetch_issuer(self, cert: x509.Certificate, known: list[x509.Certificate]) -> x509.Certificate | None:
        for url in ca_issuers_urls(cert)[:2]:
            try:
                issuer = load_certificate(self.fetcher.get(url))
            except CertificateError:
                continue
            if issuer not in known and issuer.subject == cert.issuer:
                return issuer
        return None

    def verify(self, body: bytes, signature: bytes, certificate_url: str) -> x509.Certificate:
        """Steps 2 to 4 (the URL is already allowlisted): the verified signing certificate."""
        cert = self.certificate(certificate_url)
        verify_signature(body, signature, cert)
        return cert

    def verify_delivery(self, headers: Mapping[str, str], body: bytes) -> x509.Certificate:
        """All four steps for one delivery."""
        signature, url = self.check_headers(headers)
        return self.verify(body, signature, url)
