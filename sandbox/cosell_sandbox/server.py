"""Shared machinery of every emulator: an HTTPS server on 127.0.0.1, a tiny router,
request/response objects, a bounded request log, seeded fault injection (:mod:`.faults`), and
the ``/_sandbox/`` control endpoints every emulator shares (:class:`EmulatorApp`).

The standard library server is used on purpose: it gives full control over the
wire (exact status lines and headers, dropped connections for fault injection)
and needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .faults import FaultConfig, Faults

MAX_BODY = 20 * 1024 * 1024
log = logging.getLogger(__name__)


class Headers:
    """Case-insensitive, ordered response/request headers."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)

    def get(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for key, value in self._items:
            if key.lower() == lname:
                return value
        return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def set(self, name: str, value: str) -> None:
        lname = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lname]
        self._items.append((name, value))

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def as_dict(self) -> dict[str, str]:
        return dict(self._items)


@dataclass
class Request:
    method: str
    target: str  # raw request target, e.g. /v1.0/referrals?$top=10
    headers: Headers
    body: bytes
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # path parameters from the route
    server: EmulatorServer | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path = unquote(parts.path)
        self.query = parse_qs(parts.query, keep_blank_values=True)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """Decoded JSON body; raises :class:`HTTPError` 400 when it is not JSON."""
        if not self.body:
            raise HTTPError(400, "invalidRequest", "A request body is required.")
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, "invalidRequest", f"The request body is not valid JSON: {exc}") from None

    @property
    def origin(self) -> str:
        assert self.server is not None
        return self.server.origin


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: Headers = field(default_factory=Headers)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        resp = cls(status=status, body=json.dumps(payload, separators=(",", ":")).encode())
        resp.headers.set("Content-Type", "application/json; charset=utf-8")
        for key, value in (headers or {}).items():
            resp.headers.set(key, value)
        return resp

    @classmethod
    def empty(cls, status: int = 204, headers: Mapping[str, str] | None = None) -> Response:
        resp = cls(status=status)
        for key, value in (headers or {}).items():
            resp.headers.set(key, value)
        return resp


class HTTPError(Exception):
    """Raised by handlers; each emulator renders it in its own documented error shape."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra


Handler = Callable[[Request], Response]


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """``pattern`` is a regex matched against the whole decoded path; named groups become params."""
        self._routes.append((method.upper(), re.compile(pattern + r"\Z"), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The handler for method+path; raises 405 when the path exists for other methods only."""
        allowed: list[str] = []
        for route_method, regex, handler in self._routes:
            match = regex.match(path)
            if not match:
                continue
            if route_method == method:
                return handler, match.groupdict()
            allowed.append(route_method)
        if allowed:
            raise HTTPError(
                405,
                "methodNotAllowed",
                f"The method {method} is not allowed on {path}.",
                headers={"Allow": ", ".join(sorted(set(allowed)))},
            )
        return None


LOGGED_BODY_BYTES = 1 << 20


@dataclass
class LoggedRequest:
    at: float
    method: str
    path: str
    target: str
    status: int
    fault: str | None
    headers: dict[str, str]
    body: bytes = b""  # the first LOGGED_BODY_BYTES of the request body

    def json(self) -> Any:
        """The logged body decoded as JSON (for tests asserting what a client wrote)."""
        return json.loads(self.body)


