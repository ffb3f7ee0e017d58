"""Starts every emulator, owns the sandbox credentials, and renders the Airflow
connections that point at them."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .dynamics365 import Dynamics365Emulator
from .entra import EntraConfig, EntraEmulator
from .partner_center import PartnerCenterEmulator, WebhookDispatcher
from .partner_center.records import CERT_PATH, REFERRALS_PATH, WEBHOOKS_PATH
from .salesforce import SalesforceEmulator
from .server import EmulatorServer
from .tls import CA_ORGANIZATION, SandboxPKI

DEFAULT_HOME = ".sandbox"


def default_home() -> Path:
    return Path(os.environ.get("COSELL_SANDBOX_HOME", DEFAULT_HOME)).resolve()


@dataclass
class Credentials:
    tenant_id: str
    client_id: str
    client_secret: str
    username: str
    password: str
    refresh_token: str
    salesforce_token: str = field(default_factory=lambda: "00D5g000004SbXc!AQ0AQ" + secrets.token_urlsafe(72))

    @classmethod
    def generate(cls) -> Credentials:
        return cls(
            tenant_id=str(uuid.uuid4()),
            client_id=str(uuid.uuid4()),
            client_secret=secrets.token_urlsafe(24),
            username="cosell-sync@sandboxpartner.example",
            password=secrets.token_urlsafe(16),
            refresh_token="0.sandbox." + secrets.token_urlsafe(48),
        )


class Sandbox:
    """All emulators in one process, each on its own HTTPS port on 127.0.0.1."""

    EMULATORS = ("entra", "partner_center", "dynamics365", "salesforce")  # port order from base_port

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        base_port: int = 0,
        ports: Mapping[str, int] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.home = Path(home) if home else default_home()
        self.base_port = base_port
        self.ports = dict(ports or {})
        self.credentials = credentials or Credentials.generate()
        self.pki = SandboxPKI.ensure(self.home / "pki")
        self.entra = EntraEmulator(EntraConfig(tenant_id=self.credentials.tenant_id))
        self._servers: list[EmulatorServer] = []
        self.dispatcher: WebhookDispatcher | None = None
        self.partner_center: PartnerCenterEmulator | None = None
        self.dynamics365: Dynamics365Emulator | None = None
        self.salesforce: SalesforceEmulator | None = None

    def _port(self, name: str) -> int:
        if name in self.ports:
            return self.ports[name]
        return self.base_port + self.EMULATORS.index(name) if self.base_port else 0

    def start(self) -> Sandbox:
        ctx = self.pki.server_context()
        entra_server = EmulatorServer(self.entra, ctx, self._port("entra")).start()
        self._servers.append(entra_server)
        creds = self.credentials
        # The app registration has "Allow public client flows" on: `cosell-sync login` signs in with it.
        self.entra.add_client(creds.client_id, creds.client_secret, public_client_flows=True)
        self.entra.add_user(creds.username, creds.password)
        # The app+user bootstrap: as if the service account had consented once interactively.
        self.entra.issue_refresh_token(creds.client_id, creds.username, token=creds.refresh_token)
        self.dispatcher = WebhookDispatcher(
            self.pki.signer_private_key(), self.pki.client_context(), lambda: self.origin("partner_center") + CERT_PATH
        )
        self.partner_center = PartnerCenterEmulator(self.entra, self.dispatcher)
        self.partner_center.signer_der = self.pki.signer_der()
        self._servers.append(EmulatorServer(self.partner_center, ctx, self._port("partner_center")).start())
        self.dynamics365 = Dynamics365Emulator(self.entra)
        self._servers.append(EmulatorServer(self.dynamics365, ctx, self._port("dynamics365")).start())
        # Dataverse tokens are for the environment URL itself (scope "<host>/.default").
        self.entra.register_resource(self.origin("dynamics365"))
        self.salesforce = SalesforceEmulator(access_token=creds.salesforce_token)
        self._servers.append(EmulatorServer(self.salesforce, ctx, self._port("salesforce")).start())
        return self

    def age(self, seconds: float, *, store: Any = None, dag_ids: Sequence[str] = ()) -> None:
        """Time passes: every emulator's records were stamped ``seconds`` earlier (the servers'
        clocks, their answers' ``Date``, go on as they are), and so were the watermarks ``store``
        (a cosell-sync StateStore) holds for ``dag_ids``: the next run starts ``seconds`` after
        the last one, as far as the data can tell."""
        from datetime import timedelta

        assert self.partner_center is not None and self.dynamics365 is not None and self.salesforce is not None
        for emulator in (self.partner_center, self.dynamics365, self.salesforce):
            emulator.age(seconds)
        for dag_id in dag_ids:
            for side in ("partner_center", "crm", "full_sync"):
                mark = store.get_watermark(dag_id, side)
                if mark is not None:
                    store.set_watermark(dag_id, side, mark - timedelta(seconds=seconds), "aged", allow_backwards=True)

    def reset(self) -> None:
        """Back to a fresh sandbox: no data, no registration, no faults, default token settings."""
        assert self.partner_center is not None and self.dynamics365 is not None and self.salesforce is not None
        self.partner_center.reset()
        self.dynamics365.reset()
        self.salesforce.reset()
        self.entra.reset()
        creds = self.credentials
        self.entra.issue_refresh_token(creds.client_id, creds.username, token=creds.refresh_token)

    def stop(self) -> None:
        if self.dispatcher:
            self.dispatcher.stop()
        for server in self._servers:
            server.stop()
        self._servers.clear()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def origin(self, name: str) -> str:
        for server in self._servers:
            if server.app.name == name:
                return server.origin
        raise KeyError(name)

    # -- connections ---------------------------------------------------------------
    def connections(self) -> dict[str, dict[str, Any]]:
        creds = self.credentials
        pc = self.origin("partner_center")
        return {
            "partner_center_default": {
                "conn_type": "partner_center",
                "login": creds.client_id,
                "password": creds.client_secret,
                "extra": {
                    "tenant_id": creds.tenant_id,
                    "authority": self.origin("entra"),
                    "referrals_url": pc + REFERRALS_PATH,
                    "webhooks_url": pc + WEBHOOKS_PATH,
                    "refresh_token": creds.refresh_token,
                    "ca_bundle": str(self.pki.ca_cert),
                },
            },
            "dynamics365_default": {
                "conn_type": "dynamics365",
                "host": self.origin("dynamics365"),
                "login": creds.client_id,
                "password": creds.client_secret,
                "extra": {
                    "tenant_id": creds.tenant_id,
                    "authority": self.origin("entra"),
                    "ca_bundle": str(self.pki.ca_cert),
                },
            },
            "salesforce_default": {
                "conn_type": "salesforce",
                "extra": {
                    "instance_url": self.origin("salesforce"),
                    "access_token": creds.salesforce_token,
                    "ca_bundle": str(self.pki.ca_cert),
                },
            },
        }

    def webhook_settings(self) -> dict[str, str]:
        """The receiver's ``[cosell] webhook_*`` settings that make it trust sandbox deliveries.

        Only values differ from production: the host that serves the signing certificate,
        the CA it chains to (and that the certificate is fetched over), the issuer's O=, and
        the host its events' ``ResourceUri`` names.
        """
        host = urlsplit(self.origin("partner_center")).hostname or "127.0.0.1"
        return {
            "webhook_certificate_hosts": host,
            "webhook_resource_hosts": host,
            "webhook_trust_roots": str(self.pki.ca_cert),
            "webhook_issuer_organization": CA_ORGANIZATION,
            "webhook_ca_bundle": str(self.pki.ca_cert),
        }

    def env(self) -> dict[str, str]:
        env = {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn) for conn_id, conn in self.connections().items()}
        env.update({f"AIRFLOW__COSELL__{key.upper()}": value for key, value in self.webhook_settings().items()})
        return env

    def state(self) -> dict[str, Any]:
        return {
            "credentials": asdict(self.credentials),
            "origins": {s.app.name: s.origin for s in self._servers},
            "env": self.env(),
            "ca_bundle": str(self.pki.ca_cert),
            "pid": os.getpid(),
        }

    def write_state(self) -> Path:
        path = self.home / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)
        return path


def load_credentials(home: Path) -> Credentials | None:
    path = home / "state.json"
    if not path.exists():
        return None
    return Credentials(**json.loads(path.read_text())["credentials"])


def render_env(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())
