"""The state database's engine: SQLite or PostgreSQL, one transaction per unit of work, retries, locks.

Everything goes through SQLAlchemy Core and runs unchanged on SQLite (the default, a file
under ``$AIRFLOW_HOME``) and PostgreSQL (production). Nothing here imports Airflow at import
time; only :meth:`cosell_sync.state.StateStore.from_airflow` does, lazily.

Integrity under concurrent runs:

* **SQLite.** WAL journal, ``busy_timeout`` of 30 s, foreign keys on. pysqlite's own
  transaction handling is switched off (``isolation_level = None``) and every write
  transaction is opened with ``BEGIN IMMEDIATE``, so a writer takes the write lock before it
  reads anything: two writers queue instead of deadlocking, and read-modify-write sequences
  (the link conflict check, the watermark) never lose updates. Reads open a plain deferred
  ``BEGIN`` and run concurrently with the writer (WAL).
* **PostgreSQL.** Upserts are ``INSERT ... ON CONFLICT DO UPDATE``; the dead letter's
  attempts counter is incremented in SQL (``attempts = attempts + 1``); the watermark only
  moves forward through a conditional ``DO UPDATE ... WHERE``; link writes of one CRM and
  the schema migration are serialised with transaction-scoped advisory locks
  (:meth:`Database.lock`).
* **Both.** A write transaction that fails with "database is locked" (SQLite) or a
  serialisation failure / deadlock (PostgreSQL) is retried a few times as a whole
  (:meth:`Database.run`): the table modules write inside a ``work(conn)`` callable, never
  committing themselves, so several of them can share one transaction.

Timestamps come back timezone-aware in UTC: SQLite hands back naive values (UTC by
construction); PostgreSQL sessions run with ``TimeZone = UTC``, whatever the server's default.
PostgreSQL orders text by code point here (``COLLATE "C"``, :meth:`Database.by_code_point`), as
SQLite and Python do, whatever the database's collation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from cosell_sync.errors import ConfigurationError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONN_ID = "cosell_state"
DEFAULT_SQLITE_FILE = "cosell_state.db"
SQLITE_BUSY_TIMEOUT_S = 30
WRITE_ATTEMPTS = 6  # a locked / serialisation-failed transaction is run at most this often


class Database:
    """One state database: its engine, its dialect, and transactions run with retries."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        parsed = make_url(normalise_scheme(str(url)))
        self.url = parsed
        backend = parsed.get_backend_name()
        if backend not in {"sqlite", "postgresql"}:
            raise ConfigurationError(f"the state store runs on SQLite or PostgreSQL, not {backend!r}")
        kwargs: dict[str, Any] = {"echo": echo}
        if backend == "sqlite":
            database = parsed.database or ""
            in_memory = database in {"", ":memory:"} or database.startswith("file::memory:")
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
            if in_memory:
                kwargs["poolclass"] = StaticPool
            else:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(parsed, **kwargs)
            _configure_sqlite(self.engine, wal=not in_memory)
        else:
            kwargs["pool_pre_ping"] = True
            self.engine = sa.create_engine(parsed, **kwargs)
            _configure_postgresql(self.engine)
        self.dialect: str = self.engine.dialect.name

    def dispose(self) -> None:
        """Release the engine's pooled connections."""
        self.engine.dispose()

    def retryable(self, exc: sa.exc.DBAPIError) -> bool:
        if self.dialect == "sqlite":
            text = str(getattr(exc, "orig", exc)).lower()
            return "database is locked" in text or "database table is locked" in text or "busy" in text
        code = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(
            getattr(exc, "orig", None), "sqlstate", None
        )
        return code in {"40001", "40P01"}  # serialization_failure, deadlock_detected

    def run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction (``BEGIN IMMEDIATE`` on SQLite when writing), retrying on lock errors."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.engine.connect() as conn:
                    if not write:
                        conn.execution_options(cosell_read_only=True)
                    with conn.begin():
                        return work(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == WRITE_ATTEMPTS or not self.retryable(exc):
                    raise
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                log.warning("State DB busy (%s); retrying the transaction in %.2fs", exc.orig, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def read(self, work: Callable[[Connection], T]) -> T:
        return self.run(work, write=False)

    def lock(self, conn: Connection, name: str) -> None:
        """Serialise with other writers of ``name`` (PostgreSQL; SQLite already holds the write lock)."""
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(name)})

    def by_code_point(self, column: Any) -> Any:
        """``column`` for ORDER BY: PostgreSQL compares text by code point (``COLLATE "C"``), as
        SQLite and Python do, whatever the database's collation."""
        return column.collate("C") if self.dialect == "postgresql" else column

    def insert(self, table: sa.Table) -> Any:
        """An INSERT with the dialect's ``on_conflict_do_update`` / ``on_conflict_do_nothing``."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)


class UsesDatabase:
    """A part of :class:`~cosell_sync.state.StateStore` (links, watermarks, ...): its methods run
    on the store's :class:`Database`, ``self._db``; ``max_attempts`` is the dead letter's limit."""

    _db: Database
    max_attempts: int


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def default_state_url() -> str:
    """``sqlite:///$AIRFLOW_HOME/cosell_state.db`` (Airflow's own default home when unset)."""
    home = os.path.expanduser(os.path.expandvars(os.environ.get("AIRFLOW_HOME") or "~/airflow"))
    return f"sqlite:///{Path(home).resolve() / DEFAULT_SQLITE_FILE}"


