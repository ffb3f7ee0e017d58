"""OData ``$batch`` for the Dataverse Web API: building the multipart request and
parsing the multipart response. Pure functions, no I/O.

Wire format (CRLF line endings)::

    --batch_<id>
    Content-Type: multipart/mixed; boundary=changeset_<id>      <- an atomic change set

    --changeset_<id>
    Content-Type: application/http
    Content-Transfer-Encoding: binary
    Content-ID: 1

    POST /api/data/v9.2/accounts HTTP/1.1
    Content-Type: application/json; type=entry

    {"name": "..."}
    --changeset_<id>--
    --batch_<id>
    Content-Type: application/http                              <- a single request
    Content-Transfer-Encoding: binary

    GET /api/data/v9.2/accounts(...) HTTP/1.1
    Accept: application/json

    --batch_<id>--
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CRLF = "\r\n"
MAX_BATCH_REQUESTS = 1000


@dataclass(frozen=True)
class BatchRequest:
    """One operation. ``url`` is relative to the API root (``accounts(...)``) or absolute."""

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_id: str | None = None  # inside a change set; later parts may refer to "$<content_id>"


@dataclass(frozen=True)
class ChangeSet:
    """Requests applied atomically: all succeed, or none is applied."""

    requests: Sequence[BatchRequest]


@dataclass
class BatchResponse:
    status: int
    headers: dict[str, str]
    body: Any
    content_id: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str | None:
        return self.body.get("error", {}).get("code") if isinstance(self.body, dict) else None

    @property
    def error_message(self) -> str | None:
        return self.body.get("error", {}).get("message") if isinstance(self.body, dict) else None

    @property
    def entity_id(self) -> str | None:
        """The GUID of a created or upserted row, from ``OData-EntityId``."""
        return entity_id_from_url(header(self.headers, "OData-EntityId") or header(self.headers, "Location"))


def header(headers: Mapping[str, str], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


_ENTITY_ID = re.compile(r"\(([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)\s*$")


def entity_id_from_url(url: str | None) -> str | None:
    match = _ENTITY_ID.search(url or "")
    return match.group(1).lower() if match else None


def count_requests(items: Sequence[BatchRequest | ChangeSet]) -> int:
    return sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)


def _http_part(request: BatchRequest, api_path: str) -> str:
    url = request.url if "://" in request.url or request.url.startswith("/") else f"{api_path}/{request.url}"
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if request.content_id is not None:
        lines.append(f"Content-ID: {request.content_id}")
    lines += ["", f"{request.method.upper()} {url} HTTP/1.1"]
    headers = dict(request.headers)
    if request.body is not None:
        headers.setdefault("Content-Type", "application/json; type=entry")
    elif request.method.upper() == "GET":
        headers.setdefault("Accept", "application/json")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("")
    # Standard JSON only: NaN or Infinity raise here (ValueError) instead of going on the wire.
    lines.append(json.dumps(request.body, separators=(",", ":"), allow_nan=False) if request.body is not None else "")
    return CRLF.join(lines)


def build_batch(items: Sequence[BatchRequest | ChangeSet], api_path: str) -> tuple[str, bytes]:
    """(Content-Type header value, body) of a ``$batch`` request."""
    total = count_requests(items)
    if total == 0:
        raise ValueError("a batch needs at least one request")
    if total > MAX_BATCH_REQUESTS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_REQUESTS} requests, got {total}")
    boundary = f"batch_{uuid.uuid4()}"
    out: list[str] = []
    for item in items:
        out.append(f"--{boundary}")
        if isinstance(item, ChangeSet):
            if any(r.method.upper() == "GET" for r in item.requests):
                raise ValueError("a change set cannot contain GET requests")
            cs = f"changeset_{uuid.uuid4()}"
            out.append(f"Content-Type: multipart/mixed; boundary={cs}")
            out.append("")
            for n, request in enumerate(item.requests, start=1):
                if request.content_id is None:
                    request = BatchRequest(request.method, request.url, request.body, request.headers, str(n))
                out.append(f"--{cs}")
                out.append(_http_part(request, api_path))
            out.append(f"--{cs}--")
        else:
            out.append(_http_part(item, api_path))
    out.append(f"--{boundary}--")
    out.append("")
    return f"multipart/mixed; boundary={boundary}", CRLF.join(out).encode("utf-8")


class BatchParseError(ValueError):
    pass


def _boundary(content_type: str) -> str:
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise BatchParseError(f"no boundary in Content-Type {content_type!r}")
    return match.group(1)


def _split(body: str, boundary: str) -> Iterator[str]:
    delimiter = f"--{boundary}"
    chunks = re.split(rf"(?:\r?\n)?{re.escape(delimiter)}", body)
    if len(chunks) < 2:
        raise BatchParseError(f"boundary {boundary!r} not found in the batch response")
    for chunk in chunks[1:]:
        if chunk.startswith("--"):  # the closing delimiter
            return
        yield chunk.lstrip("\r\n") if chunk.startswith(("\r\n", "\n")) else chunk
    raise BatchParseError(f"the batch response has no closing delimiter for {boundary!r}")


def _headers_and_rest(text: str) -> tuple[dict[str, str], str]:
    head, sep, rest = text.partition("\r\n\r\n")
    if not sep:
        head, sep, rest = text.partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
    return headers, rest


def _parse_http(text: str, content_id: str | None) -> BatchResponse:
    status_line, _, rest = text.partition("\n")
    match = re.match(r"HTTP/\d\.\d (\d{3})", status_line.strip())
    if not match:
        raise BatchParseError(f"bad status line in batch response part: {status_line.strip()[:80]!r}")
    headers, body_text = _headers_and_rest(rest)
    body_text = body_text.strip()
    body: Any = None
    if body_text:
        try:
            body = json.loads(body_text)
        except json.JSONDecodeError:
            body = body_text
    return BatchResponse(int(match.group(1)), headers, body, content_id)


def parse_batch(content_type: str, body: bytes | str) -> list[BatchResponse]:
    """Every response of a ``$batch`` answer, in order; change-set responses are flattened
    (a failed change set answers with one error response)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    responses: list[BatchResponse] = []
    for part in _split(text, _boundary(content_type)):
        headers, rest = _headers_and_rest(part)
        ctype = header(headers, "Content-Type") or ""
        if ctype.lower().startswith("multipart/mixed"):
            for inner in _split(rest, _boundary(ctype)):
                inner_headers, inner_rest = _headers_and_rest(inner)
                responses.append(_parse_http(inner_rest, header(inner_headers, "Content-ID")))
        else:
            responses.append(_parse_http(rest, header(headers, "Content-ID")))
    return responses
