"""Connection pools as wide as the concurrency the sync uses.

``requests`` keeps at most 10 open connections per host (``HTTPAdapter``'s default
``pool_maxsize``). A side that writes with more threads than that (Partner Center has no
batch API: one call per referral, on a thread pool; parallel ``$batch`` calls to Dataverse up
to its ``x-ms-dop-hint``) would see urllib3 discard the extra connections after each call
("Connection pool is full") and open, and TLS-handshake, a new one for the next: a
handshake per call, on the hot path of a large sync. The hooks' sessions keep
:data:`POOL_SIZE` connections per host instead; nothing else about the session changes
(urllib3 retries stay off: the hooks retry themselves).

:func:`map_on_threads` runs those calls: ``workers`` threads that each take the next item
until none is left, with no future, queue or wake-up of a waiting caller per item (what
``ThreadPoolExecutor.map`` costs per call, some 8% of a Partner Center write's client CPU).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import requests
from requests.adapters import HTTPAdapter

T = TypeVar("T")
R = TypeVar("R")

POOL_SIZE = 64  # connections kept per host: above any thread pool the sides use (Dataverse allows 52 at once)


def widen_pool(session: requests.Session, size: int = POOL_SIZE) -> requests.Session:
    """Mount adapters keeping ``size`` connections per host on ``session``; returns it."""
    adapter = HTTPAdapter(pool_maxsize=size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def map_on_threads(work: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``work`` over ``items`` on at most ``workers`` threads, results in the items' order (as
    ``ThreadPoolExecutor.map``): every item is worked on; then the exception of the first item
    (in their order) that raised one, if any, is raised."""
    items = list(items)
    results: list[R] = [None] * len(items)  # type: ignore[list-item]
    errors: dict[int, BaseException] = {}
    taken = itertools.count()  # its next() is atomic: each item goes to one thread

    def run() -> None:
        for i in taken:
            if i >= len(items):
                return
            try:
                results[i] = work(items[i])
            except BaseException as exc:  # raised by the caller, below
                errors[i] = exc

    threads = [threading.Thread(target=run, name=f"cosell-worker-{n}") for n in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[min(errors)]
    return results
