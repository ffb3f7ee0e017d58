"""OData ``$batch`` for the Dataverse emulator: the multipart wire format (parsing the
request, rendering the response) and the execution rules (change sets, ``Content-ID``
references, stop-at-first-error vs ``odata.continue-on-error``).

What it follows, from Microsoft Learn "Execute batch operations using the Web API" and
"Troubleshoot Dataverse Web API client errors":

* the request is ``multipart/mixed; boundary=batch_...``; every part carries
  ``Content-Type: application/http`` and ``Content-Transfer-Encoding: binary`` and holds an
  HTTP request (request line, headers, blank line, body); a change set is a nested
  ``multipart/mixed; boundary=changeset_...`` part; at most 1,000 requests; no GET in a
  change set; ``$<Content-ID>`` refers to an entity created earlier in the same change set
  (``Content-ID Reference: '$1' does not exist in the batch context.`` otherwise);
* a body whose last line does not end with CRLF is refused ("Stream was not readable");
* the response is ``multipart/mixed; boundary=batchresponse_<guid>``, change sets answer
  with nested ``changesetresponse_<guid>`` parts echoing ``Content-ID``; a failed change set
  answers with that single error response (and nothing of it is applied);
* without ``Prefer: odata.continue-on-error`` processing stops at the first failure and the
  batch answers with that error's status; with it, every request is attempted and the batch
  answers 200.

The emulator supplies the per-request dispatch and the transaction; this module has no
state of its own.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from ..server import Headers, HTTPError, Request, Response, new_request_id
from .records import _err, _preferences, _segment_not_found, _wants_formatted_values, payload_error
from .schema import API

CRLF = b"\r\n"
MAX_REQUESTS = 1000
_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_REQUEST_LINE = re.compile(r"^([A-Za-z]+)\s+(\S+)\s+(HTTP/\d\.\d)$")
_REFERENCE = re.compile(r"^\$([A-Za-z0-9_.\-]+)(.*)$", re.DOTALL)


class BatchFormatError(Exception):
    """The batch body cannot be read; ``str(err)`` is the inner exception text."""


@dataclass
class Operation:
    """One HTTP request inside the batch."""

    method: str
    url: str
    headers: Headers
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    operations: list[Operation] = field(default_factory=list)


BatchItem = Operation | ChangeSet


@dataclass
class PartResult:
    """A response rendered as one ``application/http`` part."""

    response: Response
    content_id: str | None = None


@dataclass
class ChangeSetResult:
    """A successful change set: one part per request, in a nested multipart."""

    parts: list[PartResult]


BatchResult = PartResult | ChangeSetResult


# ---------------------------------------------------------------------------
# Parsing


def boundary_of(content_type: str | None) -> str:
    if not content_type or not content_type.strip().lower().startswith("multipart/mixed"):
        raise BatchFormatError(
            "Microsoft.OData.ODataException: The content type "
            f"'{content_type or ''}' specified in the request is not valid for a batch request; "
            "it must be 'multipart/mixed' with a boundary."
        )
    match = _BOUNDARY.search(content_type)
    if not match:
        raise BatchFormatError(
            "Microsoft.OData.ODataException: The 'boundary' parameter is missing from the multipart/mixed content type."
        )
    return match.group(1) or match.group(2)


def _split(body: bytes, boundary: str) -> tuple[list[bytes], bytes]:
    """(parts, epilogue) of a multipart body. The line break before a delimiter belongs to it."""
    delimiter = re.escape(b"--" + boundary.encode("latin-1"))
    pattern = re.compile(rb"(?:\A|\r?\n)" + delimiter + rb"(--)?[ \t]*(?=\r?\n|\Z)")
    matches = list(pattern.finditer(body))
    if not matches:
        raise BatchFormatError(f"Microsoft.OData.ODataException: The boundary '{boundary}' was not found in the body.")
    parts: list[bytes] = []
    for index, match in enumerate(matches):
        if match.group(1):
            return parts, body[match.end() :]
        if index + 1 == len(matches):
            break
        start = match.end()
        if body.startswith(b"\r\n", start):
            start += 2
        elif body.startswith(b"\n", start):
            start += 1
        parts.append(body[start : matches[index + 1].start()])
    raise BatchFormatError(
        f"Microsoft.OData.ODataException: The closing delimiter '--{boundary}--' is missing from the batch body."
    )


def _headers(block: bytes) -> tuple[Headers, bytes]:
    """Split a header block from what follows the blank line."""
    if block.startswith(b"\r\n"):
        return Headers(), block[2:]
    if block.startswith(b"\n"):
        return Headers(), block[1:]
    match = re.search(rb"\r?\n\r?\n", block)
    head, rest = (block[: match.start()], block[match.end() :]) if match else (block, b"")
    items: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BatchFormatError(f"Microsoft.OData.ODataException: The header '{line.strip()}' is not valid.")
        items.append((name.strip(), value.strip()))
    return Headers(items), rest


def _operation(mime: Headers, rest: bytes) -> Operation:
    encoding = (mime.get("Content-Transfer-Encoding") or "").lower()
    if encoding != "binary":
        raise BatchFormatError(
            "Microsoft.OData.ODataException: The 'Content-Transfer-Encoding' header of a batch part "
            f"must be 'binary', not '{mime.get('Content-Transfer-Encoding') or ''}'."
        )
    line, sep, remainder = rest.partition(b"\n")
    request_line = line.decode("utf-8", "replace").strip()
    match = _REQUEST_LINE.match(request_line)
    if not match:
        raise BatchFormatError(
            f"Microsoft.OData.ODataException: The request line '{request_line[:200]}' of a batch part is not valid."
        )
    method, url, version = match.groups()
    if version != "HTTP/1.1":
        raise BatchFormatError(
            f"Microsoft.OData.ODataException: The HTTP version '{version}' used in a batch operation request "
            "is not valid. The value must be 'HTTP/1.1'."
        )
    headers, body = _headers(remainder) if sep else (Headers(), b"")
    content_id = mime.get("Content-ID") or headers.get("Content-ID")
    return Operation(method.upper(), url, headers, body.rstrip(b"\r\n"), content_id)


def _change_set(content_type: str, rest: bytes) -> ChangeSet:
    changeset = ChangeSet()
    parts, _ = _split(rest, boundary_of(content_type))
    for part in parts:
        mime, inner = _headers(part)
        ctype = (mime.get("Content-Type") or "").lower()
        if not ctype.startswith("application/http"):
            raise BatchFormatError(
                "Microsoft.OData.ODataException: A change set part must have the content type "
                f"'application/http', not '{mime.get('Content-Type') or ''}'; change sets cannot be nested."
            )
        operation = _operation(mime, inner)
        if operation.method not in ("POST", "PUT", "PATCH", "DELETE"):
            raise BatchFormatError(
                f"Microsoft.OData.ODataException: An invalid HTTP method '{operation.method}' was detected for a "
                "request in a change set. Requests in change sets only support the HTTP methods 'POST', 'PUT', "
                "'DELETE', and 'PATCH'."
            )
        changeset.operations.append(operation)
    return changeset


def parse_batch(content_type: str | None, body: bytes) -> list[BatchItem]:
    """The top-level items of a ``$batch`` request body; raises :class:`BatchFormatError`."""
    parts, epilogue = _split(body, boundary_of(content_type))
    if not (epilogue.startswith(b"\r\n") or epilogue.startswith(b"\n\n")):
        # Dataverse cannot read a batch body whose last line is not terminated by CRLF.
        raise BatchFormatError("System.ArgumentException: Stream was not readable.")
    items: list[BatchItem] = []
    for part in parts:
        mime, rest = _headers(part)
        ctype = mime.get("Content-Type") or ""
        if ctype.lower().startswith("multipart/mixed"):
            items.append(_change_set(ctype, rest))
        elif ctype.lower().startswith("application/http"):
            items.append(_operation(mime, rest))
        else:
            raise BatchFormatError(
                f"Microsoft.OData.ODataException: The content type '{ctype}' of a batch part is not valid; "
                "expected 'application/http' or 'multipart/mixed'."
            )
    return items


def count_operations(items: list[BatchItem]) -> int:
    return sum(len(item.operations) if isinstance(item, ChangeSet) else 1 for item in items)


# ---------------------------------------------------------------------------
# Content-ID references


def _reference_error(name: str) -> HTTPError:
    return HTTPError(400, "0x0", f"Content-ID Reference: '${name}' does not exist in the batch context.")


def _substitute(value: Any, refs: dict[str, str]) -> Any:
    """Replace ``"$n"`` in ``@odata.bind`` / ``@odata.id`` values, at any depth."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, str) and key.endswith(("@odata.bind", "@odata.id")) and item.startswith("$"):
                match = _REFERENCE.match(item)
                if match:
                    name, suffix = match.groups()
                    if name not in refs:
                        raise _reference_error(name)
                    item = refs[name] + suffix
            out[key] = _substitute(item, refs)
        return out
    if isinstance(value, list):
        return [_substitute(item, refs) for item in value]
    return value


