"""The state database as one object: :class:`StateStore`, a thin facade over the table modules.

The state lives in a SQLite file under ``$AIRFLOW_HOME`` (the default) or in PostgreSQL
(production), through SQLAlchemy Core; nothing here imports Airflow at import time, only
:meth:`StateStore.from_airflow` does, lazily. The work is done per concern:

* :mod:`~cosell_sync.state.db`: the engine, the dialects, transactions retried as a whole on
  lock errors, advisory locks (the concurrency notes are there);
* :mod:`~cosell_sync.state.schema`: the tables and their migrations;
* :mod:`~cosell_sync.state.links`, :mod:`~cosell_sync.state.watermarks`,
  :mod:`~cosell_sync.state.audit`, :mod:`~cosell_sync.state.dead_letter`,
  :mod:`~cosell_sync.state.runs` (a run's one-transaction commit and the runs registry),
  :mod:`~cosell_sync.state.inbox` (the webhook inbox), :mod:`~cosell_sync.state.leases`
  (run leases, the fencing of commits).

Each table module has functions that write inside a caller's transaction (``write_*(conn,
...)``) and a class with its public methods (``Links``, ``Watermarks``, ...), each running its
own transaction; :class:`StateStore` is those classes together, on one database.
:meth:`StateStore.commit_run` puts a run's writes of every table into one transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import Engine

from cosell_sync.state import schema
from cosell_sync.state.audit import AuditLog
from cosell_sync.state.db import DEFAULT_CONN_ID, Database, default_state_url, not_found_exceptions
from cosell_sync.state.db import sqlalchemy_url_from_connection as url_from_connection
from cosell_sync.state.dead_letter import DeadLetter
from cosell_sync.state.inbox import Inbox
from cosell_sync.state.leases import Leases
from cosell_sync.state.links import Links
from cosell_sync.state.runs import Runs
from cosell_sync.state.watermarks import Watermarks

log = logging.getLogger(__name__)

__all__ = ["StateStore"]


class StateStore(Links, Watermarks, AuditLog, DeadLetter, Runs, Leases, Inbox):
    """The sync's state database: links, watermarks, audit, dead letter, runs, inbox, run leases.

    ``max_attempts``: a dead-letter row failed this often is exhausted (no longer retried).
    """

    def __init__(self, url: str, *, echo: bool = False, max_attempts: int = 5) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = int(max_attempts)
        self._db = Database(url, echo=echo)

    @classmethod
    def from_airflow(cls, conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> StateStore:
        """The store behind the Airflow connection ``conn_id``; SQLite under ``$AIRFLOW_HOME`` when it is absent."""
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(conn_id)
        except not_found_exceptions():
            url = default_state_url()
            log.info("Connection %r is not defined; using the state database %s", conn_id, url)
            return cls(url, **kwargs)
        return cls(url_from_connection(conn), **kwargs)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._db.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def close(self) -> None:
        """Release the engine's pooled connections."""
        self._db.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self.url!r})"

    def schema_version(self) -> int:
        """The schema version of the database (0 when it has never been migrated)."""
        return schema.schema_version(self._db)

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe to call from several processes at once."""
        return schema.migrate(self._db)
