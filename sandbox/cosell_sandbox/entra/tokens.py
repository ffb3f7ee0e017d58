"""What the Entra ID emulator issues: refresh tokens, tenant settings, token errors, and the
base64url of its JWTs."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field

from ..server import HTTPError


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class RefreshToken:
    client_id: str
    username: str
    issued_at: float
    revoked: bool = False
    public: bool = False  # issued to a public client (no secret): redeemed without one


@dataclass
class EntraConfig:
    tenant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    token_lifetime: int = 3600
    single_use_refresh_tokens: bool = False  # AAD keeps old ones valid; tests can make rotation strict
    device_code_lifetime: int = 900  # seconds a device code stays valid (Entra's default)
    device_code_interval: int = 5  # seconds between polls the client is told to wait


class TokenError(HTTPError):
    pass
