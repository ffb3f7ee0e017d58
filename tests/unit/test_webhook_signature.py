"""Certificate checks of the webhook verifier: URL allowlist, chains through intermediates, AIA, fetch cache.

No sandbox: certificates are generated here, and downloads go to a plain local HTTP
server or a patched ``download``.
"""

from __future__ import annotations

import base64
import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from cosell_sync.webhooks.signature import (
    CertificateError,
    CertificateFetcher,
    DeliveryVerifier,
    SignatureError,
    ca_issuers_urls,
    check_certificate_url,
    load_certificates,
    load_trust_roots,
    verify_chain,
    verify_issuer_organization,
)
from tests.helpers import issue_certificate

NOW = dt.datetime.now(dt.UTC)
AIA_URL = "http://pki.example/issuing-ca.crt"


def _name(cn: str, org: str = "Microsoft Corporation") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    name: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None = None,
    *,
    ca: bool,
    days: int = 30,
    aia: str | None = None,
) -> x509.Certificate:
    return issue_certificate(name, key, issuer, ca=ca, not_after=NOW + dt.timedelta(days=days), aia=aia)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pki() -> dict:
    """root -> issuing CA -> signer (with an AIA pointing at the issuing CA), and an unrelated root."""
    root_key, issuing_key, signer_key, other_key = _key(), _key(), _key(), _key()
    root = _cert(_name("Test Root"), root_key, ca=True, days=3650)
    issuing = _cert(_name("Test Issuing CA"), issuing_key, (root.subject, root_key), ca=True)
    signer = _cert(
        _name("pcnotifications-dispatch.microsoft.com"),
        signer_key,
        (issuing.subject, issuing_key),
        ca=False,
        aia=AIA_URL,
    )
    other = _cert(_name("Other Root", "Someone Else"), other_key, ca=True)
    return {
        "root": root,
        "issuing": issuing,
        "issuing_key": issuing_key,
        "signer": signer,
        "signer_key": signer_key,
        "other": other,
        "root_key": root_key,
    }


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class _FakeFetcher(CertificateFetcher):
    def __init__(self, files: dict[str, bytes], **kw) -> None:
        super().__init__(**kw)
        self.files = files
        self.downloads: list[str] = []

    def download(self, url: str) -> bytes:
        self.downloads.append(url)
        if url not in self.files:
            raise CertificateError("the signing certificate cannot be fetched")
        return self.files[url]


# --------------------------------------------------------------------------- URL allowlist


@pytest.mark.parametrize(
    "url",
    [
        "https://3psostorageacct.blob.core.windows.net/cert/pcnotifications-dispatch.microsoft.com.cer",
        "https://3PSOSTORAGEACCT.blob.core.windows.net./cert/x.cer",
        "https://3psostorageacct.blob.core.windows.net:443/cert/x.cer",
    ],
)
def test_allowlisted_https_urls_pass(url: str):
    assert check_certificate_url(url, ["3psostorageacct.blob.core.windows.net"]) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://3psostorageacct.blob.core.windows.net/cert/x.cer", "must be https"),
        ("https://evil.example/cert/x.cer", "not on the allowlist"),
        ("https://3psostorageacct.blob.core.windows.net.evil.example/x.cer", "not on the allowlist"),
        ("https://evil.example#@3psostorageacct.blob.core.windows.net/x.cer", "not on the allowlist"),
        ("https://x@3psostorageacct.blob.core.windows.net/x.cer", "no plain host"),
        ("https://3psostorageacct.blob.core.windows.net:99999/x.cer", "malformed"),
        ("https:///x.cer", "no plain host"),
        ("https://3psostorageacct.blob.core.windows.net/" + "a" * 3000, "too long"),
    ],
)
def test_other_urls_are_refused(url: str, message: str):
    with pytest.raises(CertificateError, match=message):
        check_certificate_url(url, ["3psostorageacct.blob.core.windows.net"])


def test_an_empty_allowlist_refuses_everything():
    with pytest.raises(CertificateError):
        check_certificate_url("https://127.0.0.1/x", ["", " "])


