"""cached_token: threads that miss the cache together (a write pool's first requests) wait for
one grant instead of each asking the token service; a forced refresh asks again."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cosell_sync.hooks.entra import cached_token, forget_tokens


def test_threads_missing_the_cache_together_share_one_grant():
    forget_tokens()
    grants: list[int] = []
    start = threading.Barrier(16)

    def acquire() -> dict:
        grants.append(1)
        time.sleep(0.2)  # the token service's round trip: the other threads arrive meanwhile
        return {"access_token": f"token-{len(grants)}", "expires_in": 3600}

    def ask(_: int) -> str:
        start.wait()
        return cached_token(("tenant", "client", "unit-test"), acquire)

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(ask, range(16)))
    assert len(grants) == 1 and set(tokens) == {"token-1"}
    assert cached_token(("tenant", "client", "unit-test"), acquire, force=True) == "token-2"
    forget_tokens()
