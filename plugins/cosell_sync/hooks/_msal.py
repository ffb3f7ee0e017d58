"""Microsoft identity (msal) for the Partner Center and Dataverse hooks.

* One msal application per (authority, client id, secret) per process; building one
  fetches the authority's OpenID configuration, so it is done lazily and once.
* Access tokens are cached in memory until shortly before they expire.
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

from cosell_sync._masking import mask
from cosell_sync.errors import AuthenticationError, ConfigurationError

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

_apps: dict[tuple[str, str, str], msal.ConfidentialClientApplication] = {}
_tokens: dict[tuple[str, ...], tuple[str, float]] = {}
_lock = threading.Lock()


def authority_url(base: str, tenant_id: str) -> str:
    if not tenant_id:
        raise ConfigurationError("The connection needs 'tenant_id' in its extras.")
    return f"{base.rstrip('/')}/{tenant_id}"


def fingerprint(*secrets: str | None) -> str:
    """A short one-way digest of credentials, for cache keys: a changed secret (a rotation, or
    the UI's Test button trying another one in the API server) never meets a cached app or token."""
    return hashlib.sha256("\0".join(s or "" for s in secrets).encode()).hexdigest()[:16]


def confidential_app(
    authority: str, client_id: str, client_secret: str, session: requests.Session
) -> msal.ConfidentialClientApplication:
    key = (authority, client_id, fingerprint(client_secret))
    with _lock:
        app = _apps.get(key)
    if app is None:
        host = urlsplit(authority).hostname or ""
        try:
            app = msal.ConfidentialClientApplication(
                client_id,
                client_credential=client_secret,
                authority=authority,
                http_client=session,
                instance_discovery=host in MICROSOFT_AUTHORITY_HOSTS,
            )
        except ValueError as exc:
            raise ConfigurationError(f"Cannot use the authority {authority}: {exc}") from None
        except requests.RequestException as exc:
            raise AuthenticationError(
                "Entra ID", f"cannot reach the authority {authority}: {type(exc).__name__}"
            ) from None
        with _lock:
            _apps.setdefault(key, app)
    return app


def cached_token(key: tuple[str, ...], acquire: Callable[[], dict[str, Any]], force: bool = False) -> str:
    """A cached access token for ``key``; ``acquire`` returns msal's result dict."""
    now = time.time()
    with _lock:
        hit = _tokens.get(key)
    if hit and not force and hit[1] - EXPIRY_SKEW > now:
        return hit[0]
    result = acquire()
    if "access_token" not in result:
        raise AuthenticationError(
            "Entra ID",
            str(result.get("error_description") or "no access token returned").split("\r\n")[0],
            code=result.get("error"),
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