# --------------------------------------------------------------------------- chains


def test_chain_through_an_intermediate(pki: dict):
    with pytest.raises(CertificateError, match="does not chain"):
        verify_chain(pki["signer"], [pki["root"]])
    path = verify_chain(pki["signer"], [pki["root"]], intermediates=[pki["other"], pki["issuing"]])
    assert path == [pki["signer"], pki["issuing"], pki["root"]]
    # a pinned issuing CA is an anchor of its own
    assert verify_chain(pki["signer"], [pki["issuing"]]) == [pki["signer"], pki["issuing"]]
    with pytest.raises(CertificateError, match="does not chain"):
        verify_chain(pki["signer"], [pki["other"]], intermediates=[pki["issuing"]])


def test_an_intermediate_must_be_a_valid_ca(pki: dict):
    key = _key()
    not_ca = _cert(pki["issuing"].subject, key, (pki["root"].subject, pki["root_key"]), ca=False)
    leaf = _cert(_name("leaf"), _key(), (not_ca.subject, key), ca=False)
    with pytest.raises(CertificateError, match="does not chain"):
        verify_chain(leaf, [pki["root"]], intermediates=[not_ca])
    later = NOW + dt.timedelta(days=60)  # the issuing CA (30 days) has expired, the root has not
    with pytest.raises(CertificateError):
        verify_chain(pki["signer"], [pki["root"]], now=later, intermediates=[pki["issuing"]])


def test_expired_and_not_yet_valid_leaves(pki: dict):
    with pytest.raises(CertificateError, match="expired or not yet valid"):
        verify_chain(pki["signer"], [pki["issuing"]], now=NOW + dt.timedelta(days=31))
    with pytest.raises(CertificateError, match="expired or not yet valid"):
        verify_chain(pki["signer"], [pki["issuing"]], now=NOW - dt.timedelta(days=2))


def test_issuer_organization(pki: dict):
    verify_issuer_organization(pki["signer"], "Microsoft Corporation")
    verify_issuer_organization(pki["signer"], "")  # disabled
    with pytest.raises(CertificateError, match="O=Contoso"):
        verify_issuer_organization(pki["signer"], "Contoso")
    with pytest.raises(CertificateError):
        verify_issuer_organization(pki["signer"], "Microsoft")  # whole value, not a substring


def test_load_certificates_and_trust_roots(pki: dict, tmp_path):
    assert load_certificates(_der(pki["signer"])) == [pki["signer"]]
    assert load_certificates(_pem(pki["signer"], pki["issuing"])) == [pki["signer"], pki["issuing"]]
    with pytest.raises(CertificateError, match="cannot be parsed"):
        load_certificates(b"not a certificate")
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(_pem(pki["root"], pki["other"]))
    assert load_trust_roots([bundle]) == [pki["root"], pki["other"]]
    with pytest.raises(ValueError, match=r"missing\.pem"):
        load_trust_roots([tmp_path / "missing.pem"])
    (tmp_path / "empty.pem").write_text("nothing here")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        load_trust_roots([tmp_path / "empty.pem"])
    assert ca_issuers_urls(pki["signer"]) == [AIA_URL]
    assert ca_issuers_urls(pki["root"]) == []


# --------------------------------------------------------------------------- the verifier


