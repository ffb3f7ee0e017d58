"""Signed webhook deliveries, as Partner Center sends them.

Each event is POSTed to the registered URL with:

* ``Authorization: Signature <base64 RSA-SHA256 PKCS#1 v1.5 over the raw body>``
  (or ``x-ms-signature`` when the registration asks for it);
* ``X-MS-Certificate-Url`` pointing at the signing certificate (served by the sandbox);
* ``X-MS-Signature-Algorithm: rsa-sha256``.

A delivery that does not get a 2xx answer is retried with exponential backoff, up
to ``max_attempts`` attempts (10, as documented); after that it is parked in the
offline queue, visible through the control plane and re-deliverable from there.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


@dataclass
class Attempt:
    at: float
    status: int | None
    error: str | None


@dataclass
class Delivery:
    id: str
    url: str
    body: bytes
    event_name: str
    max_attempts: int
    ms_signature_header: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    state: str = "pending"  # pending | delivered | parked
    on_done: Callable[[Delivery], None] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "eventName": self.event_name,
            "payload": json.loads(self.body),
            "state": self.state,
            "attempts": [vars(a) for a in self.attempts],
        }


@dataclass(kw_only=True)
class DispatchConfig:
    max_attempts: int = 10
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    timeout: float = 10.0


class WebhookDispatcher:
    def __init__(
        self, signer: rsa.RSAPrivateKey, client_context: ssl.SSLContext, cert_url: Callable[[], str], workers: int = 4
    ) -> None:
        self._signer = signer
        self._ctx = client_context
        self._cert_url = cert_url
        self.config = DispatchConfig()
        self.deliveries: dict[str, Delivery] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"webhook-dispatch-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def sign(self, body: bytes) -> str:
        signature = self._signer.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()

    def enqueue(
        self,
        url: str,
        payload: dict[str, Any],
        *,
        ms_signature_header: bool = False,
        max_attempts: int | None = None,
        on_done: Callable[[Delivery], None] | None = None,
    ) -> Delivery:
        delivery = Delivery(
            id=str(uuid.uuid4()),
            url=url,
            body=json.dumps(payload).encode(),
            event_name=str(payload.get("EventName")),
            max_attempts=max_attempts or self.config.max_attempts,
            ms_signature_header=ms_signature_header,
            on_done=on_done,
        )
        with self._cond:
            self.deliveries[delivery.id] = delivery
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), delivery.id))
            self._cond.notify()
        return delivery

    def redeliver_parked(self) -> int:
        with self._cond:
            parked = [d for d in self.deliveries.values() if d.state == "parked"]
            for d in parked:
                d.state = "pending"
                d.max_attempts = len(d.attempts) + self.config.max_attempts
                heapq.heappush(self._heap, (time.monotonic(), next(self._seq), d.id))
            self._cond.notify_all()
        return len(parked)

    def clear(self) -> None:
        with self._cond:
            self.deliveries.clear()
            self._heap.clear()

    def idle(self) -> bool:
        with self._cond:
            return all(d.state != "pending" for d in self.deliveries.values())

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic())
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, delivery_id = heapq.heappop(self._heap)
                delivery = self.deliveries.get(delivery_id)
            if delivery is not None and delivery.state == "pending":
                self._attempt(delivery)

    def _attempt(self, delivery: Delivery) -> None:
        signature = self.sign(delivery.body)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-MS-Certificate-Url": self._cert_url(),
            "X-MS-Signature-Algorithm": "rsa-sha256",
            "User-Agent": "PartnerCenter-Notifications/1.0 (cosell-sandbox)",
        }
        if delivery.ms_signature_header:
            headers["x-ms-signature"] = signature
        else:
            headers["Authorization"] = f"Signature {signature}"
        # The registration API only accepts http(s) URLs.
        request = urllib.request.Request(delivery.url, data=delivery.body, headers=headers, method="POST")  # noqa: S310
        status: int | None = None
        error: str | None = None
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout, context=self._ctx) as resp:  # noqa: S310
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            error = str(getattr(exc, "reason", exc))
        done = False
        with self._cond:
            delivery.attempts.append(Attempt(time.time(), status, error))
            if status is not None and 200 <= status < 300:
                delivery.state = "delivered"
                done = True
            elif len(delivery.attempts) >= delivery.max_attempts:
                delivery.state = "parked"
                done = True
            else:
                delay = min(self.config.backoff_cap, self.config.backoff_base * 2 ** (len(delivery.attempts) - 1))
                heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), delivery.id))
                self._cond.notify()
        if done and delivery.on_done:
            delivery.on_done(delivery)
