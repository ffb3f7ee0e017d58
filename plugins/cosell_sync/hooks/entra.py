"""Microsoft identity (msal) for the Partner Center and Dataverse hooks.

* One msal application per (authority, client id, secret) per process; building one
  fetches the authority's OpenID configuration, so it is done lazily and once.
* Access tokens are cached in memory until shortly before they expire.
* msal sends every request (instance and OpenID discovery, the token request) through
  :class:`EntraHttpClient`: the hooks' session and the same :class:`Retrier` as the API
  calls, so 429 (after ``Retry-After``), 5xx and dropped connections are retried, and what
  is left after the retry budget is typed (:class:`ThrottledError`, :class:`ServerError`,
  :class:`TransportError`); a refused credential is an :class:`AuthenticationError`.
* Rotated refresh tokens are persisted by :class:`RefreshTokenStore`, so that the next
  task process (every Airflow task is one) starts from the newest token.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msal
import requests
from msal.exceptions import MsalServiceError

from cosell_sync.errors import (
    ApiError,
    AuthenticationError,
    ConfigurationError,
    ServerError,
    ThrottledError,
    error_class_for,
)
from cosell_sync.hooks.http import Retrier, RetryPolicy, parse_retry_after
from cosell_sync.masking import mask

# Hosts msal knows; for any other authority (sovereign proxies, the sandbox) instance
# discovery must be off, or msal asks login.microsoftonline.com about it.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
    }
)
EXPIRY_SKEW = 300  # seconds: refresh this long before expiry
SYSTEM = "Entra ID"
# OAuth errors that mean the token service is busy or failing, not that it refused us.
TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error"})

_apps: dict[tuple[str, str, str], msal.ClientApplication] = {}
_tokens: dict[tuple[str, ...], tuple[str, float]] = {}
_lock = threading.Lock()
_acquiring: dict[tuple[str, ...], threading.Lock] = {}  # one acquisition at a time per key (see cached_token)


def authority_url(base: str, tenant_id: str) -> str:
    if not tenant_id:
        raise ConfigurationError("The connection needs 'tenant_id' in its extras.")
    return f"{base.rstrip('/')}/{tenant_id}"


def fingerprint(*secrets: str | None) -> str:
    """A short one-way digest of credentials, for cache keys: a changed secret (a rotation, or
    the UI's Test button trying another one in the API server) never meets a cached app or token."""
    return hashlib.sha256("\0".join(s or "" for s in secrets).encode()).hexdigest()[:16]


def oauth_error(response: requests.Response) -> tuple[str | None, str]:
    """(code, first line of the description) of an OAuth error body ``{"error",
    "error_description"}`` (Entra ID's), or of a Microsoft ``{"error": {"code", "message"}}``."""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or response.reason or "")[:500]
    if not isinstance(body, dict):
        return None, str(body)[:500]
    err = body.get("error")
    if isinstance(err, dict):
        return err.get("code"), str(err.get("message", ""))[:2000]
    description = str(body.get("error_description") or err or "")
    return (str(err) if err else None), description.split("\r\n")[0].split("\n")[0][:2000]


