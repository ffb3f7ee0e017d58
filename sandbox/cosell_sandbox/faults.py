"""Seeded fault injection for the emulators: latency, 429 with Retry-After, 5xx, and connections
dropped before or after the request is processed (``/_sandbox/faults``)."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class FaultConfig:
    """Seeded fault injection. Rates are probabilities per API request."""

    seed: int = 0
    latency_ms: tuple[int, int] = (0, 0)
    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_5xx: float = 0.0
    status_5xx: int = 503
    drop_rate: float = 0.0  # drop the connection before the request is processed
    drop_after_rate: float = 0.0  # process the request, then drop the connection (the answer is lost)
    max_faults: int | None = None  # stop injecting after this many faults
    after: int = 0  # let this many matching requests through untouched before any fault
    path_prefix: str = ""  # only requests whose path starts with this are affected
    methods: tuple[str, ...] = ()  # empty: all methods

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FaultConfig:
        latency = doc.get("latency_ms", (0, 0))
        if isinstance(latency, int | float):
            latency = (int(latency), int(latency))
        return cls(
            seed=int(doc.get("seed", 0)),
            latency_ms=(int(latency[0]), int(latency[1])),
            rate_429=float(doc.get("rate_429", 0.0)),
            retry_after=float(doc.get("retry_after", 1.0)),
            rate_5xx=float(doc.get("rate_5xx", 0.0)),
            status_5xx=int(doc.get("status_5xx", 503)),
            drop_rate=float(doc.get("drop_rate", 0.0)),
            drop_after_rate=float(doc.get("drop_after_rate", 0.0)),
            max_faults=None if doc.get("max_faults") is None else int(doc["max_faults"]),
            after=int(doc.get("after", 0)),
            path_prefix=str(doc.get("path_prefix", "")),
            methods=tuple(m.upper() for m in doc.get("methods", ())),
        )


class Faults:
    """Decides, with a seeded RNG, which fault (if any) hits a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.config = FaultConfig()
        self._rng = random.Random(0)
        self.injected: dict[str, int] = {"latency": 0, "429": 0, "5xx": 0, "drop": 0, "drop_after": 0}
        self.matched = 0  # matching requests seen since the last configure()

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)
            self.injected = dict.fromkeys(self.injected, 0)
            self.matched = 0

    def clear(self) -> None:
        self.configure(FaultConfig())

    def decide(self, method: str, path: str) -> tuple[float, str | None]:
        """(latency seconds, fault) where fault is None, '429', '5xx', 'drop' or 'drop_after'."""
        with self._lock:
            cfg = self.config
            if not path.startswith(cfg.path_prefix) or (cfg.methods and method not in cfg.methods):
                return 0.0, None
            self.matched += 1
            if self.matched <= cfg.after:
                return 0.0, None
            lo, hi = cfg.latency_ms
            latency = self._rng.uniform(lo, hi) / 1000 if hi > 0 else 0.0
            if latency:
                self.injected["latency"] += 1
            roll = self._rng.random()
            fault: str | None = None
            threshold = 0.0
            for name, rate in (
                ("drop", cfg.drop_rate),
                ("drop_after", cfg.drop_after_rate),
                ("429", cfg.rate_429),
                ("5xx", cfg.rate_5xx),
            ):
                threshold += rate
                if roll < threshold:
                    fault = name
                    break
            faults_so_far = sum(v for k, v in self.injected.items() if k != "latency")
            if fault and cfg.max_faults is not None and faults_so_far >= cfg.max_faults:
                fault = None
            if fault:
                self.injected[fault] += 1
            return latency, fault
