"""The trigger behind ``cosell_referral_events``: it watches the webhook inbox in the state DB.

It is an event trigger for an :class:`~airflow.sdk.AssetWatcher`: when webhook events
arrive that no DAG run has been told about yet, it waits a moment for a burst to settle
(``settle`` seconds of quiet, at most ``max_wait``), records the newest event it signalled
(the state DB's ``inbox`` watermark) and fires once. The triggerer then starts it again.

It looks every ``poll_interval`` (0.25 s): one indexed count of the pending rows, cheap
next to the seconds a webhook's sync takes, and a new event waits 0.125 s for it on
average (at 1 s it was 0.5 s, and the settle 0.5 s more; a burst still coalesces, since
events that arrive while a run is active become one next run).

Because the signal is recorded, the condition does not stay true: events that are
already signalled (being synced, or released by a failed run) fire nothing more; the
next new event's run claims them too. Events waiting while the triggerer or scheduler
was down fire as soon as it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

SIGNAL_DAG = "cosell_referral_events"
SIGNAL_SIDE = "inbox"


class InboxTrigger(BaseEventTrigger):
    def __init__(
        self,
        conn_id: str = "cosell_state",
        poll_interval: float = 0.25,
        settle: float = 0.2,
        max_wait: float = 3.0,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.settle = settle
        self.max_wait = max_wait
        self._store: Any = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "cosell_sync.triggers.inbox.InboxTrigger",
            {
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "settle": self.settle,
                "max_wait": self.max_wait,
            },
        )

    def _pending(self) -> tuple[int, datetime | None]:
        """(pending rows, newest pending arrival); blocking."""
        if self._store is None:
            from cosell_sync.state import StateStore

            store = StateStore.from_airflow(self.conn_id)
            store.migrate()
            self._store = store
        return self._store.inbox_newest_pending()

    def _state(self) -> tuple[int, datetime | None, datetime | None]:
        """(pending rows, newest pending arrival, newest arrival already signalled); blocking."""
        pending, newest = self._pending()
        return pending, newest, self._store.get_watermark(SIGNAL_DAG, SIGNAL_SIDE)

    def _signal(self, newest: datetime) -> None:
        self._store.set_watermark(SIGNAL_DAG, SIGNAL_SIDE, newest, run_id="triggerer")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                pending, newest, signalled = await asyncio.to_thread(self._state)
            except Exception:
                self.log.exception("cannot read the webhook inbox; retrying")
                await asyncio.sleep(max(self.poll_interval, 5.0))
                continue
            if newest is not None and (signalled is None or newest > signalled):
                first_seen = time.monotonic()
                while time.monotonic() - first_seen < self.max_wait:  # let a burst settle
                    await asyncio.sleep(self.settle)
                    pending, later = await asyncio.to_thread(self._pending)
                    if later is None or later <= newest:
                        break
                    newest = later
                await asyncio.to_thread(self._signal, newest)
                self.log.info("%d webhook event(s) pending; newest received %s", pending, newest.isoformat())
                yield TriggerEvent({"pending": pending, "newest_received_at": newest.isoformat()})
                return
            await asyncio.sleep(self.poll_interval)

    async def cleanup(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