def normalise_scheme(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if scheme == "postgres" or scheme.startswith("postgres+"):
        scheme = "postgresql" + scheme[len("postgres") :]
    return f"{scheme}{sep}{rest}"


def sqlalchemy_url_from_connection(conn: Any) -> str:
    """The SQLAlchemy URL an Airflow connection describes.

    Either ``host`` holds a whole SQLAlchemy URL (``{"conn_type": "generic", "host":
    "sqlite:////path/state.db"}``), or the connection was itself given as a URL
    (``AIRFLOW_CONN_COSELL_STATE='postgresql://...'``, which Airflow parses into fields with
    ``conn_type`` ``postgres``): the URL is rebuilt from the fields, with the extras as its
    query string.
    """
    host = (getattr(conn, "host", None) or "").strip()
    if "://" in host:
        return normalise_scheme(host)
    conn_type = (getattr(conn, "conn_type", None) or "").strip()
    drivername = normalise_scheme(f"{conn_type}://").removesuffix("://")
    if not conn_type or drivername in {"generic", "http", "https"}:
        raise ConfigurationError(
            f"connection {getattr(conn, 'conn_id', DEFAULT_CONN_ID)!r} must hold a SQLAlchemy URL in its host "
            "(e.g. sqlite:////path/state.db or postgresql+psycopg2://user:pass@host/db), "
            f"or be a database URL itself; got conn_type {conn_type!r} and host {host!r}"
        )
    try:
        extras = dict(getattr(conn, "extra_dejson", None) or {})
    except Exception:  # pragma: no cover - malformed extra: Airflow already logged it
        extras = {}
    query = {k: str(v) for k, v in extras.items() if isinstance(v, str | int | float) and not isinstance(v, bool)}
    if drivername.split("+")[0] == "sqlite":
        database = getattr(conn, "schema", None) or host or None
        return URL.create(drivername, database=database, query=query).render_as_string(hide_password=False)
    return URL.create(
        drivername,
        username=getattr(conn, "login", None) or None,
        password=getattr(conn, "password", None) or None,
        host=host or None,
        port=getattr(conn, "port", None) or None,
        database=getattr(conn, "schema", None) or None,
        query=query,
    ).render_as_string(hide_password=False)


def not_found_exceptions() -> tuple[type[BaseException], ...]:
    """Airflow's "connection not found" exception classes (both SDK and core, as installed)."""
    found: list[type[BaseException]] = []
    for module in ("airflow.sdk.exceptions", "airflow.exceptions"):
        try:
            mod = __import__(module, fromlist=["AirflowNotFoundException"])
            found.append(mod.AirflowNotFoundException)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the Airflow build
            continue
    return tuple(found)


def _configure_postgresql(engine: Engine) -> None:
    """Every session in UTC: timestamps come back in UTC whatever the server's ``TimeZone``
    (in a zone west of UTC, 0001-01-01 UTC would come back in year 0, which Python rejects)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True  # SET outside a transaction: it stays for the session
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET TIME ZONE 'UTC'")
        finally:
            cursor.close()
            dbapi_connection.autocommit = autocommit


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    """pysqlite: our own BEGIN (IMMEDIATE for writers), WAL, busy timeout, foreign keys."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not emit BEGIN/COMMIT itself
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get("cosell_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
