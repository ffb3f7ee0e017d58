"""The one check of an https URL's host that the receiver (an event's ``ResourceUri``) and the
signature check (the ``X-MS-Certificate-Url``) both make. Standard library only, as the
receiver's imports are."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from urllib.parse import SplitResult, urlsplit


def normalise_host(host: str, *, root_dot: bool = False) -> str:
    """A host as compared with an allowlist: case-insensitive, without IPv6 brackets; with
    ``root_dot``, also without the root's trailing dot (``example.com.`` is ``example.com``)."""
    host = host.strip().lower()
    return (host.rstrip(".") if root_dot else host).strip("[]")


def on_allowed_host(host: str, allowed_hosts: Iterable[str], *, root_dot: bool = False) -> bool:
    """Whether ``host`` is one of ``allowed_hosts``, exact after :func:`normalise_host` (blanks
    ignored). Without ``root_dot`` a trailing-dot spelling is another host, and refused."""
    allowed = {normalise_host(h, root_dot=root_dot) for h in allowed_hosts if h.strip()}
    return normalise_host(host, root_dot=root_dot) in allowed


def split_https_url(url: str, error: Callable[[str], Exception], what: str) -> tuple[SplitResult, str, int | None]:
    """``(parts, host, port)`` of ``url`` when it is ``https://`` with a plain host (no user info)
    and a well-formed port; otherwise raises ``error(message)``, the message naming ``what``."""
    try:
        parts = urlsplit(url)  # lower-cases the scheme
        host = parts.hostname
        port = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise error(f"{what} is malformed") from None
    if parts.scheme != "https":
        raise error(f"{what} must be https")
    if not host or parts.username is not None or parts.password is not None:
        raise error(f"{what} has no plain host")
    return parts, host, port
