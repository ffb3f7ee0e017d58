"""The state database's tables and their migrations.

The ``Table`` objects describe the newest schema; :data:`MIGRATIONS` brings any older database
up to it, one frozen step per version, recorded in ``cosell_schema_version``. :func:`migrate`
is idempotent and safe to run from several processes at once (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: an advisory lock).

PostgreSQL differs from SQLite in ways the column types even out: timestamps are stored in UTC
and always come back aware (:class:`UTCDateTime`); JSON is stored as text (:class:`JSONText`),
so dicts round-trip on any backend; free text that comes from elsewhere (error messages and
codes, audit details and field names, webhook URIs) has NUL characters replaced (PostgreSQL
text cannot hold them) and is cut to its column's length (:class:`FreeText`), where SQLite
would store it as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cosell_sync.state import values
from cosell_sync.state.db import Database

log = logging.getLogger(__name__)

ID_LENGTH = 255
RUN_ID_LENGTH = 250  # Airflow's own limit for dag_id and run_id

# --------------------------------------------------------------------------- column types


class UTCDateTime(sa.types.TypeDecorator):
    """A timestamp stored in UTC; always returned timezone-aware (UTC).

    PostgreSQL keeps ``timestamptz``; SQLite stores the naive UTC wall time (its text
    format sorts chronologically, so comparisons in SQL work).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = values.as_utc(value, "timestamp")
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - defensive: a value written by hand
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JSONText(sa.types.TypeDecorator):
    """Any JSON value stored as canonical JSON text (portable); ``None`` is SQL NULL."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        return None if value is None else values.canonical_json(value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else json.loads(value)


class FreeText(sa.types.TypeDecorator):
    """Text that comes from elsewhere (an error message, a URI): on PostgreSQL, NUL characters
    become U+FFFD and a value longer than the column is cut, so it is stored instead of failing
    the whole transaction. SQLite stores it unchanged. The DDL is the plain ``impl`` type."""

    impl = sa.Text
    cache_ok = True

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.length = length
        if length is not None:
            self.impl = sa.String(length)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        if value is None or dialect.name != "postgresql":
            return value
        value = str(value).replace("\x00", "\ufffd")
        return value if self.length is None else value[: self.length]


def crm_column(**kwargs: Any) -> sa.Column:
    """The CRM's name (``crms.NAMES``), stored alike by every table that has one."""
    return sa.Column("crm", sa.String(32), **kwargs)


def airflow_id_column(name: str, **kwargs: Any) -> sa.Column:
    """A DAG id or run id (or a run's id as a claimant), as long as Airflow allows."""
    return sa.Column(name, sa.String(RUN_ID_LENGTH), **kwargs)


# --------------------------------------------------------------------------- tables