class EntraHttpClient:
    """The ``http_client`` msal is given: its GETs and POSTs go through the hook's session and
    a :class:`Retrier`.

    msal expects ``get``/``post`` returning a requests-like response. It reads a 4xx token
    response itself (the OAuth error body: ``invalid_client``, ``invalid_grant``, ...), but
    would raise a bare ``MsalServiceError: HTTP Error: 503`` on a 5xx, read a 429 as a refusal
    and let a dropped connection escape as a ``requests`` exception. So the client retries
    those (a token or discovery request has no side effect, so each is safe to send again) and
    raises what is left as typed errors: 429 -> :class:`ThrottledError`, 5xx ->
    :class:`ServerError`, connection -> :class:`TransportError`. Messages carry the service's
    error code and description and the URL's path, never a request body (where the secret is).
    """

    def __init__(
        self,
        session: requests.Session,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.session = session
        self.retrier = Retrier(SYSTEM, policy or RetryPolicy(), sleep=sleep)

    def get(self, url: str, params: Any = None, headers: Any = None, **kwargs: Any) -> requests.Response:
        return self._send("GET", url, params=params, headers=headers, **kwargs)

    def post(
        self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kwargs: Any
    ) -> requests.Response:
        return self._send("POST", url, params=params, data=data, headers=headers, **kwargs)

    def close(self) -> None:
        """The session belongs to the hook; msal does not close it."""

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        response = self.retrier.run(method, url, lambda: self.session.request(method, url, **kwargs), idempotent=True)
        status = response.status_code
        if status == 429 or status >= 500:
            raise self._error(response, method, url)
        return response

    @staticmethod
    def _error(response: requests.Response, method: str, url: str) -> ApiError:
        code, message = oauth_error(response)
        cls = error_class_for(response.status_code)
        request_id = response.headers.get("x-ms-request-id") or response.headers.get("request-id")
        kwargs: dict[str, Any] = dict(
            status=response.status_code, code=code, request_id=request_id, method=method, url=url
        )
        if cls is ThrottledError:
            kwargs["retry_after"] = parse_retry_after(response.headers.get("Retry-After"))
        return cls(SYSTEM, message or "the token service is unavailable", **kwargs)


def msal_app(
    authority: str,
    client_id: str,
    client_secret: str | None,
    session: requests.Session,
    *,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> msal.ClientApplication:
    """The msal application for these credentials, built once (building it fetches the
    authority's OpenID configuration, with retries; see :class:`EntraHttpClient`).

    With a secret, a confidential client; with ``client_secret=None``, the app as a *public*
    client (no secret is ever sent): the device-code sign-in, and the refresh of the token it
    gave, since Entra refuses a secret with a public client's refresh token (AADSTS700025)."""
    key = (authority, client_id, fingerprint(client_secret) if client_secret is not None else "public")
    with _lock:
        app = _apps.get(key)
    if app is None:
        host = urlsplit(authority).hostname or ""
        options: dict[str, Any] = dict(
            authority=authority,
            http_client=EntraHttpClient(session, policy, sleep=sleep),
            instance_discovery=host in MICROSOFT_AUTHORITY_HOSTS,
        )
        try:
            if client_secret is None:
                app = msal.PublicClientApplication(client_id, **options)
            else:
                app = msal.ConfidentialClientApplication(client_id, client_credential=client_secret, **options)
        except ValueError as exc:
            raise ConfigurationError(f"Cannot use the authority {authority}: {exc}") from None
        except requests.RequestException as exc:  # not a connection failure (those are retried): a bad URL
            raise ConfigurationError(f"Cannot use the authority {authority}: {type(exc).__name__}") from None
        with _lock:
            app = _apps.setdefault(key, app)
    return app


def cached_token(key: tuple[str, ...], acquire: Callable[[], dict[str, Any]], force: bool = False) -> str:
    """A cached access token for ``key``; ``acquire`` returns msal's result dict."""
    if not force and (token := _fresh(key)):
        return token
    with _lock:
        gate = _acquiring.setdefault(key, threading.Lock())
    # Threads that miss the cache together (a write pool's first requests) wait for one grant
    # instead of each asking the token service for its own; they then find it cached.
    with gate:
        if not force and (token := _fresh(key)):
            return token
        return _acquired(key, acquire, time.time())


def _fresh(key: tuple[str, ...]) -> str | None:
    """The cached token for ``key`` while it is not about to expire."""
    with _lock:
        hit = _tokens.get(key)
    return hit[0] if hit and hit[1] - EXPIRY_SKEW > time.time() else None


def _acquired(key: tuple[str, ...], acquire: Callable[[], dict[str, Any]], now: float) -> str:
    """A new token for ``key`` (``now``: when it was asked for, its lifetime counts from then)."""
    try:
        result = acquire()
    except MsalServiceError as exc:  # only if msal itself judged a response bad
        raise ServerError(SYSTEM, f"unexpected token service response ({exc})") from None
    if "access_token" not in result:
        error = result.get("error")
        cls = ServerError if error in TRANSIENT_OAUTH_ERRORS else AuthenticationError
        raise cls(
            SYSTEM,
            str(result.get("error_description") or "no access token returned").split("\r\n")[0],
            code=error,
            request_id=result.get("correlation_id"),
        )
    token = result["access_token"]
    mask(token)
    expires_in = float(result.get("expires_in") or 3600)
    with _lock:
        _tokens[key] = (token, now + expires_in)
    return token


def forget_tokens() -> None:
    """Drop every cached access token and msal application (tests, credential rotation)."""
    with _lock:
        _tokens.clear()
        _apps.clear()


@dataclass(frozen=True)
class RefreshTokenStore:
    """Persists the newest refresh token per connection in a 0600 JSON file.

    Entries are keyed by a hash of (connection id, client id, the connection's own
    refresh token). When an operator puts a new refresh token in the connection, the
    key changes and the stale rotated token is ignored. The file is locked while it
    is read and written, so concurrent tasks do not lose each other's rotations.
    """

    path: Path

    @classmethod
    def default(cls) -> RefreshTokenStore:
        home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
        return cls(Path(home) / "cosell" / "refresh_tokens.json")

    @staticmethod
    def key(conn_id: str, client_id: str, seed_token: str) -> str:
        return hashlib.sha256(f"{conn_id}\0{client_id}\0{seed_token}".encode()).hexdigest()[:40]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
            except (OSError, ValueError):
                data = {}
            yield data

    def load(self, key: str) -> str | None:
        with self._locked() as data:
            entry = data.get(key)
        token = entry.get("refresh_token") if isinstance(entry, dict) else None
        if token:
            mask(token)
        return token

    def save(self, key: str, token: str) -> None:
        mask(token)
        with self._locked() as data:
            data[key] = {"refresh_token": token, "saved_at": time.time()}
            self._write(data)

    def forget(self, key: str) -> None:
        with self._locked() as data:
            if data.pop(key, None) is not None:
                self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        """Atomic replace of the file, created 0600; call with the lock held."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        tmp.replace(self.path)


def settings_app(
    settings: Any, session: requests.Session, policy: RetryPolicy, sleep: Callable[[float], None]
) -> msal.ClientApplication:
    """:func:`msal_app` for a hook's settings (``authority``, ``tenant_id``,
    ``client_id``, ``client_secret``): token requests retried with the hook's own policy; the
    public client when the settings say ``public_client`` (a device-code sign-in's token)."""
    secret = None if getattr(settings, "public_client", False) else settings.client_secret
    authority = authority_url(settings.authority, settings.tenant_id)
    return msal_app(authority, settings.client_id, secret, session, policy=policy, sleep=sleep)
