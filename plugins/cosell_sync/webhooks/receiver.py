"""The Partner Center webhook receiver: a FastAPI app that the plugin mounts on Airflow's API server.

``POST /webhooks/partner-center`` (``/cosell/webhooks/partner-center`` once mounted at the
``/cosell`` prefix). Airflow does not authenticate plugin routes, so every request proves
itself with Partner Center's signature (:mod:`cosell_sync.webhooks.signature`), and an
accepted event is written to the state DB's inbox *before* the answer: a 200 means the
event is stored, deduplicated, and will be synced even if the scheduler is down now.

Checks, cheapest first, and their answers:

===== ==================================================================================
405   any method but POST (Starlette's routing; ``Allow: POST``).
413   ``Content-Length`` above ``webhook_max_body_bytes``, or a streamed body that grows past
      it: reading stops at the cap.
415   a ``Content-Type`` that is not JSON (none at all is tolerated).
401   not authenticated: ``X-MS-Signature-Algorithm`` is not ``rsa-sha256``, no
      ``Authorization: Signature``/``x-ms-signature`` or ``X-MS-Certificate-Url`` header, a
      signature that is not base64, or one that does not match the raw body (a tampered body).
403   the certificate offered is not acceptable: not ``https``, host off
      ``webhook_certificate_hosts``, cannot be fetched or parsed, expired, does not chain
      to ``webhook_trust_roots``, issuer without ``O=<webhook_issuer_organization>``.
400   only for a verified delivery: not standard JSON (``NaN``, ``Infinity``,
      ``-Infinity``, a number that overflows to infinity, a key repeated in one object,
      also when only its case differs, since keys are matched case-insensitively), not an
      object, ``EventName`` or ``ResourceUri`` missing or malformed, an unparseable
      ``ResourceChangeUtcDate``; for a referral event, a ``ResourceUri`` that is not
      ``https://<host>[:port]/<segments>/referrals/<GUID>`` with the host on
      ``webhook_resource_hosts``: no query, fragment, user info, percent-encoding,
      backslash, empty or dot segment, and nothing after the id. The URI is compared as
      sent, never decoded or resolved, so ``..``, ``%2e%2e`` or ``//`` cannot reach a
      configured host's path from elsewhere. Refused events are not stored; the answer
      and the log name the rule broken, not the value.
200   ``{"status": "accepted"}`` (stored), ``"duplicate"`` (already stored: a redelivery),
      ``"acknowledged"`` (``test-created``: answered so the validation event completes,
      never stored, since it names no referral), ``"ignored"`` (another, authentic, event
      type: acknowledged so Partner Center does not retry it, and not stored).
503   the state DB cannot store the event, or the receiver is misconfigured (e.g. the trust
      roots file is missing): the event was *not* accepted; Partner Center retries it
      (``Retry-After`` is set). This is the only 5xx the receiver answers on purpose.
===== ==================================================================================

Authentication runs before the body is parsed, so unsigned garbage gets 401, not 400.

**Deduplication.** Partner Center delivers at least once; a redelivery carries the same
event. The dedup key is the sha256 of the event's canonical JSON (sorted keys, compact),
which is the same for every delivery of one event even if it were re-serialised, and
differs between two changes of one referral (``ResourceChangeUtcDate`` differs). A
duplicate answers 200 and is not stored again (the inbox's unique key decides, also
between concurrent deliveries).

**Settings** come from Airflow's config, section ``[cosell]`` (so ``AIRFLOW__COSELL__<KEY>``
environment variables work), read on the first request:

* ``webhook_certificate_hosts``: comma-separated hosts the certificate may be fetched
  from (any port); default ``3psostorageacct.blob.core.windows.net``, where Partner Center
  publishes ``pcnotifications-dispatch.microsoft.com.cer``.
* ``webhook_trust_roots``: comma-separated PEM files whose certificates are trust anchors
  (roots, or a pinned issuing CA); default: certifi's public root bundle. Missing
  intermediates are fetched from the certificate's "CA Issuers" URL
  (``webhook_fetch_intermediates``, default true) and believed only if a trust root signed them.
* ``webhook_issuer_organization``: the ``O=`` the certificate's issuer must name; default
  ``Microsoft Corporation``; empty to skip.
* ``webhook_resource_hosts``: comma-separated hosts a referral event's ``ResourceUri`` may
  name (exact, case-insensitive; any port); default ``api.partnercenter.microsoft.com``
  (the documented event host) and ``api.partner.microsoft.com`` (the Referrals API's).
* ``webhook_max_body_bytes``: default 65536.
* ``webhook_ca_bundle``: the CA bundle for fetching certificates over HTTPS; default
  ``REQUESTS_CA_BUNDLE`` when set, else certifi.
* ``webhook_certificate_timeout`` (seconds, default 5), ``webhook_certificate_cache_ttl``
  (seconds, default 3600).

A sandbox differs only in these values (``cosell-sandbox env`` prints them). The state DB
is the ``cosell_state`` connection (:meth:`StateStore.from_airflow`), created and migrated
on first use. Nothing here touches the network or the DB at import time, and the module
imports only the standard library: :class:`ReceiverApp` builds the FastAPI app on its
first request, so processes that merely load the plugin (scheduler, tasks) do not pay for it.

Logs name the client, the check that failed and the referral id; never headers or bodies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cosell_sync.webhooks.hosts import on_allowed_host, split_https_url

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from cosell_sync.state import StateStore
    from cosell_sync.webhooks.signature import DeliveryVerifier

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/partner-center"
URL_PREFIX = "/cosell"
CONFIG_SECTION = "cosell"
DEFAULT_CERTIFICATE_HOSTS = ("3psostorageacct.blob.core.windows.net",)
DEFAULT_ISSUER_ORGANIZATION = "Microsoft Corporation"
DEFAULT_RESOURCE_HOSTS = ("api.partnercenter.microsoft.com", "api.partner.microsoft.com")
DEFAULT_MAX_BODY_BYTES = 64 * 1024
TEST_EVENT = "test-created"
REFERRAL_EVENTS = frozenset(
    {"referral-created", "referral-updated", "related-referral-created", "related-referral-updated"}
)
JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})
MAX_RESOURCE_URI = 2048
RETRY_AFTER_S = 30
_EVENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GUID_RE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# One path segment: letters, digits, ``_``, ``-`` and inner dots (``v1.0``); never empty, ``.`` or ``..``.
_PATH_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# What a ResourceUri may contain at all (RFC 3986 unreserved, ``:`` and ``/``; ``[]`` for IPv6 hosts).
_RESOURCE_URI_CHARS_RE = re.compile(r"[A-Za-z0-9._~:/\[\]-]+")


# --------------------------------------------------------------------------- settings


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class ReceiverSettings:
    """How the receiver verifies deliveries (see the module docstring for the config keys)."""

    certificate_hosts: tuple[str, ...] = DEFAULT_CERTIFICATE_HOSTS
    resource_hosts: tuple[str, ...] = DEFAULT_RESOURCE_HOSTS
    trust_roots: tuple[str, ...] = ()  # PEM files; empty: certifi's bundle
    issuer_organization: str = DEFAULT_ISSUER_ORGANIZATION
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ca_bundle: str | None = None  # None: REQUESTS_CA_BUNDLE, else certifi
    certificate_timeout: float = 5.0
    certificate_max_bytes: int = 64 * 1024
    certificate_cache_ttl: float = 3600.0
    certificate_cache_size: int = 32
    fetch_intermediates: bool = True

    @classmethod
    def from_airflow(cls) -> ReceiverSettings:
        """The settings from ``[cosell] webhook_*`` (Airflow config or ``AIRFLOW__COSELL__WEBHOOK_*``)."""
        from airflow.configuration import conf

        from cosell_sync.errors import ConfigurationError

        def get(key: str, fallback: str) -> str:
            return str(conf.get(CONFIG_SECTION, f"webhook_{key}", fallback=fallback) or "").strip()

        def number(key: str, fallback: float, kind: type[int] | type[float]) -> Any:
            raw = get(key, str(fallback))
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigurationError(f"[{CONFIG_SECTION}] webhook_{key} must be a number, got {raw!r}") from None
            if value <= 0:
                raise ConfigurationError(f"[{CONFIG_SECTION}] webhook_{key} must be positive, got {raw!r}")
            return value

        return cls(
            certificate_hosts=_split(get("certificate_hosts", ",".join(DEFAULT_CERTIFICATE_HOSTS))),
            resource_hosts=_split(get("resource_hosts", ",".join(DEFAULT_RESOURCE_HOSTS))),
            trust_roots=_split(get("trust_roots", "")),
            issuer_organization=get("issuer_organization", DEFAULT_ISSUER_ORGANIZATION),
            max_body_bytes=number("max_body_bytes", DEFAULT_MAX_BODY_BYTES, int),
            ca_bundle=get("ca_bundle", "") or None,
            certificate_timeout=number("certificate_timeout", 5.0, float),
            certificate_cache_ttl=number("certificate_cache_ttl", 3600.0, float),
            fetch_intermediates=get("fetch_intermediates", "true").lower() in {"1", "true", "yes", "on"},
        )

    def trust_root_files(self) -> tuple[str, ...]:
        if self.trust_roots:
            return self.trust_roots
        import certifi

        return (certifi.where(),)

    def fetch_verify(self) -> str | bool:
        """``verify=`` for certificate downloads: the configured bundle, ``REQUESTS_CA_BUNDLE``, or certifi."""
        import os

        return self.ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def build_verifier(self) -> DeliveryVerifier:
        from cosell_sync.errors import ConfigurationError
        from cosell_sync.webhooks.signature import CertificateFetcher, DeliveryVerifier, load_trust_roots

        try:
            roots = load_trust_roots(self.trust_root_files())
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if not self.certificate_hosts:
            log.warning("[cosell] webhook_certificate_hosts is empty: every webhook delivery will be refused")
        if not self.resource_hosts:
            log.warning("[cosell] webhook_resource_hosts is empty: every referral event will be refused")
        fetcher = CertificateFetcher(
            verify=self.fetch_verify(),
            timeout=self.certificate_timeout,
            max_bytes=self.certificate_max_bytes,
            ttl=self.certificate_cache_ttl,
            max_entries=self.certificate_cache_size,
        )
        return DeliveryVerifier(
            allowed_hosts=self.certificate_hosts,
            trust_roots=roots,
            issuer_organization=self.issuer_organization,
            fetcher=fetcher,
            fetch_intermediates=self.fetch_intermediates,
        )


# --------------------------------------------------------------------------- events


class EventError(ValueError):
    """A verified delivery whose body is not a usable Partner Center event (answered 400)."""


@dataclass(frozen=True)
class WebhookEvent:
    """One parsed Partner Center event."""

    event_name: str
    resource_uri: str
    dedup_key: str
    referral_id: str | None = None
    change_date: datetime | None = None

    def inbox_row(self) -> dict[str, Any]:
        return {
            "dedup_key": self.dedup_key,
            "event_name": self.event_name,
            "referral_id": self.referral_id,
            "resource_uri": self.resource_uri,
            "change_date": self.change_date,
        }


def _field(doc: Mapping[str, Any], name: str) -> Any:
    """``doc[name]``, the key matched case-insensitively (Partner Center mixes PascalCase and camelCase)."""
    if name in doc:
        return doc[name]
    lowered = name.lower()
    for key, value in doc.items():
        if key.lower() == lowered:
            return value
    return None


def _dedup_key(doc: Any, body: bytes) -> str:
    try:
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    except (ValueError, TypeError, RecursionError):  # pragma: no cover - whatever json.loads made dumps back
        canonical = body
    return hashlib.sha256(canonical).hexdigest()


def referral_id_from_uri(uri: str, allowed_hosts: Collection[str] = DEFAULT_RESOURCE_HOSTS) -> str:
    """The referral id (a GUID) of a referral event's ``ResourceUri``; an :class:`EventError` otherwise.

    The URI must be ``https://<host>[:port]/<segment>/.../referrals/<GUID>`` with ``host`` one
    of ``allowed_hosts`` (exact, case-insensitive; any port). It is checked as sent, not
    decoded or resolved: anything that would need normalising (percent-encoding, ``.`` or
    ``..`` segments, ``//``, a backslash, user info, a query or fragment, a trailing slash)
    is refused rather than normalised, so no two spellings of one URI can disagree.
    """
    if not _RESOURCE_URI_CHARS_RE.fullmatch(uri):
        raise EventError("ResourceUri contains characters a Partner Center referral URI does not")
    parts, host, port = split_https_url(uri, EventError, "ResourceUri")
    if parts.netloc.lower() != _netloc(host, port):  # e.g. an empty or zero-padded port
        raise EventError("ResourceUri must be an https URL with a plain host")
    if not on_allowed_host(host, allowed_hosts):
        raise EventError("ResourceUri is not on a configured Partner Center host")
    segments = parts.path.split("/")
    if (
        len(segments) < 3
        or segments[0] != ""
        or not all(_PATH_SEGMENT_RE.fullmatch(s) for s in segments[1:])
        or segments[-2] != "referrals"
    ):
        raise EventError("ResourceUri is not a Partner Center referral path (.../referrals/<id>)")
    referral_id = segments[-1]
    if not _GUID_RE.fullmatch(referral_id):
        raise EventError("ResourceUri does not end in a referral id that is a GUID")
    return referral_id


def _netloc(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown.lower() if port is None else f"{shown.lower()}:{port}"


def _reject_constant(name: str) -> Any:
    raise EventError(f"the body is not standard JSON ({name} is not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise EventError("the body is not standard JSON (a number is out of range)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        folded = key.lower()
        if folded in seen:
            raise EventError("the body repeats a key (keys are matched case-insensitively)")
        seen.add(folded)
    return dict(pairs)


def _load_json(body: bytes) -> Any:
    """``json.loads`` that refuses what strict JSON (RFC 8259) has no meaning for: ``NaN``,
    ``Infinity``, numbers beyond a float's range, and repeated keys."""
    try:
        return json.loads(
            body, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except EventError:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EventError("the body is not valid JSON") from None


def _change_date(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise EventError("ResourceChangeUtcDate must be an ISO 8601 date-time")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise EventError("ResourceChangeUtcDate must be an ISO 8601 date-time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_event(
    body: bytes,
    referral_events: Collection[str] = REFERRAL_EVENTS,
    resource_hosts: Collection[str] = DEFAULT_RESOURCE_HOSTS,
) -> WebhookEvent:
    """The event in a (verified) body; an :class:`EventError` naming the field when it is not usable.

    Only events of ``referral_events`` are required to name a referral, by a ``ResourceUri``
    on one of ``resource_hosts`` (see :func:`referral_id_from_uri`); others (the test event,
    event types the receiver does not handle) come back with ``referral_id`` None.
    """
    doc = _load_json(body)
    if not isinstance(doc, dict):
        raise EventError("the body must be a JSON object")
    name = _field(doc, "EventName")
    if not isinstance(name, str) or not _EVENT_NAME_RE.fullmatch(name):
        raise EventError("EventName is missing or malformed")
    uri = _field(doc, "ResourceUri")
    if not isinstance(uri, str) or not uri or len(uri) > MAX_RESOURCE_URI or any(c.isspace() for c in uri):
        raise EventError("ResourceUri is missing or malformed")
    if not uri.isprintable():
        raise EventError("ResourceUri is missing or malformed")
    key = _dedup_key(doc, body)
    if name not in referral_events:
        return WebhookEvent(event_name=name, resource_uri=uri, dedup_key=key)
    try:
        referral_id = referral_id_from_uri(uri, resource_hosts)
    except ValueError as exc:
        raise EventError(str(exc) if isinstance(exc, EventError) else "ResourceUri is malformed") from None
    return WebhookEvent(
        event_name=name,
        resource_uri=uri,
        dedup_key=key,
        referral_id=referral_id,
        change_date=_change_date(_field(doc, "ResourceChangeUtcDate")),
    )


# --------------------------------------------------------------------------- the app


class _Runtime:
    """What the app builds once, on first use: the settings, the verifier and the state store."""

    def __init__(self, settings: ReceiverSettings | None, store_factory: Callable[[], StateStore] | None) -> None:
        self._settings = settings
        self._store_factory = store_factory
        self._verifier: DeliveryVerifier | None = None
        self._store: StateStore | None = None
        self._lock = threading.Lock()

    def settings(self) -> ReceiverSettings:
        with self._lock:
            if self._settings is None:
                self._settings = ReceiverSettings.from_airflow()
            return self._settings

    def verifier(self) -> DeliveryVerifier:
        settings = self.settings()
        with self._lock:
            if self._verifier is None:
                self._verifier = settings.build_verifier()
            return self._verifier

    def store(self) -> StateStore:
        with self._lock:
            if self._store is None:
                if self._store_factory is not None:
                    store = self._store_factory()
                else:
                    from cosell_sync.state import StateStore

                    store = StateStore.from_airflow()
                store.migrate()
                self._store = store
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class _TooLarge(Exception):
    pass


def _json(status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(dict(payload), status_code=status, headers=dict(headers or {}))


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return _json(status, {"error": {"code": code, "message": message}}, headers)


async def _read_capped(request: Request, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def create_app(
    settings: ReceiverSettings | None = None, *, store_factory: Callable[[], StateStore] | None = None
) -> FastAPI:
    """The receiver app. ``settings`` default to Airflow's config and ``store_factory`` to
    :meth:`StateStore.from_airflow`; both are resolved on the first request."""
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from cosell_sync.errors import ConfigurationError
    from cosell_sync.webhooks.signature import CertificateError, SignatureError

    runtime = _Runtime(settings, store_factory)
    app = FastAPI(title="cosell-sync webhooks", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime

    def refuse(request: Request, status: int, code: str, message: str, **headers: str) -> Response:
        log.warning("Webhook delivery from %s refused (%s): %s", _client(request), status, message)
        return _error(status, code, message, {k.replace("_", "-"): v for k, v in headers.items()})

    async def partner_center(request: Request) -> Response:
        try:
            verifier = await run_in_threadpool(runtime.verifier)
            cap = runtime.settings().max_body_bytes
            resource_hosts = runtime.settings().resource_hosts
        except ConfigurationError as exc:
            log.error("The webhook receiver is misconfigured: %s", exc)
            return _error(503, "misconfigured", "the receiver is not configured", {"Retry-After": str(RETRY_AFTER_S)})

        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.strip().isdigit()):
                return refuse(request, 400, "badRequest", "Content-Length is malformed")
            if int(length) > cap:
                return refuse(request, 413, "payloadTooLarge", f"the body exceeds {cap} bytes")
        content_type = request.headers.get("content-type")
        if content_type is not None:
            media_type = content_type.partition(";")[0].strip().lower()
            if media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
                return refuse(request, 415, "unsupportedMediaType", "the body must be application/json")

        try:
            signature, certificate_url = verifier.check_headers(request.headers)
        except CertificateError as exc:
            return refuse(request, 403, "forbidden", str(exc))
        except SignatureError as exc:
            return refuse(request, 401, "unauthenticated", str(exc), WWW_Authenticate="Signature")

        try:
            body = await _read_capped(request, cap)
        except _TooLarge:
            return refuse(request, 413, "payloadTooLarge", f"the body exceeds {cap} bytes")
        except ClientDisconnect:
            return refuse(request, 400, "badRequest", "the client disconnected")

        try:
            await run_in_threadpool(verifier.verify, body, signature, certificate_url)
        except CertificateError as exc:
            return refuse(request, 403, "forbidden", str(exc))
        except SignatureError as exc:
            return refuse(request, 401, "unauthenticated", str(exc), WWW_Authenticate="Signature")

        try:
            event = parse_event(body, resource_hosts=resource_hosts)
        except EventError as exc:
            return refuse(request, 400, "invalidRequest", str(exc))

        if event.event_name == TEST_EVENT:
            log.info("Webhook test event acknowledged")
            return _json(200, {"status": "acknowledged", "eventName": event.event_name})
        if event.referral_id is None:
            log.warning("Webhook event %r is not handled here; acknowledged and ignored", event.event_name)
            return _json(200, {"status": "ignored", "eventName": event.event_name})

        try:
            store = await run_in_threadpool(runtime.store)
            (inserted,) = await run_in_threadpool(store.inbox_add, [event.inbox_row()])
        except Exception:
            log.exception("Storing webhook event %s for referral %s failed", event.event_name, event.referral_id)
            return _error(
                503, "serviceNotAvailable", "the event could not be stored", {"Retry-After": str(RETRY_AFTER_S)}
            )
        status = "accepted" if inserted else "duplicate"
        log.info("Webhook %s for referral %s: %s", event.event_name, event.referral_id, status)
        return _json(200, {"status": status, "eventName": event.event_name, "referralId": event.referral_id})

    app.add_route(WEBHOOK_PATH, partner_center, methods=["POST"])
    return app


class ReceiverApp:
    """An ASGI app that builds :func:`create_app` on its first request (what the plugin mounts).

    Loading the plugin then costs no FastAPI import in processes that never serve it.
    """

    def __init__(self, settings: ReceiverSettings | None = None) -> None:
        self._settings = settings
        self._app: FastAPI | None = None
        self._lock = threading.Lock()

    @property
    def app(self) -> FastAPI:
        with self._lock:
            if self._app is None:
                self._app = create_app(self._settings)
            return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