metadata = sa.MetaData()
schema_version_t = sa.Table(
    "cosell_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(ID_LENGTH), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

# The Table objects below describe the newest schema. Migration steps are frozen: version 1
# creates exactly these tables today; a later version that changes a table must add a step
# (ALTER TABLE / new table) and give step 1 its own frozen copy of the v1 definitions.
links_t = sa.Table(
    "cosell_links",
    metadata,
    crm_column(primary_key=True),
    sa.Column("referral_id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("crm_id", sa.String(ID_LENGTH), nullable=False),
    sa.Column("base", JSONText, nullable=False),
    sa.Column("base_hash", sa.String(64), nullable=False),
    sa.Column("synced_at", UTCDateTime, nullable=False),
    airflow_id_column("run_id", nullable=True),
    sa.Index("ux_cosell_links_crm_crm_id", "crm", "crm_id", unique=True),
)

watermarks_t = sa.Table(
    "cosell_watermarks",
    metadata,
    airflow_id_column("dag_id", primary_key=True),
    sa.Column("side", sa.String(32), primary_key=True),
    sa.Column("value", UTCDateTime, nullable=False),
    airflow_id_column("run_id", nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

audit_t = sa.Table(
    "cosell_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    airflow_id_column("dag_id", nullable=False),
    airflow_id_column("run_id", nullable=False),
    crm_column(nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("referral_id", sa.String(ID_LENGTH), nullable=True),
    sa.Column("crm_id", sa.String(ID_LENGTH), nullable=True),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("field", FreeText(ID_LENGTH), nullable=True),
    sa.Column("old_value", sa.Text, nullable=True),  # JSON text, encoded/decoded here
    sa.Column("new_value", sa.Text, nullable=True),
    sa.Column("detail", FreeText(), nullable=True),
    sa.Index("ix_cosell_audit_crm_referral", "crm", "referral_id"),
    sa.Index("ix_cosell_audit_run_id", "run_id"),
    sa.Index("ix_cosell_audit_at", "at"),
    # The Co-sell page's conflict counts and lists: one CRM's rows of one action, newest first.
    sa.Index("ix_cosell_audit_crm_action_at", "crm", "action", "at"),
)

dead_letter_t = sa.Table(
    "cosell_dead_letter",
    metadata,
    crm_column(primary_key=True),
    sa.Column("direction", sa.String(16), primary_key=True),
    sa.Column("record_key", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("payload", JSONText, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("first_seen", UTCDateTime, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
    sa.Column("last_error", FreeText(), nullable=False),
    sa.Column("error_code", FreeText(ID_LENGTH), nullable=True),
    airflow_id_column("last_run_id", nullable=True),
)

runs_t = sa.Table(
    "cosell_runs",
    metadata,
    airflow_id_column("dag_id", primary_key=True),
    airflow_id_column("run_id", primary_key=True),
    crm_column(nullable=True),
    sa.Column("summary", JSONText, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=False),
    sa.Index("ix_cosell_runs_dag_finished", "dag_id", "finished_at"),
)


inbox_t = sa.Table(
    "cosell_inbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("dedup_key", sa.String(64), nullable=False),
    sa.Column("event_name", sa.String(64), nullable=False),
    sa.Column("referral_id", sa.String(ID_LENGTH), nullable=False),
    sa.Column("resource_uri", FreeText(), nullable=False),
    sa.Column("change_date", UTCDateTime, nullable=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    airflow_id_column("claimed_by", nullable=True),
    sa.Column("claimed_at", UTCDateTime, nullable=True),
    sa.Column("done_at", UTCDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Index("ux_cosell_inbox_dedup_key", "dedup_key", unique=True),
    sa.Index("ix_cosell_inbox_status_id", "status", "id"),
    sa.Index("ix_cosell_inbox_claimed_by", "claimed_by"),
)


leases_t = sa.Table(
    "cosell_leases",
    metadata,
    crm_column(primary_key=True),
    airflow_id_column("dag_id", nullable=False),
    airflow_id_column("run_id", nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("released_at", UTCDateTime, nullable=True),
)


def _migration_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[links_t, watermarks_t, audit_t, dead_letter_t, runs_t], checkfirst=True)


def _migration_v2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[inbox_t], checkfirst=True)


def _migration_v3(conn: Connection) -> None:
    metadata.create_all(conn, tables=[leases_t], checkfirst=True)


def _migration_v4(conn: Connection) -> None:
    for index in audit_t.indexes:
        if index.name == "ix_cosell_audit_crm_action_at":
            index.create(conn, checkfirst=True)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: links, watermarks, audit, dead letter, runs", _migration_v1),
    Migration(2, "webhook inbox", _migration_v2),
    Migration(3, "run leases", _migration_v3),
    Migration(4, "audit index by CRM, action and time (the Co-sell page)", _migration_v4),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_MIGRATION_LOCK_KEY = "cosell_state:migrate"


def schema_version(db: Database) -> int:
    """The schema version of the database (0 when it has never been migrated)."""

    def work(conn: Connection) -> int:
        if not sa.inspect(conn).has_table(schema_version_t.name):
            return 0
        return int(conn.execute(sa.select(sa.func.max(schema_version_t.c.version))).scalar() or 0)

    return db.read(work)


def migrate(db: Database) -> int:
    """Create or upgrade the schema; idempotent and safe to call from several processes at once."""
    current = schema_version(db)
    if current >= SCHEMA_VERSION:
        if current > SCHEMA_VERSION:
            log.warning("State DB schema version %s is newer than this code's (%s)", current, SCHEMA_VERSION)
        return current

    def work(conn: Connection) -> int:
        db.lock(conn, _MIGRATION_LOCK_KEY)
        metadata.create_all(conn, tables=[schema_version_t], checkfirst=True)
        version = int(conn.execute(sa.select(sa.func.max(schema_version_t.c.version))).scalar() or 0)
        for step in MIGRATIONS:
            if step.version <= version:
                continue
            log.info("Migrating the state DB to version %s: %s", step.version, step.description)
            step.apply(conn)
            conn.execute(
                schema_version_t.insert().values(
                    version=step.version, description=step.description, applied_at=values.now()
                )
            )
            version = step.version
        return version

    return db.run(work)