def resolve_references(operation: Operation, refs: dict[str, str]) -> Operation:
    """The operation with ``$<Content-ID>`` replaced, in its URL and in its JSON body."""
    url = operation.url
    if url.startswith("$"):
        match = _REFERENCE.match(url)
        if match:
            name, suffix = match.groups()
            if name not in refs:
                raise _reference_error(name)
            url = refs[name] + suffix
    body = operation.body
    if body and b"$" in body:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if doc is not None:
            body = json.dumps(_substitute(doc, refs), ensure_ascii=False).encode("utf-8")
    return Operation(operation.method, url, operation.headers, body, operation.content_id)


# ---------------------------------------------------------------------------
# Execution


class _ChangeSetFailed(Exception):
    def __init__(self, result: PartResult) -> None:
        super().__init__("change set failed")
        self.result = result


def _run_change_set(
    changeset: ChangeSet,
    dispatch: Callable[[Operation], Response],
    error: Callable[[HTTPError], Response],
    transaction: Callable[[], AbstractContextManager[Any]],
    entity_path: Callable[[Response], str | None],
) -> BatchResult:
    refs: dict[str, str] = {}
    parts: list[PartResult] = []
    try:
        with transaction():
            for operation in changeset.operations:
                try:
                    resolved = resolve_references(operation, refs)
                except HTTPError as err:
                    raise _ChangeSetFailed(PartResult(error(err), operation.content_id)) from None
                response = dispatch(resolved)
                if response.status >= 400:
                    raise _ChangeSetFailed(PartResult(response, operation.content_id))
                path = entity_path(response)
                if operation.content_id and path:
                    refs[operation.content_id] = path
                parts.append(PartResult(response, operation.content_id))
    except _ChangeSetFailed as failed:
        return failed.result  # everything in the change set was rolled back
    return ChangeSetResult(parts)