def _sign(key: rsa.RSAPrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


def _headers(url: str, signature: str) -> dict[str, str]:
    return {
        "X-MS-Certificate-Url": url,
        "X-MS-Signature-Algorithm": "rsa-sha256",
        "Authorization": f"Signature {signature}",
    }


CERT_URL = "https://certs.example/signer.cer"


def test_the_verifier_fetches_a_missing_intermediate_from_aia_and_caches(pki: dict):
    fetcher = _FakeFetcher({CERT_URL: _der(pki["signer"]), AIA_URL: _der(pki["issuing"])})
    verifier = DeliveryVerifier(allowed_hosts=["certs.example"], trust_roots=[pki["root"]], fetcher=fetcher)
    body = b'{"EventName":"referral-updated"}'
    assert verifier.verify_delivery(_headers(CERT_URL, _sign(pki["signer_key"], body)), body) == pki["signer"]
    assert verifier.verify_delivery(_headers(CERT_URL, _sign(pki["signer_key"], body)), body) == pki["signer"]
    assert fetcher.downloads == [CERT_URL, AIA_URL]  # each once: cached
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify_delivery(_headers(CERT_URL, _sign(pki["signer_key"], body)), body + b" ")
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify_delivery(_headers(CERT_URL, _sign(pki["issuing_key"], body)), body)


def test_without_aia_fetching_a_bundle_with_the_chain_still_verifies(pki: dict):
    fetcher = _FakeFetcher(
        {CERT_URL: _der(pki["signer"]), "https://certs.example/bundle.pem": _pem(pki["signer"], pki["issuing"])}
    )
    verifier = DeliveryVerifier(
        allowed_hosts=["certs.example"], trust_roots=[pki["root"]], fetcher=fetcher, fetch_intermediates=False
    )
    with pytest.raises(CertificateError, match="does not chain"):
        verifier.certificate(CERT_URL)
    assert verifier.certificate("https://certs.example/bundle.pem") == pki["signer"]
    assert AIA_URL not in fetcher.downloads


def test_an_aia_certificate_that_is_not_the_issuer_does_not_help(pki: dict):
    fetcher = _FakeFetcher({CERT_URL: _der(pki["signer"]), AIA_URL: _der(pki["other"])})
    verifier = DeliveryVerifier(allowed_hosts=["certs.example"], trust_roots=[pki["root"]], fetcher=fetcher)
    with pytest.raises(CertificateError, match="does not chain"):
        verifier.certificate(CERT_URL)


def test_the_verifier_checks_the_issuer_organisation(pki: dict):
    fetcher = _FakeFetcher({CERT_URL: _der(pki["signer"])})
    verifier = DeliveryVerifier(
        allowed_hosts=["certs.example"], trust_roots=[pki["issuing"]], fetcher=fetcher, issuer_organization="Contoso"
    )
    with pytest.raises(CertificateError, match="O=Contoso"):
        verifier.certificate(CERT_URL)


def test_fetch_failures_are_cached_briefly_and_the_cache_is_bounded(pki: dict, monkeypatch):
    fetcher = _FakeFetcher({f"https://c.example/{i}": _der(pki["signer"]) for i in range(5)}, max_entries=3)
    for _ in range(3):
        with pytest.raises(CertificateError):
            fetcher.get("https://c.example/missing")
    assert fetcher.downloads == ["https://c.example/missing"]
    for i in range(5):
        fetcher.get(f"https://c.example/{i}")
    assert len(fetcher._cache) == 3
    fetcher.get("https://c.example/0")  # evicted, fetched again
    assert fetcher.downloads.count("https://c.example/0") == 2
    fetcher.negative_ttl = 0
    fetcher.clear()
    for _ in range(2):
        with pytest.raises(CertificateError):
            fetcher.get("https://c.example/missing")
    assert fetcher.downloads.count("https://c.example/missing") == 3


# --------------------------------------------------------------------------- real downloads


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/ok":
                self._send(200, b"certificate bytes")
            elif self.path == "/big":
                self._send(200, b"x" * 100_000)
            elif self.path == "/big-unannounced":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"x" * 100_000)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/ok")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(404, b"")

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_downloads_are_capped_and_never_follow_redirects(http_server: str):
    fetcher = CertificateFetcher(max_bytes=64 * 1024, timeout=5)
    assert fetcher.download(f"{http_server}/ok") == b"certificate bytes"
    for path, message in (
        ("/big", "too large"),
        ("/big-unannounced", "too large"),
        ("/redirect", "HTTP 302"),
        ("/missing", "HTTP 404"),
    ):
        with pytest.raises(CertificateError, match=message):
            fetcher.download(f"{http_server}{path}")
    with pytest.raises(CertificateError, match="cannot be fetched"):
        fetcher.download("http://127.0.0.1:1/x")
