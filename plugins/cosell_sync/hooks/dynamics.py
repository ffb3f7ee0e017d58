"""Hook for Dynamics 365 (the Dataverse Web API).

Connection (type ``dynamics365``)::

    host  = https://<org>.crm.dynamics.com
    login = <client id>        password = <client secret>
    extra = {"tenant_id": "...", "authority": "https://login.microsoftonline.com", "ca_bundle": "..."}

Authentication is msal client credentials with the scope ``<host>/.default``.
This module holds the connection, token and request plumbing; queries and writes
build on :attr:`DynamicsHook.api`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook

from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks._http import RestClient, RetryPolicy, TrustedSession
from cosell_sync.hooks._msal import authority_url, cached_token, confidential_app, mask

API_PATH = "/api/data/v9.2"
ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


@dataclass(frozen=True)
class DynamicsSettings:
    conn_id: str
    url: str
    client_id: str
    client_secret: str
    tenant_id: str
    authority: str
    ca_bundle: str | None

    @property
    def scope(self) -> str:
        return f"{self.url}/.default"

    @property
    def api_url(self) -> str:
        return self.url + API_PATH

    @classmethod
    def from_connection(cls, conn: Any) -> DynamicsSettings:
        extra: dict[str, Any] = conn.extra_dejson or {}
        host = (conn.host or "").rstrip("/")
        if host and "://" not in host:
            host = "https://" + host
        settings = cls(
            conn_id=conn.conn_id,
            url=host,
            client_id=conn.login or "",
            client_secret=conn.password or "",
            tenant_id=extra.get("tenant_id") or "",
            authority=(extra.get("authority") or "https://login.microsoftonline.com").rstrip("/"),
            ca_bundle=extra.get("ca_bundle") or None,
        )
        if settings.client_secret:
            mask(settings.client_secret)
        where = f"Connection '{settings.conn_id}' (dynamics365)"
        if urlsplit(settings.url).scheme != "https" or not urlsplit(settings.url).hostname:
            raise ConfigurationError(f"{where}: host must be the environment URL, https://<org>.crm.dynamics.com.")
        if not settings.client_id or not settings.client_secret or not settings.tenant_id:
            raise ConfigurationError(f"{where}: set client id (login), client secret (password) and 'tenant_id'.")
        if settings.ca_bundle and not Path(settings.ca_bundle).is_file():
            raise ConfigurationError(f"{where}: ca_bundle '{settings.ca_bundle}' is not a readable file.")
        return settings


class DynamicsHook(BaseHook):
    """Dataverse Web API access with client-credentials tokens, retries and typed errors."""

    conn_name_attr = "dynamics_conn_id"
    default_conn_name = "dynamics_default"
    conn_type = "dynamics365"
    hook_name = "Microsoft Dynamics 365 (Dataverse)"

    def __init__(
        self,
        dynamics_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.dynamics_conn_id = dynamics_conn_id
        self.retry_policy = retry_policy or RetryPolicy()
        self._sleep = sleep

    @cached_property
    def settings(self) -> DynamicsSettings:
        return DynamicsSettings.from_connection(self.get_connection(self.dynamics_conn_id))

    @cached_property
    def session(self) -> requests.Session:
        return TrustedSession(self.settings.ca_bundle)

    def get_token(self, *, force: bool = False) -> str:
        s = self.settings

        def acquire() -> dict[str, Any]:
            app = confidential_app(authority_url(s.authority, s.tenant_id), s.client_id, s.client_secret, self.session)
            return app.acquire_token_for_client(scopes=[s.scope])

        return cached_token((s.authority, s.tenant_id, s.client_id, "app", s.scope), acquire, force)

    @cached_property
    def api(self) -> RestClient:
        return RestClient(
            "Dataverse",
            self.session,
            lambda force: self.get_token(force=force),
            policy=self.retry_policy,
            default_headers=ODATA_HEADERS,
            sleep=self._sleep,
        )

    def get_conn(self) -> RestClient:
        return self.api

    def whoami(self) -> dict[str, Any]:
        return dict(self.api.request("GET", f"{self.settings.api_url}/WhoAmI").json())

    def test_connection(self) -> tuple[bool, str]:
        try:
            me = self.whoami()
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected as application user {me.get('UserId')}."