def execute(
    items: list[BatchItem],
    *,
    dispatch: Callable[[Operation], Response],
    error: Callable[[HTTPError], Response],
    transaction: Callable[[], AbstractContextManager[Any]],
    entity_path: Callable[[Response], str | None],
    continue_on_error: bool,
) -> tuple[list[BatchResult], int | None]:
    """Run the items in order: (results, status of the failure that stopped the batch)."""
    results: list[BatchResult] = []
    for item in items:
        if isinstance(item, ChangeSet):
            result = _run_change_set(item, dispatch, error, transaction, entity_path)
        else:
            result = PartResult(dispatch(item), item.content_id)
        results.append(result)
        if isinstance(result, PartResult) and result.response.status >= 400 and not continue_on_error:
            return results, result.response.status
    return results, None


# ---------------------------------------------------------------------------
# Rendering


def _status_line(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}"


def _http_part(part: PartResult) -> bytes:
    response = part.response
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if part.content_id is not None:
        lines.append(f"Content-ID: {part.content_id}")
    lines += ["", _status_line(response.status)]
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-length", "odata-version")]
    entity_id = response.headers.get("OData-EntityId")
    if entity_id and response.headers.get("Location") is None:
        headers.insert(0, ("Location", entity_id))
    ordered = [(k, v) for k, v in headers if k.upper() == "REQ_ID"]
    ordered += [(k, v) for k, v in headers if k.upper() != "REQ_ID" and k.lower() == "content-type"]
    ordered.append(("OData-Version", "4.0"))
    ordered += [(k, v) for k, v in headers if k.upper() != "REQ_ID" and k.lower() != "content-type"]
    lines += [f"{k}: {v}" for k, v in ordered]
    lines.append("")
    return "\r\n".join(lines).encode("utf-8") + CRLF + response.body


