"""Register the Partner Center webhook, verify it, and optionally prove that deliveries arrive.

Partner Center keeps a single webhook registration per partner: one URL and the list of
events sent to it (``POST`` creates it, ``PUT`` replaces it, a second ``POST`` gets 409
and there is no ``DELETE``). :class:`PartnerCenterWebhookRegistrationOperator` reads the
current registration first and then:

* with none registered, ``POST``\\ s the requested one (action ``created``);
* when the current one already has exactly the requested URL and events, writes nothing
  (action ``unchanged``), so a re-run or a retry is always safe, even without ``overwrite``;
* with ``overwrite``, ``PUT``\\ s the requested one (action ``updated``);
* otherwise fails, without retries, with a message showing the current URL and events and
  how to replace them.

Whatever it wrote, it reads the registration back and fails unless the URL and the events
match. With ``send_test_event`` it also registers ``test-created``, asks Partner Center for
a validation event (``POST registration/validationEvents``, at most 2 a minute: the hook
waits out a ``429``'s ``Retry-After``), and polls the event until Partner Center reports it
completed, failing unless every delivery result is ``OK``.

Secrets: the operator never logs or returns credentials. A webhook URL may carry a key in its
query string (Azure Functions' ``?code=``), so query values are shown as ``***`` in logs,
errors and the returned summary, and long ones are registered with Airflow's secrets masker.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from cosell_sync.errors import ConflictError
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook, registration_value
from cosell_sync.masking import mask

if TYPE_CHECKING:
    import jinja2
    from airflow.sdk import Context

TEST_EVENT = "test-created"
#: Validation event statuses that end the polling. Partner Center documents ``completed``;
#: a completed event's ``results`` say whether the delivery was accepted.
VALIDATION_DONE = frozenset({"completed", "complete", "done", "succeeded", "success"})
VALIDATION_FAILED = frozenset({"failed", "failure", "error", "cancelled", "canceled"})
#: Query values at least this long are treated as possible secrets and masked in task logs.
_MASK_MIN_LENGTH = 8


class WebhookRegistrationError(AirflowFailException):
    """The registration cannot be made as asked (bad parameters, or another registration is
    in place and ``overwrite`` is off). Retrying would not help, so the task fails at once."""


class WebhookVerificationError(AirflowException):
    """The write did not take effect as asked, or the validation event was not delivered.
    Retryable: a retry finds the registration in place and only repeats the checks."""


def display_url(url: str) -> str:
    """``url`` for logs and messages: credentials dropped and query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if port:
        netloc = f"{netloc}:{port}"
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _as_bool(value: Any, name: str) -> bool:
    """A bool param; tolerates the strings a non-native template rendering produces."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", "", "none"):
            return False
    if value is None:
        return False
    raise WebhookRegistrationError(f"'{name}' must be true or false, not {value!r}.")


def _as_event_list(value: Any) -> list[str]:
    """The ``events`` param as a list of names; accepts a list, or a string holding a JSON or
    Python list (what a non-native template rendering of a list gives) or comma-separated names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise WebhookRegistrationError(f"'events' is not a list of event names: {text!r}.") from None
        else:
            value = [part for part in (p.strip() for p in text.split(",")) if part]
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise WebhookRegistrationError(f"'events' must be a list of event names, not {type(value).__name__}.")
    bad = [e for e in value if not isinstance(e, str) or not e.strip()]
    if bad:
        raise WebhookRegistrationError(f"'events' must hold non-empty event names; got {bad!r}.")
    names = list(dict.fromkeys(e.strip() for e in value))
    if not names:
        raise WebhookRegistrationError(f"'events' is empty; choose at least one of {', '.join(REFERRAL_EVENTS)}.")
    return names


def _check_webhook_url(value: Any) -> str:
    """The webhook URL, which must be an absolute ``https://`` URL without credentials."""
    if not isinstance(value, str) or not value.strip():
        raise WebhookRegistrationError("'webhook_url' is required: the public https:// URL of the receiver.")
    url = value.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise WebhookRegistrationError(f"'webhook_url' {display_url(url)} is not a valid URL: {exc}.") from None
    if any(c.isspace() for c in url):
        raise WebhookRegistrationError(f"'webhook_url' {display_url(url)} must not contain whitespace.")
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise WebhookRegistrationError(
            f"'webhook_url' must be an absolute https:// URL (Partner Center delivers over TLS only); "
            f"got {display_url(url)}."
        )
    if parts.username is not None or parts.password is not None:
        raise WebhookRegistrationError("'webhook_url' must not carry credentials (user:password@).")
    if parts.fragment:
        raise WebhookRegistrationError(f"'webhook_url' {display_url(url)} must not have a #fragment.")
    return url


def _event_set(events: Any) -> frozenset[str]:
    return frozenset(str(e).lower() for e in (events or []))


def describe_registration(doc: Mapping[str, Any] | None) -> str:
    """One line naming a registration's URL and events, safe to log."""
    if not doc:
        return "none"
    url = registration_value(doc, "WebhookUrl")
    events = registration_value(doc, "WebhookEvents") or []
    return f"URL {display_url(str(url)) if url else '<none>'}, events [{', '.join(map(str, events))}]"