class EmulatorApp:
    """Base class of an emulator: override :meth:`routes` and :meth:`error_response`.

    Paths under ``/_sandbox/`` are the control plane: they are never hit by faults,
    and need no token.
    """

    name = "emulator"
    control_error_code = "invalidRequest"  # the error code of a control-plane request it cannot take

    def __init__(self) -> None:
        self.router = Router()
        self.faults = Faults()
        self.log: deque[LoggedRequest] = deque(maxlen=20000)
        self.lock = threading.RLock()  # guards the emulator's state
        self.server: EmulatorServer | None = None
        self.routes(self.router)
        for method, path, handler in (
            ("POST", "reset", self._ctl_reset),
            ("POST", "seed", self._ctl_seed),
            ("GET", "state", self._ctl_state),
            ("GET", "config", self._ctl_config),
            ("POST", "config", self._ctl_config),
            ("GET", "limits", self._ctl_limits),
            ("POST", "limits", self._ctl_limits),
            ("POST", "age", self._ctl_age),
            ("GET", "faults", self._get_faults),
            ("POST", "faults", self._set_faults),
            ("DELETE", "faults", self._clear_faults),
            ("GET", "requests", self._get_requests),
            ("DELETE", "requests", self._clear_requests),
        ):
            self.router.add(method, "/_sandbox/" + path, handler)

    # -- override points -------------------------------------------------
    def routes(self, router: Router) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # The control plane's override points: each ``/_sandbox/<name>`` endpoint of the base calls one.
    # A ValueError or TypeError they raise is answered 400 with the emulator's control_error_code.
    def reset(self) -> None:
        """Back to a fresh emulator (``POST /_sandbox/reset``); overrides reset their state, then call this."""
        self.faults.clear()
        self.log.clear()

    def seed(self, **options: Any) -> Any:
        """Add realistic data (``POST /_sandbox/seed``, the body's keys as arguments); returns its ids."""
        if options:
            raise ValueError(f"the {self.name} emulator takes no seed options: {sorted(options)}")
        return {}

    def seed_request(self, doc: dict[str, Any]) -> Any:
        """What ``POST /_sandbox/seed`` answers for the body ``doc``: :meth:`seed`'s result by default."""
        return self.seed(**doc)

    def state(self) -> dict[str, Any]:
        """A summary of the emulator's data and settings (``GET /_sandbox/state``)."""
        return {"name": self.name}

    def configure(self, **changes: Any) -> Any:
        """Change behaviour switches (``POST /_sandbox/config``); returns what ``GET`` shows after it."""
        if changes:
            raise ValueError(f"unknown setting(s): {sorted(changes)}")
        return self.config_state()

    def config_state(self) -> dict[str, Any]:
        """The behaviour switches (``GET /_sandbox/config``); the state by default."""
        return self.state()

    def configure_limits(self, **changes: Any) -> dict[str, Any]:
        """Change the API limits (``POST /_sandbox/limits``); returns :meth:`limits_state`."""
        if changes:
            raise ValueError(f"unknown limit(s): {sorted(changes)}")
        return self.limits_state()

    def limits_state(self) -> dict[str, Any]:
        """The API limits and their usage (``GET /_sandbox/limits``): none by default."""
        return {}

    def age(self, seconds: float) -> int:
        """Time passes: the data's stamps move ``seconds`` into the past; returns how many records aged."""
        return 0

    def error_response(self, err: HTTPError, request: Request) -> Response:
        return Response.json({"error": {"code": err.code, "message": err.message}}, err.status, err.headers)

    def throttle_response(self, request: Request, retry_after: float) -> Response:
        return self.error_response(
            HTTPError(
                429,
                "tooManyRequests",
                "Rate limit is exceeded. Try again later.",
                headers={"Retry-After": _retry_after_value(retry_after)},
            ),
            request,
        )

    def unavailable_response(self, request: Request, status: int) -> Response:
        headers = {"Retry-After": "1"} if status == 503 else {}
        return self.error_response(
            HTTPError(status, "serviceNotAvailable", "The service is temporarily unavailable.", headers),
            request,
        )

    def decorate(self, request: Request, response: Response) -> None:
        """Add headers every response of this API carries (request ids, limits, ...)."""

    # -- dispatch ----------------------------------------------------------
    def dispatch(self, request: Request) -> tuple[Response | None, str | None]:
        """Returns (response, fault). A None response means: drop the connection."""
        control = request.path.startswith("/_sandbox/")
        fault = None
        if not control:
            latency, fault = self.faults.decide(request.method, request.path)
            if latency:
                time.sleep(latency)
            if fault == "drop":
                return None, fault
            if fault == "429":
                resp = self.throttle_response(request, self.faults.config.retry_after)
                self.decorate(request, resp)
                return resp, fault
            if fault == "5xx":
                resp = self.unavailable_response(request, self.faults.config.status_5xx)
                self.decorate(request, resp)
                return resp, fault
        try:
            resolved = self.router.resolve(request.method, request.path)
            if resolved is None:
                raise HTTPError(404, "itemNotFound", f"No resource matches {request.path}.")
            handler, params = resolved
            request.params = params
            response = handler(request)
        except HTTPError as err:
            response = self.error_response(err, request)
        except Exception as exc:  # a bug or an input the emulator did not foresee: answer like a service would
            log.exception("%s: unhandled error on %s %s", self.name, request.method, request.path)
            response = self.error_response(
                HTTPError(500, "generalException", f"An unexpected error occurred ({type(exc).__name__})."), request
            )
        if fault == "drop_after":
            return None, fault
        if not control:
            self.decorate(request, response)
        return response, fault

    # -- control plane shared by all emulators ---------------------------
    def control_body(self, request: Request) -> dict[str, Any]:
        """A control-plane request's JSON object (``{}`` for an empty body)."""
        if not request.body.strip():
            return {}
        doc = request.json()
        if not isinstance(doc, dict):
            raise HTTPError(400, self.control_error_code, "The body must be a JSON object.")
        return doc

    def _control(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, self.control_error_code, str(exc)) from None

    def _ctl_reset(self, request: Request) -> Response:
        self.reset()
        return Response.empty()

    def _ctl_seed(self, request: Request) -> Response:
        doc = self.control_body(request)
        return Response.json(self._control(lambda: self.seed_request(doc)))

    def _ctl_state(self, request: Request) -> Response:
        return Response.json(self.state())

    def _ctl_config(self, request: Request) -> Response:
        if request.method == "POST":
            doc = self.control_body(request)
            return Response.json(self._control(lambda: self.configure(**doc)))
        return Response.json(self.config_state())

    def _ctl_limits(self, request: Request) -> Response:
        if request.method == "POST":
            doc = self.control_body(request)
            return Response.json(self._control(lambda: self.configure_limits(**doc)))
        return Response.json(self.limits_state())

    def _ctl_age(self, request: Request) -> Response:
        doc = self.control_body(request)
        return Response.json({"aged": self._control(lambda: self.age(float(doc.get("seconds"))))})

    def _set_faults(self, request: Request) -> Response:
        self.faults.configure(FaultConfig.from_json(request.json()))
        return Response.json({"faults": vars(self.faults.config)})

    def _clear_faults(self, request: Request) -> Response:
        self.faults.clear()
        return Response.empty()

    def _get_faults(self, request: Request) -> Response:
        return Response.json({"faults": vars(self.faults.config), "injected": self.faults.injected})

    def _get_requests(self, request: Request) -> Response:
        entries = [
            {"at": e.at, "method": e.method, "path": e.path, "target": e.target, "status": e.status, "fault": e.fault}
            for e in list(self.log)
            if not e.path.startswith("/_sandbox/")
        ]
        return Response.json({"requests": entries})

    def _clear_requests(self, request: Request) -> Response:
        self.log.clear()
        return Response.empty()

    def requests_matching(self, method: str | None = None, path_prefix: str = "") -> list[LoggedRequest]:
        return [e for e in list(self.log) if (method is None or e.method == method) and e.path.startswith(path_prefix)]


