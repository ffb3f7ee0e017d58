"""HTTP plumbing shared by the hooks: TLS trust, retries, typed errors, call counts.

Retry rules (one place, used by every hook):

* 429 and 503 wait ``Retry-After`` (seconds or an HTTP date) when the service sends it;
* other 5xx and connection errors back off exponentially with jitter, bounded;
* a 401 refreshes the token once (it may have been revoked or expired early);
* a request that is not idempotent (a create) is only retried when that is provably
  safe: on 429 (not processed), or after ``before_retry`` confirmed that the first
  attempt did not land (for example by looking the record up by its external id).
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from cosell_sync.errors import ApiError, ThrottledError, TransportError, error_class_for

log = logging.getLogger(__name__)

RETRY_AFTER_STATUSES = frozenset({429, 503})


class TrustedSession(requests.Session):
    """A session whose ``ca_bundle`` really wins.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` override ``Session.verify`` (the
    environment is merged in before the session setting). Passing ``verify=`` on each
    request is the documented way around that, so this session does it for every call,
    including the ones msal makes through it. Without a ``ca_bundle`` the default
    applies and ``REQUESTS_CA_BUNDLE`` is honoured.
    """

    def __init__(self, ca_bundle: str | None = None, user_agent: str = "cosell-sync") -> None:
        super().__init__()
        self.ca_bundle = ca_bundle or None
        self.headers["User-Agent"] = user_agent

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.ca_bundle and kwargs.get("verify") in (None, True):
            kwargs["verify"] = self.ca_bundle
        kwargs.setdefault("timeout", (10, 120))
        return super().request(method, url, *args, **kwargs)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 300.0  # a longer Retry-After fails fast with ThrottledError

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def follow_link(base_url: str, link: str, system: str) -> str:
    """The URL to request for a server-sent ``@odata.nextLink``/``deltaLink``.

    The link's path and query are kept verbatim (skip tokens must not be re-encoded).
    A bearer token never goes over plain HTTP, so an ``http://`` link to the API's own
    host (Partner Center documents that shape) is upgraded to https; a link to any
    other host is refused rather than handed our token.
    """
    base = urlsplit(base_url)
    parts = urlsplit(urljoin(base_url.rstrip("/") + "/", link))
    same_host = (parts.hostname or "").lower() == (base.hostname or "").lower()
    same_port = parts.port is None or parts.port == (base.port or 443)
    if not same_host or not same_port:
        raise ApiError(system, f"refusing to follow a link to another host ({parts.netloc})")
    return urlunsplit(("https", parts.netloc, parts.path, parts.query, parts.fragment))


ErrorParser = Callable[[requests.Response], tuple[str | None, str]]


def odata_error(response: requests.Response) -> tuple[str | None, str]:
    """(code, message) from the Microsoft error body ``{"error": {"code", "message"}}``."""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or response.reason or "")[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return err.get("code"), str(err.get("message", ""))[:2000]
    return None, str(body)[:500]


class RestClient:
    """Sends requests with a bearer token, retries by :class:`RetryPolicy`, raises typed errors."""

    def __init__(
        self,
        system: str,
        session: requests.Session,
        token: Callable[[bool], str],
        *,
        policy: RetryPolicy | None = None,
        error_parser: ErrorParser = odata_error,
        default_headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.system = system
        self.session = session
        self._token = token
        self.policy = policy or RetryPolicy()
        self._parse_error = error_parser
        self._headers = dict(default_headers or {})
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # "GET", "POST", ... every attempt on the wire
        self.retries: Counter[str] = Counter()  # reason -> count
        self.waited = 0.0  # seconds spent waiting between attempts

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        before_retry: Callable[[], requests.Response | None] | None = None,
    ) -> requests.Response:
        """Send with retries; return a 2xx/3xx response or raise a typed :class:`ApiError`.

        ``before_retry`` runs before any retry of a non-idempotent request; when it
        returns a response, that response is the result (the first attempt had landed).
        """
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        client_request_id = str(uuid.uuid4())
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            hdrs = {**self._headers, **(headers or {})}
            hdrs["Authorization"] = f"Bearer {self._token(False)}"
            hdrs["client-request-id"] = client_request_id
            with self._lock:
                self.calls[method.upper()] += 1
            try:
                response = self.session.request(method, url, json=json, data=data, params=params, headers=hdrs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = type(exc).__name__
                if attempt >= self.policy.max_attempts or (not idempotent and before_retry is None):
                    raise TransportError(self.system, f"connection failed: {reason}", method=method, url=url) from None
                delay = self.policy.backoff(attempt, self._rng)
                self._wait(method, url, reason, delay, attempt)
                if not idempotent and before_retry is not None:
                    landed = before_retry()
                    if landed is not None:
                        return landed
                continue

            status = response.status_code
            if status < 400:
                return response
            if status == 401 and not refreshed:
                refreshed = True
                self._token(True)
                attempt -= 1  # a token refresh is not a retry of the service's failure
                continue
            retryable = status in RETRY_AFTER_STATUSES or status >= 500
            safe = idempotent or status == 429 or before_retry is not None
            if retryable and safe and attempt < self.policy.max_attempts:
                retry_after = (
                    parse_retry_after(response.headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES else None
                )
                if retry_after is not None and retry_after > self.policy.max_retry_after:
                    raise self._error(response, method, url)
                delay = retry_after if retry_after is not None else self.policy.backoff(attempt, self._rng)
                self._wait(
                    method,
                    url,
                    f"HTTP {status}",
                    delay,
                    attempt,
                    "Retry-After" if retry_after is not None else "backoff",
                )
                if not idempotent and status != 429 and before_retry is not None:
                    landed = before_retry()
                    if landed is not None:
                        return landed
                continue
            raise self._error(response, method, url)

    def _wait(self, method: str, url: str, reason: str, delay: float, attempt: int, kind: str = "backoff") -> None:
        with self._lock:
            self.retries[reason] += 1
            self.waited += delay
        log.warning(
            "%s %s %s: %s; waiting %.2fs (%s) before attempt %d/%d",
            self.system,
            method,
            url.split("?", 1)[0],
            reason,
            delay,
            kind,
            attempt + 1,
            self.policy.max_attempts,
        )
        self._sleep(delay)

    def _error(self, response: requests.Response, method: str, url: str) -> ApiError:
        code, message = self._parse_error(response)
        cls = error_class_for(response.status_code)
        request_id = (
            response.headers.get("request-id")
            or response.headers.get("x-ms-request-id")
            or response.headers.get("REQ_ID")
        )
        kwargs: dict[str, Any] = dict(
            status=response.status_code, code=code, request_id=request_id, method=method, url=url
        )
        if cls is ThrottledError:
            kwargs["retry_after"] = parse_retry_after(response.headers.get("Retry-After"))
        return cls(self.system, message, **kwargs)
