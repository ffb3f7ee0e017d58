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
import http.cookiejar as http_cookiejar
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.cookies import RequestsCookieJar, cookiejar_from_dict, merge_cookies
from requests.sessions import merge_hooks, merge_setting
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies, get_netrc_auth

from cosell_sync.errors import ApiError, ThrottledError, TransportError, error_class_for
from cosell_sync.hooks.clock import observe as observe_server_clock

log = logging.getLogger(__name__)

RETRY_AFTER_STATUSES = frozenset({429, 503})
# What requests reads from the environment for a request (urllib's getproxies_environment and
# proxy_bypass_environment on POSIX; requests' CA bundle variables): a change to any of them is
# seen on the next request.
ENVIRONMENT = (
    *(f"{name}_proxy" for name in ("https", "http", "all", "no")),
    *(f"{name}_PROXY" for name in ("HTTPS", "HTTP", "ALL", "NO")),
    "REQUEST_METHOD",  # CGI: HTTP_PROXY is then ignored
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


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
        # (host, the environment's values) -> (its proxies, its CA bundle): merge_environment_settings
        self._environment: dict[tuple[str, tuple[str | None, ...]], tuple[dict[str, str], str | None]] = {}

    def merge_environment_settings(self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        """``requests``' own merge of the environment's proxies and CA bundle into a request's
        settings, with the environment looked up once per host instead of on every request.

        ``requests`` scans the whole environment (``getproxies``, ``NO_PROXY`` matching) for each
        request: some 10% of a Partner Center write's client CPU. Here its answer is kept per
        host, keyed by the values of the variables it reads (:data:`ENVIRONMENT`), so a changed
        ``HTTPS_PROXY``, ``NO_PROXY`` or ``REQUESTS_CA_BUNDLE`` still applies from the next
        request on. A request's own ``no_proxy`` takes requests' path unchanged."""
        if not self.trust_env or (proxies and proxies.get("no_proxy")):
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        values = tuple(map(os.environ.get, ENVIRONMENT))
        key = (urlsplit(url).netloc, values)
        found = self._environment.get(key)
        if found is None:
            if len(self._environment) > 64:  # hosts x environments: a handful in practice
                self._environment.clear()
            found = self._environment[key] = get_environ_proxies(url), values[-2] or values[-1]
        env_proxies, env_ca = found
        proxies = dict(proxies or {})
        for scheme, proxy in env_proxies.items():
            proxies.setdefault(scheme, proxy)
        if verify is True or verify is None:
            verify = env_ca or verify
        return {
            "proxies": _merged(proxies, self.proxies),
            "stream": _merged(stream, self.stream),
            "verify": _merged(verify, self.verify),
            "cert": _merged(cert, self.cert),
        }

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        """``requests``' own ``Session.prepare_request``, the same merge of the session's and the
        request's settings, minus what a hook's request does not need on every call (issue 16:
        the settings merge was some 15% of a Partner Center write's client CPU):

        * no ``~/.netrc`` lookup (two ``stat`` calls a request) when the request carries its own
          ``Authorization`` header: a netrc entry for the host would replace that bearer token
          with Basic credentials (requests' documented precedence), never what a hook means;
        * headers, params and hooks merged as ``merge_setting`` merges them, without its
          ``typing`` protocol checks when both sides are plain dictionaries."""
        cookies: Any = request.cookies or {}
        if not isinstance(cookies, http_cookiejar.CookieJar):
            cookies = cookiejar_from_dict(cookies)
        merged_cookies = merge_cookies(merge_cookies(RequestsCookieJar(), self.cookies), cookies)
        auth = request.auth
        if self.trust_env and not auth and not self.auth and not _has_authorization(request.headers):
            auth = get_netrc_auth(request.url)
        prepared = requests.PreparedRequest()
        prepared.prepare(
            method=str(request.method).upper(),
            url=request.url,
            files=request.files,
            data=request.data,
            json=request.json,
            headers=_merged_headers(request.headers, self.headers),
            params=_merged(request.params, self.params) or None,  # none: not encoded at all
            auth=_merged(auth, self.auth),
            cookies=merged_cookies,
            hooks=merge_hooks(request.hooks, self.hooks),
        )
        return prepared

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.ca_bundle and kwargs.get("verify") in (None, True):
            kwargs["verify"] = self.ca_bundle
        kwargs.setdefault("timeout", (10, 120))
        response = super().request(method, url, *args, **kwargs)
        observe_server_clock(response)  # the server's time, for an incremental read's watermark
        return response


BACKOFF_BASE = 0.5  # seconds: [cosell] http_retry_backoff
BACKOFF_MAX = 30.0  # seconds: [cosell] http_retry_backoff_max


def backoff_setting(key: str, default: float) -> float:
    """``[cosell] <key>``: seconds of the hooks' backoff between attempts (a positive number)."""
    from airflow.sdk import conf

    from cosell_sync.errors import ConfigurationError

    raw = str(conf.get("cosell", key, fallback=str(default))).strip()
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ConfigurationError(f"[cosell] {key} must be a positive number of seconds, got {raw!r}")
    return value


def _merged(request_setting: Any, session_setting: Any) -> Any:
    """``requests.sessions.merge_setting``, with plain dictionaries merged directly (its
    ``to_key_val_list`` checks each against ``typing`` protocols, slowly)."""
    if session_setting is None:
        return request_setting
    if request_setting is None:
        return session_setting
    if type(request_setting) is dict and type(session_setting) is dict:
        if not session_setting:
            return {k: v for k, v in request_setting.items() if v is not None}
        return {k: v for k, v in {**session_setting, **request_setting}.items() if v is not None}
    return merge_setting(request_setting, session_setting)


def _merged_headers(request_headers: Any, session_headers: Any) -> Any:
    """The request's headers over the session's, case-insensitively, a ``None`` value removing
    one (``merge_setting`` with ``CaseInsensitiveDict``)."""
    if request_headers is None or session_headers is None or not isinstance(request_headers, dict):
        return merge_setting(request_headers, session_headers, dict_class=CaseInsensitiveDict)
    merged = CaseInsensitiveDict(session_headers)
    for name, value in request_headers.items():
        merged[name] = value
    for name in [name for name, value in merged.items() if value is None]:
        del merged[name]
    return merged


def _has_authorization(headers: Any) -> bool:
    return bool(headers) and any(str(name).lower() == "authorization" for name in headers)


@dataclass(frozen=True)
class RetryPolicy:
    """How a hook retries. The backoff's first step and cap default to ``[cosell]
    http_retry_backoff`` (0.5 s) and ``http_retry_backoff_max`` (30 s), read when the policy is
    made (each hook makes its own); ``Retry-After`` is always waited out as the service says."""

    max_attempts: int = 6
    backoff_base: float = field(default_factory=lambda: backoff_setting("http_retry_backoff", BACKOFF_BASE))
    backoff_max: float = field(default_factory=lambda: backoff_setting("http_retry_backoff_max", BACKOFF_MAX))
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


def default_transient(response: requests.Response) -> bool:
    """Worth another attempt: throttling, unavailability, other 5xx."""
    return response.status_code in RETRY_AFTER_STATUSES or response.status_code >= 500


def default_not_processed(response: requests.Response) -> bool:
    """The service certainly did nothing, so even a create may be sent again."""
    return response.status_code == 429


class Retrier:
    """The retry loop of every hook, independent of how a request is sent.

    ``run`` returns the final response, successful or not (the caller turns an error
    status into its own exception), and raises :class:`TransportError` only when the
    connection kept failing or could not be retried safely.
    """

    def __init__(
        self,
        system: str,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.system = system
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # "GET", "POST", ... every attempt on the wire
        self.retries: Counter[str] = Counter()  # reason -> count
        self.waited = 0.0  # seconds spent waiting between attempts

    def run(
        self,
        method: str,
        url: str,
        send: Callable[[], requests.Response],
        *,
        idempotent: bool,
        before_retry: Callable[[], requests.Response | None] | None = None,
        refresh_auth: Callable[[], None] | None = None,
        transient: Callable[[requests.Response], bool] = default_transient,
        not_processed: Callable[[requests.Response], bool] = default_not_processed,
    ) -> requests.Response:
        """``before_retry`` runs before any retry of a non-idempotent request; when it returns
        a response, that is the result (the first attempt had landed after all)."""
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self.calls[method.upper()] += 1
            try:
                response = send()
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = type(exc).__name__
                if attempt >= self.policy.max_attempts or (not idempotent and before_retry is None):
                    raise TransportError(self.system, f"connection failed: {reason}", method=method, url=url) from None
                self._wait(method, url, reason, self.policy.backoff(attempt, self._rng), attempt)
                if not idempotent and before_retry is not None and (landed := before_retry()) is not None:
                    return landed
                continue

            status = response.status_code
            if status < 400:
                return response
            if status == 401 and refresh_auth is not None and not refreshed:
                refreshed = True
                refresh_auth()
                attempt -= 1  # a token refresh is not a retry of the service's failure
                continue
            untouched = not_processed(response)
            safe = idempotent or untouched or before_retry is not None
            if not (transient(response) and safe and attempt < self.policy.max_attempts):
                return response
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None and retry_after > self.policy.max_retry_after:
                return response
            delay = retry_after if retry_after is not None else self.policy.backoff(attempt, self._rng)
            kind = "Retry-After" if retry_after is not None else "backoff"
            self._wait(method, url, f"HTTP {status}", delay, attempt, kind)
            if not idempotent and not untouched and before_retry is not None and (landed := before_retry()) is not None:
                return landed

    def _wait(self, method: str, url: str, reason: str, delay: float, attempt: int, kind: str = "backoff") -> None:
        with self._lock:
            self.retries[reason] += 1
            self.waited += delay
        log.warning(
            "%s %s %s: %s; waiting %.2fs (%s) before attempt %d/%d",
            self.system, method, url.split("?", 1)[0], reason, delay, kind, attempt + 1, self.policy.max_attempts,
        )  # fmt: skip
        self._sleep(delay)


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
        self._parse_error = error_parser
        self._headers = dict(default_headers or {})
        self.retrier = Retrier(system, policy, sleep=sleep, seed=seed)

    @property
    def calls(self) -> Counter[str]:
        return self.retrier.calls

    @property
    def retries(self) -> Counter[str]:
        return self.retrier.retries

    @property
    def waited(self) -> float:
        return self.retrier.waited

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
        accept: Callable[[requests.Response], bool] | None = None,
    ) -> requests.Response:
        """Send with retries; return a 2xx/3xx response (or one ``accept`` takes) or raise a
        typed :class:`ApiError`."""
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        client_request_id = str(uuid.uuid4())

        def send() -> requests.Response:
            hdrs = {**self._headers, **(headers or {})}
            hdrs["Authorization"] = f"Bearer {self._token(False)}"
            hdrs["client-request-id"] = client_request_id
            return self.session.request(method, url, json=json, data=data, params=params, headers=hdrs)

        response = self.retrier.run(
            method, url, send, idempotent=idempotent, before_retry=before_retry, refresh_auth=lambda: self._token(True)
        )
        if response.status_code >= 400 and not (accept and accept(response)):
            raise self._error(response, method, url)
        return response

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
