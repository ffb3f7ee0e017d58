"""A locally generated PKI for the sandbox.

One root CA signs:

* the TLS certificate every emulator serves (SAN ``127.0.0.1`` and ``localhost``);
* the webhook signing certificate, the sandbox's stand-in for Microsoft's
  ``pcnotifications-dispatch.microsoft.com`` certificate, whose private key signs
  every webhook delivery.

Files are written once into a directory and reused, so that ``cosell-sandbox env``
can print the same ``ca_bundle`` path again and a client that trusted the CA keeps
trusting it across sandbox restarts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "cosell-sync sandbox root CA"
CA_ORGANIZATION = "cosell-sync sandbox"  # the O= of every sandbox certificate, the CA's included
SIGNER_CN = "pcnotifications-dispatch.microsoft.com"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: list[tuple[x509.ExtensionType, bool]],
    days: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class SandboxPKI:
    """Paths of the PEM files that make up the sandbox PKI."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def signer_cert(self) -> Path:
        return self.directory / "webhook-signer.pem"

    @property
    def signer_key(self) -> Path:
        return self.directory / "webhook-signer-key.pem"

    @classmethod
    def ensure(cls, directory: str | os.PathLike[str]) -> SandboxPKI:
        """Create the PKI in ``directory`` unless a complete, unexpired one is already there."""
        pki = cls(Path(directory))
        if pki._complete():
            return pki
        pki.directory.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca_name = _name(CA_NAME, CA_ORGANIZATION)
        ca_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True, extensions=[(ca_usage, True)], days=3650)

        server_key = _key()
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        server = _issue(
            _name("localhost", CA_ORGANIZATION),
            server_key,
            ca_name,
            ca_key,
            ca=False,
            extensions=[(san, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
            days=825,
        )

        signer_key = _key()
        signer = _issue(
            _name(SIGNER_CN, CA_ORGANIZATION),
            signer_key,
            ca_name,
            ca_key,
            ca=False,
            extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False)],
            days=825,
        )

        def write(path: Path, data: bytes, private: bool = False) -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            if private:
                tmp.chmod(0o600)
            tmp.replace(path)

        write(pki.server_key, _pem_key(server_key), private=True)
        write(pki.signer_key, _pem_key(signer_key), private=True)
        write(pki.server_cert, server.public_bytes(serialization.Encoding.PEM))
        write(pki.signer_cert, signer.public_bytes(serialization.Encoding.PEM))
        write(pki.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        return pki

    def _complete(self) -> bool:
        paths = (self.ca_cert, self.server_cert, self.server_key, self.signer_cert, self.signer_key)
        if not all(p.exists() for p in paths):
            return False
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        for cert_path in (self.ca_cert, self.server_cert, self.signer_cert):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.not_valid_after_utc < soon:
                return False
        return True

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting the sandbox CA plus the system roots (for webhook deliveries)."""
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cafile=str(self.ca_cert))
        return ctx

    def signer_private_key(self) -> rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.signer_key.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    def signer_der(self) -> bytes:
        cert = x509.load_pem_x509_certificate(self.signer_cert.read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)