class PartnerCenterWebhookRegistrationOperator(BaseOperator):
    """Create or replace the Partner Center webhook registration, and verify it.

    :param webhook_url: The public ``https://`` URL of the receiver (templated).
    :param events: The events to deliver; default the four referral events (templated).
        Names must be among Partner Center's ``GET registration/events``.
    :param overwrite: Replace an existing, different registration with ``PUT`` (templated).
        Without it, an existing different registration fails the task, showing what is registered.
    :param send_test_event: Also register ``test-created``, send a validation event and wait
        until Partner Center reports it delivered (templated).
    :param partner_center_conn_id: The ``partner_center`` connection.
    :param validation_poll_interval: Longest wait, in seconds, between two polls of the
        validation event (polling starts at 0.5 s and backs off to this).
    :param validation_timeout: Seconds to wait for the validation event to complete.
    :return: ``{"webhook_url", "events", "action", "validation"}``, where ``action`` is
        ``created``, ``updated`` or ``unchanged`` and ``validation`` is ``None`` or
        ``{"correlation_id", "status", "response_codes"}``. Query values of the URL are ``***``.
    """

    template_fields: Sequence[str] = ("webhook_url", "events", "overwrite", "send_test_event")
    ui_color: ClassVar[str] = "#e8f1fb"

    def __init__(
        self,
        *,
        webhook_url: str,
        events: Sequence[str] | str = REFERRAL_EVENTS,
        overwrite: bool | str = False,
        send_test_event: bool | str = False,
        partner_center_conn_id: str = PartnerCenterHook.default_conn_name,
        validation_poll_interval: float = 5.0,
        validation_timeout: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.webhook_url = webhook_url
        self.events = events
        self.overwrite = overwrite
        self.send_test_event = send_test_event
        self.partner_center_conn_id = partner_center_conn_id
        self.validation_poll_interval = validation_poll_interval
        self.validation_timeout = validation_timeout

    def render_template_fields(self, context: Context, jinja_env: jinja2.Environment | None = None) -> None:
        """Render, then register long query values of the URL with the secrets masker, so a key
        such as ``?code=...`` is masked in the rendered-template view and the task log."""
        super().render_template_fields(context, jinja_env)
        if isinstance(self.webhook_url, str):
            try:
                query = urlsplit(self.webhook_url).query
            except ValueError:
                return
            for _, value in parse_qsl(query, keep_blank_values=True):
                if len(value) >= _MASK_MIN_LENGTH:
                    mask(value)

    # -- execution ------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        url = _check_webhook_url(self.webhook_url)
        requested = _as_event_list(self.events)
        overwrite = _as_bool(self.overwrite, "overwrite")
        send_test_event = _as_bool(self.send_test_event, "send_test_event")

        hook = PartnerCenterHook(self.partner_center_conn_id)
        events = self._validate_events(hook, requested, send_test_event)
        self.log.info("Requested webhook registration: %s", describe_registration(self._doc(url, events)))

        current = hook.get_webhook_registration()
        self.log.info("Current webhook registration: %s", describe_registration(current))
        action = self._register(hook, current, url, events, overwrite)
        self._verify(hook, url, events)

        validation = self._send_test_event(hook, url) if send_test_event else None
        return {"webhook_url": display_url(url), "events": events, "action": action, "validation": validation}

    @staticmethod
    def _doc(url: str, events: Sequence[str]) -> dict[str, Any]:
        return {"WebhookUrl": url, "WebhookEvents": list(events)}

    def _validate_events(self, hook: PartnerCenterHook, requested: list[str], send_test_event: bool) -> list[str]:
        """The requested events in Partner Center's spelling, plus ``test-created`` when a test
        event is asked for; fails naming any event Partner Center does not offer."""
        available = hook.list_webhook_events()
        canonical = {str(e).lower(): str(e) for e in available}
        unknown = [e for e in requested if e.lower() not in canonical]
        if unknown:
            raise WebhookRegistrationError(
                f"Unknown webhook event(s): {', '.join(repr(e) for e in unknown)}. "
                f"Partner Center offers: {', '.join(available)}."
            )
        events = list(dict.fromkeys(canonical[e.lower()] for e in requested))
        if send_test_event and TEST_EVENT not in {e.lower() for e in events}:
            if TEST_EVENT not in canonical:
                raise WebhookRegistrationError(
                    f"send_test_event needs the '{TEST_EVENT}' event, which Partner Center does not offer "
                    f"(it offers: {', '.join(available)})."
                )
            events.append(canonical[TEST_EVENT])
            self.log.info("send_test_event: '%s' is registered along with the requested events.", TEST_EVENT)
        return events

    def _register(
        self,
        hook: PartnerCenterHook,
        current: dict[str, Any] | None,
        url: str,
        events: list[str],
        overwrite: bool,
    ) -> str:
        """Write the registration as needed; returns the action taken."""
        if current is not None and self._matches(current, url, events):
            self.log.info("The webhook is already registered with this URL and these events; nothing to write.")
            return "unchanged"
        if current is None:
            try:
                hook.create_webhook_registration(url, events)
            except ConflictError:
                # Registered by someone else between our read and our POST.
                current = hook.get_webhook_registration()
                self.log.warning("POST answered 409: a registration appeared: %s", describe_registration(current))
                if current is not None and self._matches(current, url, events):
                    return "unchanged"
                if not overwrite:
                    raise self._already_registered(current, url, events) from None
            else:
                self.log.info("Created the webhook registration (POST).")
                return "created"
        if not overwrite:
            raise self._already_registered(current, url, events)
        hook.update_webhook_registration(url, events)
        self.log.info("Replaced the webhook registration (PUT); it was: %s", describe_registration(current))
        return "updated"

    @staticmethod
    def _matches(doc: Mapping[str, Any], url: str, events: Sequence[str]) -> bool:
        return registration_value(doc, "WebhookUrl") == url and _event_set(
            registration_value(doc, "WebhookEvents")
        ) == _event_set(events)

    def _already_registered(
        self, current: Mapping[str, Any] | None, url: str, events: Sequence[str]
    ) -> WebhookRegistrationError:
        return WebhookRegistrationError(
            "A different Partner Center webhook is already registered: "
            f"{describe_registration(current)}. Requested: {describe_registration(self._doc(url, events))}. "
            "Nothing was changed. To replace the registration, run again with overwrite=true "
            "(the 'overwrite' param of the partner_center_webhook_registration DAG)."
        )

    def _verify(self, hook: PartnerCenterHook, url: str, events: Sequence[str]) -> None:
        """Read the registration back; fail unless it has exactly the URL and events asked for."""
        stored = hook.get_webhook_registration()
        if stored is None or not self._matches(stored, url, events):
            raise WebhookVerificationError(
                "The webhook registration read back does not match what was written. "
                f"Expected: {describe_registration(self._doc(url, events))}. "
                f"Read back: {describe_registration(stored)}."
            )
        self.log.info("Verified the webhook registration: %s", describe_registration(stored))

    def _send_test_event(self, hook: PartnerCenterHook, url: str) -> dict[str, Any]:
        """Send a validation (``test-created``) event and poll it until Partner Center reports it done."""
        return send_validation_event(
            hook, url, timeout=self.validation_timeout, poll_interval=self.validation_poll_interval, log=self.log
        )


def send_validation_event(
    hook: PartnerCenterHook, url: str, *, timeout: float, poll_interval: float, log: logging.Logger | Any
) -> dict[str, Any]:
    """Send a validation (``test-created``) event to the registered ``url`` and poll it until Partner
    Center reports it done: ``{"correlation_id", "status", "response_codes"}``, or a
    :class:`WebhookVerificationError` saying why it was not delivered (also ``cosell-sync check``'s)."""
    correlation_id = hook.create_validation_event()
    log.info("Validation event sent; correlation id %s. Waiting for its delivery.", correlation_id)
    deadline = time.monotonic() + timeout
    delay = min(0.5, poll_interval)
    status = ""
    while True:
        doc = hook.get_validation_event(correlation_id)
        status = str(registration_value(doc, "status") or "").lower()
        if status in VALIDATION_DONE or status in VALIDATION_FAILED:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WebhookVerificationError(
                f"The validation event {correlation_id} did not complete within {timeout:g} s "
                f"(last status: {status or 'none'}). Check that {display_url(url)} is reachable from Partner "
                "Center."
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, poll_interval)

    results = [r for r in registration_value(doc, "results") or [] if isinstance(r, Mapping)]
    codes = [str(registration_value(r, "responseCode")) for r in results]
    failed = [r for r in results if not _delivered(registration_value(r, "responseCode"))]
    if status in VALIDATION_FAILED or failed:
        detail = "; ".join(_describe_result(r) for r in failed)
        raise WebhookVerificationError(
            f"The validation event {correlation_id} was not delivered to {display_url(url)} "
            f"(status {status}{'; ' + detail if detail else ''}). The receiver must be reachable from "
            "Partner Center over https and answer 2xx."
        )
    if not results:
        log.warning("The validation event %s completed without delivery results.", correlation_id)
    else:
        log.info("The validation event %s was delivered: %s.", correlation_id, ", ".join(codes))
    return {"correlation_id": correlation_id, "status": status, "response_codes": codes}


def _delivered(code: Any) -> bool:
    """Whether a validation result's ``responseCode`` (``"OK"`` or an HTTP status) means accepted."""
    text = str(code).strip()
    if text.upper() == "OK":
        return True
    return text.isdigit() and 200 <= int(text) < 300


def _describe_result(result: Mapping[str, Any]) -> str:
    """``responseCode 500: HTTP 500`` for one validation result."""
    message = registration_value(result, "responseMessage") or registration_value(result, "systemMessage")
    code = f"responseCode {registration_value(result, 'responseCode')}"
    return f"{code}: {message}" if message else code
