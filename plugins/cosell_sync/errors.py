"""Typed errors raised by every cosell-sync hook.

Each carries the HTTP status, the service's error code, its message and the request
id, so that a failure can be reported (and quoted to Microsoft or Salesforce support)
without digging through logs. None of them ever holds a credential: messages come
from the service's error body, and URLs are reduced to their path.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, InitVar, dataclass, field
from urllib.parse import urlsplit


class CosellError(Exception):
    """Base class of every cosell-sync error."""


class ConfigurationError(CosellError):
    """A connection or setting is missing or invalid."""


@dataclass(eq=False)
class ApiError(CosellError):
    """An API call failed: the system, the service's message, and what is known of the call.
    ``url`` is kept as its path only (``path``), so no query value reaches a message."""

    system: str
    message: str
    _: KW_ONLY
    status: int | None = None
    code: str | None = None
    request_id: str | None = None
    method: str | None = None
    url: InitVar[str | None] = None
    path: str | None = field(init=False, default=None)

    def __post_init__(self, url: str | None) -> None:
        self.path = urlsplit(url).path if url else None
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" {self.method} {self.path}" if self.method and self.path else ""
        status = f" HTTP {self.status}" if self.status else ""
        code = f" {self.code}" if self.code else ""
        rid = f" (request-id {self.request_id})" if self.request_id else ""
        return f"{self.system}{where} failed:{status}{code}: {self.message}{rid}"


class AuthenticationError(ApiError):
    """401/403, or the token service refused to issue a token."""


class NotFoundError(ApiError):
    """404."""


class ConflictError(ApiError):
    """409."""


class PreconditionFailedError(ApiError):
    """412: the ETag sent in If-Match no longer matches; re-read and retry."""


class ValidationError(ApiError):
    """400 (or 422): the service rejected the request's content."""


class ThrottledError(ApiError):
    """429 that could not be waited out within the retry budget."""

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        self.retry_after = retry_after
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class ServerError(ApiError):
    """5xx after the retries ran out."""


class TransportError(ApiError):
    """The connection failed (DNS, TLS, reset, timeout) after the retries ran out,
    or on a non-idempotent call that could not be retried safely."""


def error_class_for(status: int) -> type[ApiError]:
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status == 412:
        return PreconditionFailedError
    if status == 429:
        return ThrottledError
    if status >= 500:
        return ServerError
    if 400 <= status < 500:
        return ValidationError
    return ApiError
