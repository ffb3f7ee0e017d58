"""Connection pools as wide as the concurrency the sync uses.

``requests`` keeps at most 10 open connections per host (``HTTPAdapter``'s default
``pool_maxsize``). A side that writes with more threads than that (Partner Center has no
batch API: one call per referral, on a thread pool; parallel ``$batch`` calls to Dataverse up
to its ``x-ms-dop-hint``) would see urllib3 discard the extra connections after each call
("Connection pool is full") and open, and TLS-handshake, a new one for the next: a
handshake per call, on the hot path of a large sync. The hooks' sessions keep
:data:`POOL_SIZE` connections per host instead; nothing else about the session changes
(urllib3 retries stay off: the hooks retry themselves).
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

POOL_SIZE = 64  # connections kept per host: above any thread pool the sides use (Dataverse allows 52 at once)


def widen_pool(session: requests.Session, size: int = POOL_SIZE) -> requests.Session:
    """Mount adapters keeping ``size`` connections per host on ``session``; returns it."""
    adapter = HTTPAdapter(pool_maxsize=size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
