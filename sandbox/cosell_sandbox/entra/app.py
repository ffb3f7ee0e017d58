"""Entra ID (Azure AD) token service emulator: what msal needs, and nothing it does not.

* ``GET /{tenant}/v2.0/.well-known/openid-configuration``
* ``POST /{tenant}/oauth2/v2.0/token`` for the ``client_credentials``, ``refresh_token``
  and ``password`` grants, with AADSTS-style error bodies;
* ``GET /common/userrealm/{username}`` (msal's user realm discovery for the password grant);
* the device authorization grant (``devicecode``, the ``device_code`` grant, public clients and
  the ``POST /_sandbox/devicecode`` control call): see :mod:`.device`;
* the shared ``/_sandbox/`` endpoints of :class:`~cosell_sandbox.server.EmulatorApp` (``seed``
  registers clients and users), and ``POST /_sandbox/revoke`` (every refresh token revoked).

Access tokens are JWTs (HS256, sandbox-internal key) with ``aud`` set to the resource
of the requested ``<resource>/.default`` scope. The API emulators validate them through
:meth:`EntraEmulator.validate_bearer`, so a missing, malformed, expired or
wrong-audience token gets 401 exactly where the real APIs would refuse it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from ..server import EmulatorApp, HTTPError, Request, Response, Router
from .device import DEVICE_CODE_GRANT, DeviceCodeMixin
from .tokens import EntraConfig, RefreshToken, TokenError, _b64url, _b64url_decode


class EntraEmulator(DeviceCodeMixin, EmulatorApp):
    name = "entra"

    def __init__(self, config: EntraConfig | None = None) -> None:
        self.config = config or EntraConfig()
        self._signing_key = secrets.token_bytes(32)
        self.clients: dict[str, str] = {}  # client_id -> secret
        self.users: dict[str, tuple[str, str]] = {}  # username -> (password, object id)
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.resources: set[str] = set()
        self.grants: dict[str, int] = {
            "client_credentials": 0,
            "refresh_token": 0,
            "password": 0,
            DEVICE_CODE_GRANT: 0,
        }
        self.refresh_tokens_presented: list[str] = []
        self._device_codes_init()
        super().__init__()

    # -- setup used by the sandbox runtime ----------------------------------
    def add_client(
        self, client_id: str | None = None, secret: str | None = None, *, public_client_flows: bool = False
    ) -> tuple[str, str]:
        """Register an app; ``public_client_flows`` is the registration's "Allow public client flows"."""
        client_id = client_id or str(uuid.uuid4())
        secret = secret or secrets.token_urlsafe(24)
        self.clients[client_id] = secret
        if public_client_flows:
            self.public_clients.add(client_id)
        else:
            self.public_clients.discard(client_id)
        return client_id, secret

    def add_user(self, username: str, password: str) -> None:
        self.users[username.lower()] = (password, str(uuid.uuid5(uuid.NAMESPACE_URL, username.lower())))

    def issue_refresh_token(
        self, client_id: str, username: str, token: str | None = None, *, public: bool = False
    ) -> str:
        token = token or "0.sandbox." + secrets.token_urlsafe(48)
        self.refresh_tokens[token] = RefreshToken(client_id, username.lower(), time.time(), public=public)
        return token

    def register_resource(self, resource: str) -> None:
        self.resources.add(resource.rstrip("/"))

    @property
    def authority(self) -> str:
        assert self.server is not None
        return self.server.origin

    @property
    def issuer(self) -> str:
        return f"{self.authority}/{self.config.tenant_id}/v2.0"

    # -- token validation used by the API emulators ------------------------
    def validate_bearer(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """Claims of a valid token for ``audience``; raises 401 HTTPError otherwise."""
        if not authorization:
            raise HTTPError(
                401,
                "unauthenticated",
                "Authorization header is missing.",
                headers={"WWW-Authenticate": 'Bearer realm="sandbox", error="invalid_request"'},
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPError(
                401,
                "unauthenticated",
                "Authorization header must use the Bearer scheme.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_request"'},
            )
        claims = self._decode(token.strip())
        if claims is None:
            raise HTTPError(
                401,
                "unauthenticated",
                "The access token is invalid.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if claims.get("exp", 0) < time.time():
            raise HTTPError(
                401,
                "unauthenticated",
                "The access token has expired.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token", error_description="expired"'},
            )
        if claims.get("aud", "").rstrip("/") != audience.rstrip("/"):
            raise HTTPError(
                401,
                "unauthenticated",
                f"The access token audience is not valid for this resource ({audience}).",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return claims

    def _encode(self, claims: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"typ": "JWT", "alg": "HS256", "kid": "sandbox"}).encode())
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self._signing_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(sig)}"

    def _decode(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        expected = hmac.new(self._signing_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _b64url_decode(parts[2])):
                return None
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, json.JSONDecodeError):
            return None
        return claims if isinstance(claims, dict) else None

    # -- routes ------------------------------------------------------------------
    def routes(self, router: Router) -> None:
        router.add("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", self._openid)
        router.add("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", self._token)
        router.add("GET", r"/common/userrealm/(?P<username>[^/]+)", self._user_realm)
        router.add("POST", r"/_sandbox/revoke", self._revoke)
        self._device_routes(router)

    def error_response(self, err: HTTPError, request: Request) -> Response:
        if isinstance(err, TokenError) or request.path.endswith("/token"):
            codes = err.extra.get("codes", [])
            trace = str(uuid.uuid4())
            body = {
                "error": err.code,
                "error_description": f"{err.message}\r\nTrace ID: {trace}\r\nTimestamp: "
                f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ')}",
                "error_codes": codes,
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                "trace_id": trace,
                "correlation_id": request.headers.get("client-request-id") or str(uuid.uuid4()),
            }
            return Response.json(body, err.status, err.headers)
        return super().error_response(err, request)

    def _tenant(self, request: Request) -> None:
        tenant = request.params["tenant"]
        if tenant not in (self.config.tenant_id, "organizations", "common"):
            raise TokenError(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.", codes=[90002])

    def _openid(self, request: Request) -> Response:
        self._tenant(request)
        base = f"{self.authority}/{self.config.tenant_id}"
        return Response.json(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "jwks_uri": f"{self.authority}/{self.config.tenant_id}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": self.issuer,
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": f"{self.authority}/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "oid", "tid", "preferred_username"],
                "tenant_region_scope": "NA",
                "cloud_instance_name": "microsoftonline.com",
            }
        )

    def _user_realm(self, request: Request) -> Response:
        username = request.params["username"]
        domain = username.rpartition("@")[2]
        known = any(u.rpartition("@")[2] == domain.lower() for u in self.users)
        return Response.json(
            {
                "ver": "1.0",
                "account_type": "Managed" if known else "Unknown",
                "domain_name": domain,
                "cloud_instance_name": "microsoftonline.com",
                "cloud_audience_urn": "urn:federation:MicrosoftOnline",
            }
        )

    def _unknown_client(self, client_id: str) -> TokenError:
        return TokenError(
            400,
            "unauthorized_client",
            f"AADSTS700016: Application with identifier '{client_id}' was not found in the "
            f"directory '{self.config.tenant_id}'.",
            codes=[700016],
        )

    def _client(self, form: dict[str, str], request: Request, *, public_ok: bool = False) -> tuple[str, bool]:
        """(client id, whether it authenticated with its secret). Without a secret, only a
        ``public_ok`` grant of an app with public client flows allowed goes through."""
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        basic = request.headers.get("Authorization", "")
        if basic.lower().startswith("basic "):
            try:
                client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
            except ValueError:
                secret = None
        if client_id not in self.clients:
            raise self._unknown_client(client_id)
        if secret is None and public_ok and client_id in self.public_clients:
            return client_id, False
        if secret is None and form.get("client_assertion") is None:
            raise TokenError(
                401,
                "invalid_client",
                "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
                codes=[7000218],
            )
        if not secret or not hmac.compare_digest(secret, self.clients[client_id]):
            raise TokenError(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in "
                "the request is the client secret value, not the client secret ID.",
                codes=[7000215],
            )
        return client_id, True

    def _resource(self, scope: str) -> str:
        for item in scope.split():
            if item.endswith("/.default") or item.endswith("/user_impersonation"):
                resource = item.rsplit("/", 1)[0].rstrip("/")
                if resource not in self.resources:
                    raise TokenError(
                        400,
                        "invalid_resource",
                        f"AADSTS500011: The resource principal named {resource} was not found in "
                        f"the tenant named {self.config.tenant_id}.",
                        codes=[500011],
                    )
                return resource
        raise TokenError(
            400,
            "invalid_scope",
            f"AADSTS70011: The provided value for the input parameter 'scope' is not valid. "
            f"The scope {scope} is not valid.",
            codes=[70011],
        )

    def _token(self, request: Request) -> Response:
        self._tenant(request)
        try:
            raw = parse_qs(request.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            raw = {}
        form = {k: v[0] for k, v in raw.items()}
        grant = form.get("grant_type", "")
        if grant not in self.grants:
            raise TokenError(
                400,
                "unsupported_grant_type",
                f"AADSTS70003: The app requested an unsupported grant type '{grant}'.",
                codes=[70003],
            )
        with self.lock:
            public_ok = grant in ("refresh_token", "password", DEVICE_CODE_GRANT)
            client_id, confidential = self._client(form, request, public_ok=public_ok)
            public = False
            username: str | None = None
            if grant == DEVICE_CODE_GRANT:
                code = self.device_codes.get(form.get("device_code", ""))
                username, public = self._device_code_grant(form, client_id, confidential)
                if not form.get("scope"):
                    form["scope"] = code.scope if code else ""
            resource = self._resource(form.get("scope", ""))
            if grant == "refresh_token":
                rt = form.get("refresh_token", "")
                self.refresh_tokens_presented.append(rt)
                record = self.refresh_tokens.get(rt)
                if record is None or record.revoked or record.client_id != client_id:
                    raise TokenError(
                        400,
                        "invalid_grant",
                        "AADSTS70000: The provided value for the 'refresh_token' is not valid.",
                        codes=[70000],
                    )
                if record.public and confidential:
                    raise TokenError(
                        401,
                        "invalid_client",
                        "AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' "
                        "should be presented.",
                        codes=[700025],
                    )
                if not record.public and not confidential:
                    raise TokenError(
                        401,
                        "invalid_client",
                        "AADSTS7000218: The request body must contain the following parameter: "
                        "'client_assertion' or 'client_secret'.",
                        codes=[7000218],
                    )
                if self.config.single_use_refresh_tokens:
                    record.revoked = True
                username = record.username
                public = record.public
            elif grant == "password":
                username = form.get("username", "").lower()
                expected = self.users.get(username)
                if expected is None or not hmac.compare_digest(form.get("password", ""), expected[0]):
                    raise TokenError(
                        400,
                        "invalid_grant",
                        "AADSTS50126: Error validating credentials due to invalid username or password.",
                        codes=[50126],
                    )
            self.grants[grant] += 1
            return Response.json(self._token_response(client_id, resource, username, form.get("scope", ""), public))

    def _token_response(
        self, client_id: str, resource: str, username: str | None, scope: str, public: bool = False
    ) -> dict[str, Any]:
        now = int(time.time())
        lifetime = self.config.token_lifetime
        tid = self.config.tenant_id
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{tid}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": client_id,
            "tid": tid,
            "jti": secrets.token_hex(8),
        }
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime}
        if username is None:
            claims.update(roles=["sandbox.app"], oid=str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)))
        else:
            oid = self.users.get(username, ("", str(uuid.uuid5(uuid.NAMESPACE_URL, username))))[1]
            claims.update(scp="user_impersonation", upn=username, oid=oid, idtyp="user")
            body["scope"] = f"{resource}/user_impersonation"
            if "offline_access" in scope.split():
                body["refresh_token"] = self.issue_refresh_token(client_id, username, public=public)
            if "openid" in scope.split():
                body["id_token"] = self._encode(
                    {
                        "aud": client_id,
                        "iss": self.issuer,
                        "iat": now,
                        "nbf": now,
                        "exp": now + 3600,
                        "oid": oid,
                        "sub": _b64url(hashlib.sha256(f"{oid}{client_id}".encode()).digest()),
                        "tid": tid,
                        "preferred_username": username,
                        "name": username.split("@")[0],
                        "ver": "2.0",
                    }
                )
                body["client_info"] = _b64url(json.dumps({"uid": oid, "utid": tid}).encode())
        body["access_token"] = self._encode(claims)
        return body

    def reset(self) -> None:
        """Default settings, no refresh tokens, counters at zero (clients and users are kept)."""
        with self.lock:
            self.config = EntraConfig(tenant_id=self.config.tenant_id)
            self.refresh_tokens.clear()
            self.refresh_tokens_presented.clear()
            self.device_codes.clear()
            self.grants = dict.fromkeys(self.grants, 0)
        super().reset()

    # -- control plane (the shared endpoints are EmulatorApp's) ------------------
    def seed(
        self,
        clients: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        public_client_flows: list[str] | None = None,
    ) -> dict[str, list[str]]:
        """Register app ``clients`` ({client id: secret}, "Allow public client flows" on for the ids
        in ``public_client_flows``) and ``users`` ({username: password})."""
        with self.lock:
            for client_id, secret in (clients or {}).items():
                self.add_client(client_id, secret, public_client_flows=client_id in (public_client_flows or ()))
            for username, password in (users or {}).items():
                self.add_user(username, password)
        return {"clients": sorted(clients or {}), "users": sorted(users or {})}

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "tenant_id": self.config.tenant_id,
                "token_lifetime": self.config.token_lifetime,
                "single_use_refresh_tokens": self.config.single_use_refresh_tokens,
                "grants": dict(self.grants),
                "refresh_tokens_active": sum(1 for r in self.refresh_tokens.values() if not r.revoked),
                "refresh_tokens_presented": len(self.refresh_tokens_presented),
                "public_clients": sorted(self.public_clients),
                "device_codes_pending": self.pending_device_codes(),
                "device_code_lifetime": self.config.device_code_lifetime,
                "device_code_interval": self.config.device_code_interval,
            }

    def configure(
        self,
        token_lifetime: int | None = None,
        single_use_refresh_tokens: bool | None = None,
        device_code_lifetime: int | None = None,
        device_code_interval: int | None = None,
    ) -> dict[str, Any]:
        """Access token lifetime (seconds), whether a refresh token works once, and a device code's
        lifetime and polling interval (seconds); returns the state."""
        with self.lock:
            if device_code_lifetime is not None:
                self.config.device_code_lifetime = int(device_code_lifetime)
            if device_code_interval is not None:
                self.config.device_code_interval = max(1, int(device_code_interval))
            if token_lifetime is not None:
                self.config.token_lifetime = int(token_lifetime)
            if single_use_refresh_tokens is not None:
                self.config.single_use_refresh_tokens = bool(single_use_refresh_tokens)
        return self.state()

    def _revoke(self, request: Request) -> Response:
        """Revoke every refresh token (as a password reset or admin revocation would)."""
        with self.lock:
            for record in self.refresh_tokens.values():
                record.revoked = True
        return Response.empty()