def _delimited(boundary: str, chunks: Iterator[bytes]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        out += b"--" + boundary.encode() + CRLF + chunk + CRLF
    out += b"--" + boundary.encode() + b"--" + CRLF
    return bytes(out)


def _render_item(result: BatchResult) -> bytes:
    if isinstance(result, PartResult):
        return _http_part(result)
    boundary = f"changesetresponse_{uuid.uuid4()}"
    head = f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n".encode()
    return head + _delimited(boundary, (_http_part(part) for part in result.parts)).removesuffix(CRLF)


def render_batch(results: list[BatchResult]) -> tuple[str, bytes]:
    """(Content-Type, body) of the batch response."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    return f"multipart/mixed; boundary={boundary}", _delimited(boundary, (_render_item(r) for r in results))


log = logging.getLogger(__name__)


class BatchMixin:
    """The ``$batch`` handler of :class:`Dynamics365Emulator`."""

    def _batch(self, request: Request) -> Response:
        prefer = _preferences(request.headers)
        try:
            items = parse_batch(request.headers.get("Content-Type"), request.body)
            total = count_operations(items)
            if total > MAX_REQUESTS:
                # Guessed text; the limit itself is documented.
                raise BatchFormatError(
                    f"Microsoft.OData.ODataException: The batch contains {total} requests; "
                    f"the maximum is {MAX_REQUESTS}."
                )
        except BatchFormatError as exc:
            failure = PartResult(self.error_response(payload_error(str(exc)), request))
            failure.response.headers.set("REQ_ID", new_request_id())
            content_type, payload = render_batch([failure])
            return Response(400, payload, Headers([("Content-Type", content_type)]))
        with self.lock:
            results, failed = execute(
                items,
                dispatch=self._dispatch_inner,
                error=lambda err: self._inner_error(err, request),
                transaction=self._transaction,
                entity_path=self._entity_path,
                continue_on_error=prefer.continue_on_error,
            )
        content_type, payload = render_batch(results)
        resp = Response(failed or 200, payload, Headers([("Content-Type", content_type)]))
        if prefer.continue_on_error:
            resp.headers.set("Preference-Applied", "odata.continue-on-error")
        return resp

    def _entity_path(self, response: Response) -> str | None:
        entity_id = response.headers.get("OData-EntityId")
        if not entity_id:
            return None
        path = urlsplit(entity_id).path
        return path if path.startswith(API + "/") else None

    def _inner_error(self, err: HTTPError, request: Request) -> Response:
        resp = self.error_response(err, request)
        resp.headers.set("REQ_ID", new_request_id())
        return resp

    def _dispatch_inner(self, operation: Operation) -> Response:
        """One request of a batch: the same handlers, already authenticated and counted."""
        parts = urlsplit(operation.url)
        if parts.scheme:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
        elif operation.url.startswith("/"):
            target = operation.url
        else:
            target = f"{API}/{operation.url}"
        inner = Request(operation.method, target, operation.headers, operation.body, server=self.server)
        try:
            if inner.path.rstrip("/").endswith("$batch"):
                raise _err(400, "0x80048d19", "A batch request cannot contain another batch request.")
            resolved = self._inner.resolve(inner.method, inner.path) if inner.path.startswith(API) else None
            if resolved is None:
                raise _segment_not_found(inner.path.rstrip("/").rsplit("/", 1)[-1])
            handler, inner.params = resolved
            self._local.formatted = _wants_formatted_values(inner.headers)
            response = handler(inner)
        except HTTPError as err:
            response = self._inner_error(err, inner)
        except Exception as exc:
            log.exception("dataverse: unhandled error in a batch request %s %s", operation.method, operation.url)
            response = self._inner_error(
                _err(500, "0x80040216", f"An unexpected error occurred ({type(exc).__name__})."), inner
            )
        return response
