"""Hook for the Microsoft Partner Center Referrals and webhook registration APIs.

Connection (type ``partner_center``)::

    login     = <client id>                  password = <client secret>
    extra     = {"tenant_id": "...",
                 "authority": "https://login.microsoftonline.com",          # default
                 "referrals_url": "https://api.partner.microsoft.com/v1.0/engagements/referrals",
                 "webhooks_url": "https://api.partnercenter.microsoft.com/webhooks/v1",
                 "refresh_token": "...",            # app+user; or "username" + "user_password"
                 "public_client": true,             # the refresh token is a public client's
                 "ca_bundle": "/path/ca.pem"}       # optional

``cosell-sync login partner-center`` stores a device-code sign-in's refresh token with
``public_client``: Entra issued it to the app as a public client, and redeeming it with the
client secret fails (AADSTS700025), so the hook then refreshes it without the secret.

Partner Center accepts app+user tokens only. The referrals API and the webhooks API
are different resources (``api.partner.microsoft.com`` and
``api.partnercenter.microsoft.com``), so the hook holds one token for each, both
obtained from the same user grant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook

from cosell_sync.errors import ConfigurationError, NotFoundError
from cosell_sync.hooks.entra import (
    RefreshTokenStore,
    cached_token,
    fingerprint,
    settings_app,
)
from cosell_sync.hooks.http import RestClient, RetryPolicy, TrustedSession, follow_link
from cosell_sync.hooks.odata import quote, with_query
from cosell_sync.hooks.pool import widen_pool
from cosell_sync.masking import mask

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_REFERRALS_URL = "https://api.partner.microsoft.com/v1.0/engagements/referrals"
DEFAULT_WEBHOOKS_URL = "https://api.partnercenter.microsoft.com/webhooks/v1"
REFERRALS_SCOPE = "https://api.partner.microsoft.com/.default"
WEBHOOKS_SCOPE = "https://api.partnercenter.microsoft.com/.default"
MAX_PAGE_SIZE = 100
REFERRAL_EVENTS = ("referral-created", "referral-updated", "related-referral-created", "related-referral-updated")

_rotation_lock = threading.Lock()


@dataclass(frozen=True)
class PartnerCenterSettings:
    conn_id: str
    client_id: str
    client_secret: str
    tenant_id: str
    authority: str
    referrals_url: str
    webhooks_url: str
    refresh_token: str | None
    username: str | None
    user_password: str | None
    ca_bundle: str | None
    referrals_scope: str
    webhooks_scope: str
    token_store_path: str | None
    public_client: bool = False

    @classmethod
    def from_connection(cls, conn: Any, *, validate: bool = True) -> PartnerCenterSettings:
        """The settings of a ``partner_center`` connection; ``validate=False`` for a connection
        that has no user credential yet (``cosell-sync login`` is about to add one)."""
        extra: dict[str, Any] = conn.extra_dejson or {}
        settings = cls(
            conn_id=conn.conn_id,
            client_id=conn.login or extra.get("client_id") or "",
            client_secret=conn.password or extra.get("client_secret") or "",
            tenant_id=extra.get("tenant_id") or "",
            authority=(extra.get("authority") or DEFAULT_AUTHORITY).rstrip("/"),
            referrals_url=(extra.get("referrals_url") or DEFAULT_REFERRALS_URL).rstrip("/"),
            webhooks_url=(extra.get("webhooks_url") or DEFAULT_WEBHOOKS_URL).rstrip("/"),
            refresh_token=extra.get("refresh_token") or None,
            username=extra.get("username") or None,
            user_password=extra.get("user_password") or None,
            ca_bundle=extra.get("ca_bundle") or None,
            referrals_scope=extra.get("referrals_scope") or REFERRALS_SCOPE,
            webhooks_scope=extra.get("webhooks_scope") or WEBHOOKS_SCOPE,
            token_store_path=extra.get("token_store_path") or None,
            public_client=str(extra.get("public_client", "")).lower() in ("true", "1", "yes"),
        )
        for secret in (settings.client_secret, settings.refresh_token, settings.user_password):
            if secret:
                mask(secret)
        if validate:
            settings.validate()
        return settings

    def validate(self) -> None:
        where = f"Connection '{self.conn_id}' (partner_center)"
        if not self.client_id or not (self.client_secret or (self.public_client and self.refresh_token)):
            raise ConfigurationError(f"{where}: set the client id as login and the client secret as password.")
        if not self.tenant_id:
            raise ConfigurationError(f"{where}: set 'tenant_id' in the extras.")
        if not self.refresh_token and not (self.username and self.user_password):
            raise ConfigurationError(
                f"{where}: Partner Center needs an app+user token; set 'refresh_token', or 'username' and "
                "'user_password' for a service account, in the extras."
            )
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise ConfigurationError(f"{where}: ca_bundle '{self.ca_bundle}' is not a readable file.")
        for name in ("authority", "referrals_url", "webhooks_url"):
            if urlsplit(getattr(self, name)).scheme != "https":
                raise ConfigurationError(f"{where}: '{name}' must be an https:// URL.")


def registration_value(doc: Mapping[str, Any], name: str) -> Any:
    """A registration key whatever its casing (the API uses PascalCase and camelCase)."""
    for key, value in doc.items():
        if key.lower() == name.lower():
            return value
    return None


class PartnerCenterHook(BaseHook):
    """Referrals (list, get, create, replace, patch) and webhook registration, with retries."""

    conn_name_attr = "partner_center_conn_id"
    default_conn_name = "partner_center_default"
    conn_type = "partner_center"
    hook_name = "Microsoft Partner Center"

    def __init__(
        self,
        partner_center_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        token_store: RefreshTokenStore | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.partner_center_conn_id = partner_center_conn_id
        self.retry_policy = retry_policy or RetryPolicy()
        self._token_store = token_store
        self._sleep = sleep

    # -- plumbing -----------------------------------------------------------------------
    @cached_property
    def settings(self) -> PartnerCenterSettings:
        return PartnerCenterSettings.from_connection(self.get_connection(self.partner_center_conn_id))

    @cached_property
    def session(self) -> requests.Session:
        return widen_pool(TrustedSession(self.settings.ca_bundle))  # writes run on a thread pool

    @cached_property
    def token_store(self) -> RefreshTokenStore:
        if self._token_store is not None:
            return self._token_store
        if self.settings.token_store_path:
            return RefreshTokenStore(Path(self.settings.token_store_path))
        return RefreshTokenStore.default()

    def _client(self, system: str, scope: str) -> RestClient:
        return RestClient(
            system,
            self.session,
            lambda force: self.get_token(scope, force=force),
            policy=self.retry_policy,
            default_headers={"Accept": "application/json"},
            sleep=self._sleep,
        )

    @cached_property
    def referrals(self) -> RestClient:
        return self._client("Partner Center", self.settings.referrals_scope)

    @cached_property
    def webhooks(self) -> RestClient:
        return self._client("Partner Center webhooks", self.settings.webhooks_scope)

    def get_conn(self) -> RestClient:
        return self.referrals

    # -- auth ------------------------------------------------------------------------------
    @cached_property
    def _grant(self) -> tuple[str, ...]:
        """Whose tokens (the token cache's key but the scope): worked out once, not per request."""
        s = self.settings
        principal = ("public-rt" if s.public_client else "rt") if s.refresh_token else f"user:{s.username}"
        secrets = fingerprint(s.client_secret, s.refresh_token or s.user_password)
        return (s.authority, s.tenant_id, s.client_id, principal, secrets)

    def get_token(self, scope: str, *, force: bool = False) -> str:
        """An app+user access token for ``scope``, cached until shortly before it expires."""
        s = self.settings
        key = (*self._grant, scope)

        def acquire() -> dict[str, Any]:
            app = settings_app(s, self.session, self.retry_policy, self._sleep)  # retried like the API
            if s.refresh_token:
                return self._refresh_token_grant(app, scope)
            assert s.username and s.user_password
            return app.acquire_token_by_username_password(s.username, s.user_password, scopes=[scope])

        return cached_token(key, acquire, force)

    def _refresh_token_grant(self, app: Any, scope: str) -> dict[str, Any]:
        s = self.settings
        assert s.refresh_token
        store_key = RefreshTokenStore.key(s.conn_id, s.client_id, s.refresh_token)
        with _rotation_lock:
            stored = self.token_store.load(store_key)
            result: dict[str, Any] = {}
            for candidate in dict.fromkeys(t for t in (stored, s.refresh_token) if t):
                result = app.acquire_token_by_refresh_token(candidate, scopes=[scope])
                if "access_token" in result:
                    rotated = result.get("refresh_token")
                    if rotated and rotated != candidate:
                        self.token_store.save(store_key, rotated)
                    return result
                if result.get("error") != "invalid_grant":
                    return result
                if candidate == stored:
                    self.log.warning(
                        "The persisted refresh token for %s was rejected; trying the connection's own.", s.conn_id
                    )
                    self.token_store.forget(store_key)
            return result

    # -- referrals: reads ----------------------------------------------------------------
    def _url(self, *parts: str) -> str:
        return "/".join([self.settings.referrals_url, *(urlquote(p, safe="") for p in parts)])

    def _next_link(self, link: str) -> str:
        """The documented link is ``http://.../v1.0/referrals?$skiptoken=...``: followed
        verbatim, except that the scheme is upgraded (see :func:`follow_link`)."""
        return follow_link(self.settings.referrals_url, link, "Partner Center")

    def iter_referral_pages(
        self,
        filter: str | None = None,
        orderby: str | None = None,
        top: int = MAX_PAGE_SIZE,
        select: Sequence[str] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Raw referral documents, one list per page, following every nextLink."""
        if not 1 <= top <= MAX_PAGE_SIZE:
            raise ValueError(f"top must be between 1 and {MAX_PAGE_SIZE}")
        params = {"$top": str(top)}
        if filter:
            params["$filter"] = filter
        if orderby:
            params["$orderby"] = orderby
        if select:
            params["$select"] = ",".join(select)
        url: str | None = with_query(self.settings.referrals_url, params)
        while url:
            body = self.referrals.request("GET", url).json()
            yield list(body.get("value") or [])
            link = body.get("@odata.nextLink")
            url = self._next_link(link) if link else None

    def list_referrals(
        self,
        filter: str | None = None,
        orderby: str | None = None,
        top: int = MAX_PAGE_SIZE,
        select: Sequence[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        for page in self.iter_referral_pages(filter, orderby, top, select):
            yield from page

    def get_referral(self, referral_id: str) -> dict[str, Any]:
        resp = self.referrals.request("GET", self._url(referral_id))
        return self._with_etag(resp)

    def find_by_external_reference(self, external_reference_id: str) -> list[dict[str, Any]]:
        return list(
            self.list_referrals(
                filter=f"externalReferenceId eq {quote(external_reference_id)}",
                select=("id", "externalReferenceId", "eTag", "status"),
            )
        )

    def find_by_external_references(self, external_reference_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every referral whose ``externalReferenceId`` is one of ``external_reference_ids``, in one
        list query (``$filter`` with ``or``; keep the list short, the filter travels in the URL).
        Partner Center has no batch GET: this is how a run finds the referrals an earlier try of
        it created, before it creates any."""
        values = list(dict.fromkeys(str(v) for v in external_reference_ids if v))
        if not values:
            return []
        flt = " or ".join(f"externalReferenceId eq {quote(v)}" for v in values)
        return list(self.list_referrals(filter=flt, orderby="createdDateTime asc"))

    def engagement_referrals(self, engagement_id: str) -> list[dict[str, Any]]:
        """Every referral of an engagement (what a referral's ``links.relatedReferrals`` lists)."""
        return list(self.list_referrals(filter=f"engagementId eq {quote(engagement_id)}"))

    @staticmethod
    def _with_etag(resp: requests.Response) -> dict[str, Any]:
        """The referral without OData annotations, with the ETag header as ``eTag``."""
        doc: dict[str, Any] = {k: v for k, v in resp.json().items() if not k.startswith("@odata.")}
        if resp.headers.get("ETag"):
            doc["eTag"] = resp.headers["ETag"]
        return doc

    # -- referrals: writes -----------------------------------------------------------------
    def create_referral(
        self,
        referral: Mapping[str, Any],
        *,
        landed: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """``POST`` a referral. Never creates twice: before any retry, the referral is looked
        up by ``externalReferenceId`` (or with ``landed``, for a body without one) and returned
        if the first attempt landed."""
        body = dict(referral)
        ext = body.get("externalReferenceId")

        def find() -> Mapping[str, Any] | None:
            if landed is not None:
                return landed()
            found = self.find_by_external_reference(ext) if ext else []
            return found[0] if found else None

        def before_retry() -> requests.Response | None:
            found = find()
            if not found:
                return None
            self.log.warning("A retried create (%s) had already landed as %s", ext or "no id", found.get("id"))
            return self.referrals.request("GET", self._url(str(found["id"])))

        retry_check = before_retry if ext or landed is not None else None
        resp = self.referrals.request(
            "POST", self.settings.referrals_url, json=body, idempotent=False, before_retry=retry_check
        )
        return self._with_etag(resp)

    def replace_referral(self, referral_id: str, referral: Mapping[str, Any], etag: str) -> dict[str, Any]:
        """``PUT`` the whole referral; ``If-Match`` is required and ``links`` is removed from the body."""
        if not etag:
            raise ValueError("replace_referral needs the ETag the referral was read with")
        body = dict(referral)
        body.pop("links", None)
        resp = self.referrals.request("PUT", self._url(referral_id), json=body, headers={"If-Match": etag})
        return self._with_etag(resp)

    def patch_referral(
        self,
        referral_id: str,
        operations: Sequence[Mapping[str, Any]],
        etag: str | None = None,
        *,
        return_representation: bool = True,
    ) -> dict[str, Any] | None:
        """JSON Patch (``replace``/``add``). With an ETag the write is conditional (412 on a
        stale read) and so safe to retry; without one, it is sent once. Without
        ``return_representation`` the answer is 204 and this returns only the new ``eTag``
        (from the response's ``ETag`` header; None when it has none)."""
        for op in operations:
            if op.get("op") not in ("replace", "add"):
                raise ValueError(f"Partner Center supports only JSON Patch replace and add, not {op.get('op')!r}")
        headers = {}
        if etag:
            headers["If-Match"] = etag
        if return_representation:
            headers["Prefer"] = "return=representation"
        resp = self.referrals.request(
            "PATCH", self._url(referral_id), json=list(operations), headers=headers, idempotent=bool(etag)
        )
        if resp.status_code == 200 and resp.content:
            return self._with_etag(resp)
        return {"eTag": resp.headers["ETag"]} if resp.headers.get("ETag") else None

    # -- webhooks ----------------------------------------------------------------------------
    def _hooks_url(self, path: str) -> str:
        return f"{self.settings.webhooks_url}/{path}"

    def list_webhook_events(self) -> list[str]:
        return list(self.webhooks.request("GET", self._hooks_url("registration/events")).json())

    def get_webhook_registration(self) -> dict[str, Any] | None:
        try:
            return dict(self.webhooks.request("GET", self._hooks_url("registration")).json())
        except NotFoundError:
            return None

    def create_webhook_registration(self, url: str, events: Sequence[str]) -> dict[str, Any]:
        body = {"WebhookUrl": url, "WebhookEvents": list(events)}
        # A registration POST is safe to retry: a second one that lands answers 409.
        return dict(self.webhooks.request("POST", self._hooks_url("registration"), json=body).json())

    def update_webhook_registration(self, url: str, events: Sequence[str]) -> dict[str, Any]:
        body = {"WebhookUrl": url, "WebhookEvents": list(events)}
        return dict(self.webhooks.request("PUT", self._hooks_url("registration"), json=body).json())

    def create_validation_event(self) -> str:
        """Ask Partner Center to send a ``test-created`` event; returns its correlation id."""
        body = self.webhooks.request("POST", self._hooks_url("registration/validationEvents"), idempotent=False).json()
        return str(registration_value(body, "correlationId"))

    def get_validation_event(self, correlation_id: str) -> dict[str, Any]:
        url = self._hooks_url(f"registration/validationEvents/{urlquote(correlation_id, safe='')}")
        return dict(self.webhooks.request("GET", url).json())

    # -- Airflow UI ------------------------------------------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        """Airflow's Test button: an app+user token, then one page of one referral."""
        try:
            next(self.iter_referral_pages(top=1))
        except Exception as exc:
            return False, str(exc)  # typed errors carry the cause (e.g. AADSTS7000215), never a credential
        return True, "Connected: token acquired and referrals listed."
