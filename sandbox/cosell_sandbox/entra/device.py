"""The device authorization grant of the Entra ID emulator (Microsoft Learn, "Microsoft identity
platform and the OAuth 2.0 device authorization grant flow").

* ``POST /{tenant}/oauth2/v2.0/devicecode`` (``client_id``, ``scope``) answers ``device_code``,
  ``user_code``, ``verification_uri``, ``expires_in`` (900 s by default), ``interval`` (5 s) and
  ``message``; no ``verification_uri_complete`` (Entra does not send it).
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=urn:ietf:params:oauth:grant-type:device_code``
  answers 400 ``authorization_pending`` (AADSTS70016) until the user signs in, then the tokens;
  ``authorization_declined`` (AADSTS70000), ``expired_token`` (AADSTS70020) and
  ``bad_verification_code`` (AADSTS70019) as documented. Entra documents no ``slow_down`` and does
  not send one, so neither does the emulator.
* Client authentication, as Entra does it: msal's device flow is a *public* client flow (no
  secret is sent), which Entra only allows for an app registration with "Allow public client
  flows" on (``isFallbackPublicClient``); otherwise it answers 401 ``invalid_client``
  AADSTS7000218. A refresh token issued to a public client must later be redeemed without a
  secret: presenting one is 401 ``invalid_client`` AADSTS700025 ("Client is public so neither
  'client_assertion' nor 'client_secret' should be presented"). A code redeemed *with* the
  client's secret (a confidential client) gives a confidential refresh token.
* Control plane: ``POST /_sandbox/devicecode`` ``{"action": "approve"|"decline"|"expire",
  "username": ..., "user_code": ...}`` does what the user would do at the verification page (the
  only pending code when ``user_code`` is left out); ``GET /_sandbox/state`` lists pending codes.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ..server import HTTPError, Request, Response
from .tokens import TokenError

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_USER_CODE_ALPHABET = string.ascii_uppercase + string.digits


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    status: str = "pending"  # pending | approved | declined | redeemed
    username: str | None = None


def _form(request: Request) -> dict[str, str]:
    try:
        raw = parse_qs(request.body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raw = {}
    return {k: v[0] for k, v in raw.items()}


class DeviceCodeMixin:
    """Device codes of :class:`~cosell_sandbox.entra.app.EntraEmulator`."""

    device_codes: dict[str, DeviceCode]
    public_clients: set[str]

    def _device_codes_init(self) -> None:
        self.device_codes = {}
        self.public_clients = set()

    def _device_routes(self, router: Any) -> None:
        router.add("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/devicecode", self._devicecode)
        router.add("GET", r"/devicelogin", self._devicelogin)
        router.add("POST", r"/_sandbox/devicecode", self._ctl_devicecode)

    def _devicecode(self, request: Request) -> Response:
        self._tenant(request)  # type: ignore[attr-defined]
        form = _form(request)
        client_id = form.get("client_id", "")
        with self.lock:  # type: ignore[attr-defined]
            if client_id not in self.clients:  # type: ignore[attr-defined]
                raise self._unknown_client(client_id)  # type: ignore[attr-defined]
            scope = form.get("scope", "")
            self._resource(scope)  # type: ignore[attr-defined]
            config = self.config  # type: ignore[attr-defined]
            user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
            code = DeviceCode(
                device_code="DAQABAAEAAAD" + secrets.token_urlsafe(96),
                user_code=user_code,
                client_id=client_id,
                scope=scope,
                expires_at=time.time() + config.device_code_lifetime,
            )
            self.device_codes[code.device_code] = code
        uri = f"{self.authority}/devicelogin"  # type: ignore[attr-defined]
        return Response.json(
            {
                "user_code": user_code,
                "device_code": code.device_code,
                "verification_uri": uri,
                "expires_in": config.device_code_lifetime,
                "interval": config.device_code_interval,
                "message": f"To sign in, use a web browser to open the page {uri} and enter the code "
                f"{user_code} to authenticate.",
            }
        )

    def _devicelogin(self, request: Request) -> Response:
        text = (
            "Sandbox sign-in page. There is no browser sign-in in the sandbox: approve a pending code with "
            'POST /_sandbox/devicecode {"action": "approve", "username": "...", "user_code": "..."}.\n'
        )
        resp = Response(200, text.encode())
        resp.headers.set("Content-Type", "text/plain; charset=utf-8")
        return resp

    def _device_code_grant(self, form: dict[str, str], client_id: str, confidential: bool) -> tuple[str, bool]:
        """(username, issued to a public client) for a redeemable code; raises the documented errors."""
        code = self.device_codes.get(form.get("device_code", ""))
        if code is None or code.client_id != client_id or code.status == "redeemed":
            raise TokenError(
                400,
                "bad_verification_code",
                "AADSTS70018: The provided value for the input parameter 'device_code' is not valid.",
                codes=[70018],
            )
        if code.expires_at <= time.time():
            raise TokenError(
                400,
                "expired_token",
                "AADSTS70019: Verification code expired. The user must sign in again.",
                codes=[70019],
            )
        if code.status == "declined":
            raise TokenError(
                400, "authorization_declined", "AADSTS70000: The user declined the sign-in request.", codes=[70000]
            )
        if code.status == "pending":
            raise TokenError(
                400,
                "authorization_pending",
                "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                codes=[70016],
            )
        code.status = "redeemed"
        assert code.username is not None
        return code.username, not confidential

    # -- control plane ------------------------------------------------------------------
    def _ctl_devicecode(self, request: Request) -> Response:
        doc = self.control_body(request)  # type: ignore[attr-defined]
        return Response.json(self._control(lambda: self.act_on_device_code(**doc)))  # type: ignore[attr-defined]

    def act_on_device_code(
        self, action: str = "approve", username: str | None = None, user_code: str | None = None
    ) -> dict[str, Any]:
        """What the user does at the verification page: ``approve`` (signed in as ``username``, a
        registered user), ``decline``, or ``expire`` (the code's 15 minutes have passed)."""
        if action not in ("approve", "decline", "expire"):
            raise ValueError("action must be 'approve', 'decline' or 'expire'")
        with self.lock:  # type: ignore[attr-defined]
            pending = [c for c in self.device_codes.values() if c.status == "pending"]
            if user_code is not None:
                pending = [c for c in pending if c.user_code == user_code.strip().upper()]
            if len(pending) != 1:
                raise HTTPError(
                    404 if not pending else 409,
                    "invalidRequest",
                    "no pending device code matches" if not pending else "several codes are pending: name user_code",
                )
            code = pending[0]
            if action == "approve":
                name = (username or "").lower()
                if name not in self.users:  # type: ignore[attr-defined]
                    raise ValueError(f"unknown user {username!r}")
                code.status, code.username = "approved", name
            elif action == "decline":
                code.status = "declined"
            else:
                code.expires_at = time.time() - 1
            return {"user_code": code.user_code, "status": code.status}

    def pending_device_codes(self) -> list[str]:
        now = time.time()
        return [c.user_code for c in self.device_codes.values() if c.status == "pending" and c.expires_at > now]
