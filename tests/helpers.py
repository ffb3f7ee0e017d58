"""Test helpers shared by several test modules."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID
from requests.structures import CaseInsensitiveDict

from cosell_sandbox.dynamics365.choices import HELP_LABELS

_MASKERS = ("airflow.sdk._shared.secrets_masker.secrets_masker", "airflow._shared.secrets_masker.secrets_masker")


def reset_secrets_masker() -> None:
    """Empty Airflow's secrets maskers, as a new task process starts with them.

    The hooks register every access token they get with the masker (``cosell_sync.masking``), and
    the masker recompiles one alternation of every secret it holds on each new one: 50 tokens cost
    55 ms a token, 200 cost 220 ms. A test worker kept gathering them for the whole session (each
    test, and each simulated task process, forgets its cached tokens), and py-spy put a third of
    the suite's CPU in compiling regular expressions. Only maskers already imported are reset:
    pure engine tests never import Airflow."""
    import sys

    for name in _MASKERS:
        module = sys.modules.get(name)
        if module is not None:
            module.reset_secrets_masker()


class Receiver:
    """A local HTTPS endpoint that records deliveries; it can fail the first N of them."""

    def __init__(self, ssl_context: ssl.SSLContext, fail_first: int = 0) -> None:
        self.received: list[tuple[CaseInsensitiveDict, bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append((CaseInsensitiveDict(self.headers.items()), body))
                status = 500 if len(receiver.received) <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}/cosell/webhooks/partner-center"

    def wait_for(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.received) >= count, f"expected {count} deliveries, got {len(self.received)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def issue_certificate(
    name: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None = None,
    *,
    ca: bool,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    aia: str | None = None,
) -> x509.Certificate:
    """A test certificate for ``name``/``key``, self-signed unless ``issuer`` (name, key) is
    given; valid from a day ago for 30 days unless told otherwise; ``aia``: a CA Issuers URL."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if aia:
        desc = x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(aia))
        builder = builder.add_extension(x509.AuthorityInformationAccess([desc]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def with_paths(doc: dict, over: dict) -> dict:
    """``doc`` with each ``"a__b__0__c": value`` of ``over`` set (dicts made as needed,
    digits index lists); returns ``doc``."""
    for path, value in over.items():
        target = doc
        keys = path.split("__")
        for key in keys[:-1]:
            target = target.setdefault(key, {}) if isinstance(target, dict) else target[int(key)]
        target[keys[-1]] = value
    return doc


# A Dataverse org as the pure tests picture it: the shipped mapping names its choices by label,
# and this org's options carry the default publisher's values (100000000 ...).
DV_ORG_CHOICES = {
    "statecode": {"Open": 0, "Won": 1, "Lost": 2},
    "salesstage": {"Qualify": 0, "Develop": 1, "Propose": 2, "Close": 3},
    "cosell_howcanmicrosofthelp": {label: 100000000 + i for i, label in enumerate(HELP_LABELS)},
}


def dynamics_org_mapping():
    """The shipped Dynamics mapping in :data:`DV_ORG_CHOICES`' values."""
    from cosell_sync.engine.mapping import load_mapping, resolve_choices

    return resolve_choices(load_mapping("dynamics365"), DV_ORG_CHOICES)
