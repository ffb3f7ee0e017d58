"""The server's clock, as the ``Date`` headers of its answers tell it.

An incremental read's watermark must be a time on the clock that stamps the records
(``updatedDateTime``, ``modifiedon``, ``SystemModstamp``), not on ours. Every answer an API
gives carries that clock in its ``Date`` header (RFC 9110: the time the answer was made,
to the second, rounded down). While :func:`server_clock` is active, every answer received
through a :class:`~cosell_sync.hooks.http.TrustedSession` in this process (any thread: a read
may page on a pool) is observed, and the clock keeps the earliest time seen: at most the time
the first page of a read was answered, so every change stamped after it is newer. An answer
that is not the read's (a token, another read at the same time) can only make it earlier,
which costs a few records read twice, never one missed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

_active: list[ServerClock] = []  # the clocks observing now (any thread's answers)
_active_lock = threading.Lock()


class ServerClock:
    """The earliest ``Date`` seen while active (None: no answer carried one)."""

    def __init__(self) -> None:
        self.earliest: datetime | None = None
        self.answers = 0  # answers observed (with a Date header or not)
        self._lock = threading.Lock()

    def observe(self, headers: Any) -> None:
        raw = headers.get("Date") if headers is not None else None
        moment = _parse(raw)
        with self._lock:
            self.answers += 1
            if moment is not None and (self.earliest is None or moment < self.earliest):
                self.earliest = moment


def _parse(raw: Any) -> datetime | None:
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        moment = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@contextlib.contextmanager
def server_clock() -> Iterator[ServerClock]:
    """Observe the ``Date`` of every answer received (in this process) until the block ends."""
    clock = ServerClock()
    with _active_lock:
        _active.append(clock)
    try:
        yield clock
    finally:
        with _active_lock:
            _active.remove(clock)


def observe(response: Any) -> None:
    """Called for every answer a :class:`TrustedSession` receives."""
    if not _active:
        return
    with _active_lock:
        clocks = list(_active)
    for clock in clocks:
        clock.observe(getattr(response, "headers", None))