def _retry_after_value(seconds: float) -> str:
    # Retry-After is an integer number of seconds on the wire; round up so a client never waits too little.
    whole = int(seconds)
    return str(whole if whole == seconds else whole + 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The status line and headers go out in one write and the body in another: with Nagle's
    # algorithm on, the body waits for the client's (delayed) ACK of the headers, some 40 ms on
    # Linux, on every answer with a body, which no real API adds. TCP_NODELAY sends it at once.
    disable_nagle_algorithm = True
    server: EmulatorServer
    server_version = "cosell-sandbox"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        app = self.server.app
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            size = int(length) if length and length.isdigit() else 0
            if size > MAX_BODY:
                self.send_error(413)
                return
            body = self.rfile.read(size) if size else b""
        headers = Headers(self.headers.items())
        request = Request(self.command, self.path, headers, body, server=self.server)
        response, fault = app.dispatch(request)
        app.log.append(
            LoggedRequest(
                time.time(),
                request.method,
                request.path,
                request.target,
                response.status if response else 0,
                fault,
                headers.as_dict(),
                body[:LOGGED_BODY_BYTES],
            )
        )
        if response is None:
            self._drop()
            return
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if response.status not in (204, 304):
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.body and self.command != "HEAD" and response.status not in (204, 304):
            self.wfile.write(response.body)

    def _read_chunked(self) -> bytes:
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(65537).strip()
            size = int(line.split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                break
            total += size
            if total > MAX_BODY:
                raise ValueError("body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        return b"".join(chunks)

    def _drop(self) -> None:
        """Abort the connection without a response, as a failing load balancer would."""
        self.close_connection = True
        try:
            # SO_LINGER with a zero timeout makes close() send a TCP RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class EmulatorServer(ThreadingHTTPServer):
    """HTTPS server for one emulator, bound to 127.0.0.1 (port 0 picks a free port)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, app: EmulatorApp, context: ssl.SSLContext, port: int = 0) -> None:
        self.app = app
        self._context = context
        super().__init__(("127.0.0.1", port), _Handler)
        app.server = self
        self._thread: threading.Thread | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        # Handshake in the handler thread, so one slow client cannot stall the accept loop.
        return self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshake failures and clients hanging up are routine; don't print tracebacks.
        pass

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self.serve_forever, name=f"sandbox-{self.app.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(timeout=5)


def json_copy(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists and scalars), as ``copy.deepcopy`` makes it but
    some four times faster: an emulator copies every document it stores and serves."""
    if isinstance(value, dict):
        return {key: json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_copy(item) for item in value]
    return value


def new_request_id() -> str:
    return str(uuid.uuid4())
