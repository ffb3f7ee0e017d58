"""Service protection API limits of the Dataverse emulator: requests, execution time and
concurrency per user in a sliding window, answered as the documented 429s."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .records import _seconds, _throttle

# ---------------------------------------------------------------------------
# Service protection limits


@dataclass
class ProtectionLimits:
    """Per-user limits in a sliding window (defaults: the documented per-web-server values)."""

    requests: int = 6000
    window_seconds: float = 300.0
    execution_ms: float = 1_200_000
    concurrent: int = 52
    request_cost_ms: float | None = None  # None: a request costs its handler's wall time
    # The x-ms-dop-hint every API answer carries: the degree of parallelism Dataverse suggests to
    # its clients ("Service protection API limits", "How to maximize throughput"); None: not sent.
    dop_hint: int | None = 4


class ServiceProtection:
    """Number of requests, combined execution time and concurrent requests, per user."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = ProtectionLimits()
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, deque[list[float]]] = {}
        self._inflight: dict[str, int] = {}
        self.peak_inflight = 0  # the most requests of one user in flight at once since the reset

    def reset(self, limits: ProtectionLimits | None = None) -> None:
        with self._lock:
            self.limits = limits or ProtectionLimits()
            self._calls.clear()
            self._inflight.clear()
            self.peak_inflight = 0

    def _window(self, user: str, now: float) -> deque[list[float]]:
        calls = self._calls.setdefault(user, deque())
        while calls and calls[0][0] + self.limits.window_seconds <= now:
            calls.popleft()
        return calls

    def enter(self, user: str) -> list[float]:
        """Admit a request (raises the documented 429) and return its usage entry."""
        with self._lock:
            now = self.clock()
            lim = self.limits
            calls = self._window(user, now)
            window = _seconds(lim.window_seconds)
            if self._inflight.get(user, 0) >= lim.concurrent:
                raise _throttle(
                    "0x80072326", f"Number of concurrent requests exceeded the limit of {lim.concurrent}.", 1
                )
            if len(calls) >= lim.requests:
                oldest = calls[len(calls) - lim.requests][0]
                raise _throttle(
                    "0x80072322",
                    f"Number of requests exceeded the limit of {lim.requests} over time window of {window} seconds.",
                    oldest + lim.window_seconds - now,
                )
            total = sum(entry[1] for entry in calls)
            if total >= lim.execution_ms:
                freed, wait = total, 0.0
                for stamp, cost in calls:
                    freed -= cost
                    wait = stamp + lim.window_seconds - now
                    if freed < lim.execution_ms:
                        break
                raise _throttle(
                    "0x80072321",
                    f"Combined execution time of incoming requests exceeded limit of {lim.execution_ms:,.0f} "
                    f"milliseconds over time window of {window} seconds. Decrease number of concurrent requests "
                    "or reduce the duration of requests and try again later.",
                    wait,
                )
            entry = [now, 0.0]
            calls.append(entry)
            self._inflight[user] = self._inflight.get(user, 0) + 1
            self.peak_inflight = max(self.peak_inflight, self._inflight[user])
            return entry

    def leave(self, user: str, entry: list[float], elapsed_ms: float) -> tuple[int, float]:
        """Record the request's cost; returns (requests left, milliseconds left) in the window."""
        with self._lock:
            self._inflight[user] = max(0, self._inflight.get(user, 1) - 1)
            cost = self.limits.request_cost_ms
            entry[1] = elapsed_ms if cost is None else float(cost)
            calls = self._window(user, self.clock())
            used = sum(e[1] for e in calls)
            return max(0, self.limits.requests - len(calls)), max(0.0, self.limits.execution_ms - used)
