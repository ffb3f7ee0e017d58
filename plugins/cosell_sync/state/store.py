"""The state database: links, watermarks, the audit log, the dead letter, the runs registry and the webhook inbox.

Everything goes through SQLAlchemy Core and runs unchanged on SQLite (the default, a file
under ``$AIRFLOW_HOME``) and PostgreSQL (production). Nothing here imports Airflow at import
time; only :meth:`StateStore.from_airflow` does, lazily.

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
  the schema migration are serialised with transaction-scoped advisory locks.
* **Both.** A write transaction that fails with "database is locked" (SQLite) or a
  serialisation failure / deadlock (PostgreSQL) is retried a few times as a whole.

Run leases (schema version 3): one row per CRM naming the run (DAG id and run id) that may
read the base and commit it now, with an expiry and an epoch (a fencing token) that grows
each time the lease passes to another run. :meth:`StateStore.acquire_lease` is re-entrant for
the holder, refuses another run while the lease is live and takes over an expired or
released one; :meth:`StateStore.commit_run` with ``lease_epoch`` checks, in the commit's own
transaction, that the run still holds the lease with that epoch, so a run whose lease passed
to another run can never commit a stale base. Acquire, renew, release and that check take
the same lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock per CRM).

The webhook inbox (schema version 2) holds the Partner Center events the receiver accepted:
one row per distinct event (``dedup_key`` is unique, so a redelivery is not stored twice),
``pending`` until a run claims it, ``claimed`` by that run, ``done`` once the run's sync
committed. A claim is one write transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock), so two runs never claim the same row; a run that died is recognised by the
age of its claim, and its rows are claimed again. On SQLite (WAL, ``synchronous=NORMAL``) a
committed row survives a crash of any process but not necessarily a power loss of the host;
production deployments that need that use PostgreSQL.

Timestamps are stored in UTC and always come back timezone-aware (SQLite hands back naive
values; they are UTC by construction; PostgreSQL sessions run with ``TimeZone = UTC``, whatever
the server's default). JSON is stored as text, so dicts round-trip on any backend.

PostgreSQL differs from SQLite in ways the store evens out: text is ordered by code point
(``COLLATE "C"``, as SQLite and Python order it) whatever the database's collation; free text
that comes from elsewhere (error messages and codes, audit details and field names, webhook
URIs) has NUL characters replaced (PostgreSQL text cannot hold them) and is cut to its
column's length, where SQLite would store it as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from cosell_sync.errors import ConfigurationError

log = logging.getLogger(__name__)

__all__ = [
    "ACTIONS",
    "CRMS",
    "DIRECTIONS",
    "INBOX_STATUSES",
    "SCHEMA_VERSION",
    "SIDES",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "LinkConflictError",
    "StateStore",
    "default_state_url",
    "sqlalchemy_url_from_connection",
]

T = TypeVar("T")

CRMS = frozenset({"dynamics365", "salesforce"})
SIDES = frozenset({"partner_center", "crm", "inbox", "full_sync"})
# "inbox": the newest webhook event signalled to a DAG; "full_sync": when a window sync (not a
# dry run, backfill or referral_ids run) last committed: the first one is the initial load
DIRECTIONS = frozenset({"pc_to_crm", "crm_to_pc"})
ACTIONS = frozenset({"create", "update", "conflict", "skip", "fail", "win", "lose", "deferred", "dismiss"})
INBOX_STATUSES = ("pending", "claimed", "done")

DEFAULT_CONN_ID = "cosell_state"
DEFAULT_SQLITE_FILE = "cosell_state.db"
IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit
MAX_ERROR_CHARS = 4000
SQLITE_BUSY_TIMEOUT_S = 30
WRITE_ATTEMPTS = 6  # a locked / serialisation-failed transaction is run at most this often

LINK_COLUMNS = ["referral_id", "crm_id", "base", "base_hash", "synced_at", "run_id"]
AUDIT_COLUMNS = [
    "id",
    "at",
    "dag_id",
    "run_id",
    "crm",
    "direction",
    "referral_id",
    "crm_id",
    "action",
    "field",
    "old_value",
    "new_value",
    "detail",
]
FAILURE_COLUMNS = ["record_key", "attempts", "first_seen", "exhausted"]
RETRYABLE_COLUMNS = ["record_key", "payload", "attempts", "first_seen", "last_seen", "last_error", "error_code"]
INBOX_COLUMNS = [
    "id",
    "dedup_key",
    "event_name",
    "referral_id",
    "resource_uri",
    "change_date",
    "received_at",
    "status",
    "claimed_by",
    "claimed_at",
    "done_at",
    "attempts",
]
INBOX_STALE_CLAIM = timedelta(hours=1)  # a claim older than this belongs to a run that died
DEAD_LETTER_COLUMNS = [
    "crm",
    "direction",
    "record_key",
    "payload",
    "attempts",
    "first_seen",
    "last_seen",
    "last_error",
    "error_code",
    "last_run_id",
    "exhausted",
]


class LinkConflictError(ValueError):
    """One CRM record would be linked to two referrals."""

    def __init__(self, crm: str, crm_id: str, existing_referral_id: str, referral_id: str) -> None:
        self.crm = crm
        self.crm_id = crm_id
        self.existing_referral_id = existing_referral_id
        self.referral_id = referral_id
        super().__init__(
            f"{crm} record {crm_id!r} is already linked to referral {existing_referral_id!r}; "
            f"it cannot also be linked to referral {referral_id!r}"
        )


@dataclass(frozen=True)
class Lease:
    """A CRM's run lease: who holds it (``dag_id``, ``run_id``), since when, until when."""

    crm: str
    dag_id: str
    run_id: str
    epoch: int
    acquired_at: datetime
    expires_at: datetime
    released_at: datetime | None = None

    def live(self, now: datetime | None = None) -> bool:
        """Held: neither expired nor released."""
        return self.released_at is None and self.expires_at > (now or _now())

    def holder(self) -> str:
        return f"{self.dag_id} run {self.run_id}"


class LeaseHeldError(RuntimeError):
    """Another run holds the CRM's lease (it is live): wait and try again."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        super().__init__(
            f"the {lease.crm} lease is held by {lease.holder()} (since {lease.acquired_at.isoformat()}, "
            f"expires {lease.expires_at.isoformat()} unless renewed)"
        )


class LeaseLostError(RuntimeError):
    """The run no longer holds the lease it read the base under: its plan may be stale."""

    def __init__(self, crm: str, dag_id: str, run_id: str, epoch: int, current: Lease | None) -> None:
        self.crm = crm
        self.current = current
        now = "nobody holds it" if current is None else f"it passed to {current.holder()} (epoch {current.epoch})"
        super().__init__(
            f"{dag_id} run {run_id} no longer holds the {crm} lease it read the base under (epoch {epoch}): "
            f"{now}. Its plan may be stale, so it stops here; the next run syncs the changes again"
        )


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
        value = _as_utc(value, "timestamp")
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
        return None if value is None else _canonical_json(value)

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


# --------------------------------------------------------------------------- schema

metadata = sa.MetaData()
_ID = 255
_RUN_ID = 250  # Airflow's own limit for dag_id and run_id

schema_version_t = sa.Table(
    "cosell_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(_ID), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

# The Table objects below describe the newest schema. Migration steps are frozen: version 1
# creates exactly these tables today; a later version that changes a table must add a step
# (ALTER TABLE / new table) and give step 1 its own frozen copy of the v1 definitions.
links_t = sa.Table(
    "cosell_links",
    metadata,
    sa.Column("crm", sa.String(32), primary_key=True),
    sa.Column("referral_id", sa.String(_ID), primary_key=True),
    sa.Column("crm_id", sa.String(_ID), nullable=False),
    sa.Column("base", JSONText, nullable=False),
    sa.Column("base_hash", sa.String(64), nullable=False),
    sa.Column("synced_at", UTCDateTime, nullable=False),
    sa.Column("run_id", sa.String(_RUN_ID), nullable=True),
    sa.Index("ux_cosell_links_crm_crm_id", "crm", "crm_id", unique=True),
)

watermarks_t = sa.Table(
    "cosell_watermarks",
    metadata,
    sa.Column("dag_id", sa.String(_RUN_ID), primary_key=True),
    sa.Column("side", sa.String(32), primary_key=True),
    sa.Column("value", UTCDateTime, nullable=False),
    sa.Column("run_id", sa.String(_RUN_ID), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

audit_t = sa.Table(
    "cosell_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("dag_id", sa.String(_RUN_ID), nullable=False),
    sa.Column("run_id", sa.String(_RUN_ID), nullable=False),
    sa.Column("crm", sa.String(32), nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("referral_id", sa.String(_ID), nullable=True),
    sa.Column("crm_id", sa.String(_ID), nullable=True),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("field", FreeText(_ID), nullable=True),
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
    sa.Column("crm", sa.String(32), primary_key=True),
    sa.Column("direction", sa.String(16), primary_key=True),
    sa.Column("record_key", sa.String(_ID), primary_key=True),
    sa.Column("payload", JSONText, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("first_seen", UTCDateTime, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
    sa.Column("last_error", FreeText(), nullable=False),
    sa.Column("error_code", FreeText(_ID), nullable=True),
    sa.Column("last_run_id", sa.String(_RUN_ID), nullable=True),
)

runs_t = sa.Table(
    "cosell_runs",
    metadata,
    sa.Column("dag_id", sa.String(_RUN_ID), primary_key=True),
    sa.Column("run_id", sa.String(_RUN_ID), primary_key=True),
    sa.Column("crm", sa.String(32), nullable=True),
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
    sa.Column("referral_id", sa.String(_ID), nullable=False),
    sa.Column("resource_uri", FreeText(), nullable=False),
    sa.Column("change_date", UTCDateTime, nullable=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("claimed_by", sa.String(_RUN_ID), nullable=True),
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
    sa.Column("crm", sa.String(32), primary_key=True),
    sa.Column("dag_id", sa.String(_RUN_ID), nullable=False),
    sa.Column("run_id", sa.String(_RUN_ID), nullable=False),
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
_INBOX_LOCK_KEY = "cosell_state:inbox"
_LEASE_LOCK_KEY = "cosell_state:lease:{crm}"


# --------------------------------------------------------------------------- helpers


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: Any, what: str) -> datetime:
    """An aware datetime in UTC; naive values are rejected."""
    if isinstance(value, pd.Timestamp):
        if value is pd.NaT:
            raise ValueError(f"{what} is missing (NaT)")
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got the naive datetime {value.isoformat()}")
    return value.astimezone(UTC)


def _missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA (never true for containers)."""
    if value is None or value is pd.NaT or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _opt_str(value: Any) -> str | None:
    return None if _missing(value) else str(value)


def _req_str(value: Any, what: str) -> str:
    if _missing(value) or str(value) == "":
        raise ValueError(f"{what} is required")
    return str(value)


def _check(value: str, allowed: frozenset[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")
    return value


def _ids(values: Iterable[Any]) -> list[str]:
    """The ids as strings, without duplicates, in their first order."""
    return list(dict.fromkeys(str(v) for v in values if not _missing(v)))


def _chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _records(data: pd.DataFrame | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if data is None:
        return []
    if isinstance(data, pd.DataFrame):
        return data.to_dict("records") if len(data) else []
    return [dict(row) for row in data]


def _utc_column(values: Sequence[Any]) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values), utc=True), dtype="datetime64[us, UTC]")


def _frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, times: Sequence[str] = ()) -> pd.DataFrame:
    """A frame with exactly ``columns``; text and JSON columns stay ``object`` (None kept as None)."""
    frame = pd.DataFrame([[row[c] for c in columns] for row in rows], columns=list(columns), dtype=object)
    for column in times:
        frame[column] = _utc_column(frame[column].tolist())
    return frame


def _base_columns(texts: Sequence[str]) -> dict[str, pd.Series]:
    """Stored bases (JSON objects as text), one column per field: decoded in one pass by Arrow
    (text stays text, as stored: no timestamp or date guessing), else, when a field holds values
    of different JSON types or nested ones, row by row. A field missing from a base is None."""
    import io

    import pyarrow as pa
    import pyarrow.json as paj

    if not texts:
        return {}
    data = "\n".join(texts).encode()
    plain = {pa.string(), pa.large_string(), pa.float64(), pa.int64(), pa.bool_(), pa.null()}
    try:
        table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(block_size=max(1 << 20, len(data) + 1)))
        guessed = [f for f in table.schema if pa.types.is_temporal(f.type)]
        if guessed:  # Arrow reads ISO dates as timestamps: read them again as the text they are
            options = paj.ParseOptions(
                explicit_schema=pa.schema([(f.name, pa.string()) for f in guessed]), unexpected_field_behavior="infer"
            )
            table = paj.read_json(
                io.BytesIO(data),
                read_options=paj.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
                parse_options=options,
            )
        if all(f.type in plain for f in table.schema):
            out = {}
            for name, column in zip(table.column_names, table.columns, strict=True):
                array = column.combine_chunks()
                if pa.types.is_null(array.type):
                    array = array.cast(pa.string())
                if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
                    out[name] = pd.Series(
                        pd.arrays.ArrowStringArray(array, dtype=pd.StringDtype("pyarrow", na_value=math.nan))
                    )
                else:
                    out[name] = pd.Series(pd.arrays.ArrowExtensionArray(array))
            return out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    bases = [json.loads(text) for text in texts]
    names = list(dict.fromkeys(k for base in bases for k in base))
    return {name: pd.Series([base.get(name) for base in bases], dtype=object) for name in names}


def _json_text(value: Any) -> str | None:
    return None if _missing(value) else _canonical_json(value)


def _json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def default_state_url() -> str:
    """``sqlite:///$AIRFLOW_HOME/cosell_state.db`` (Airflow's own default home when unset)."""
    home = os.path.expanduser(os.path.expandvars(os.environ.get("AIRFLOW_HOME") or "~/airflow"))
    return f"sqlite:///{Path(home).resolve() / DEFAULT_SQLITE_FILE}"


def _normalise_scheme(url: str) -> str:
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
        return _normalise_scheme(host)
    conn_type = (getattr(conn, "conn_type", None) or "").strip()
    drivername = _normalise_scheme(f"{conn_type}://").removesuffix("://")
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


def _not_found_exceptions() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module in ("airflow.sdk.exceptions", "airflow.exceptions"):
        try:
            mod = __import__(module, fromlist=["AirflowNotFoundException"])
            found.append(mod.AirflowNotFoundException)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the Airflow build
            continue
    return tuple(found)


# --------------------------------------------------------------------------- the store


class StateStore:
    """The sync's state database (see the module docstring)."""

    def __init__(self, url: str, *, echo: bool = False, max_attempts: int = 5) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = int(max_attempts)
        parsed = make_url(_normalise_scheme(str(url)))
        self._url = parsed
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
            self._engine = sa.create_engine(parsed, **kwargs)
            _configure_sqlite(self._engine, wal=not in_memory)
        else:
            kwargs["pool_pre_ping"] = True
            self._engine = sa.create_engine(parsed, **kwargs)
            _configure_postgresql(self._engine)
        self._dialect = self._engine.dialect.name

    @classmethod
    def from_airflow(cls, conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> StateStore:
        """The store behind the Airflow connection ``conn_id``; SQLite under ``$AIRFLOW_HOME`` when it is absent."""
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(conn_id)
        except _not_found_exceptions():
            url = default_state_url()
            log.info("Connection %r is not defined; using the state database %s", conn_id, url)
            return cls(url, **kwargs)
        return cls(sqlalchemy_url_from_connection(conn), **kwargs)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        return self._dialect

    def close(self) -> None:
        """Release the engine's pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self.url!r})"

    # ------------------------------------------------------------------ transactions

    def _retryable(self, exc: sa.exc.DBAPIError) -> bool:
        if self._dialect == "sqlite":
            text = str(getattr(exc, "orig", exc)).lower()
            return "database is locked" in text or "database table is locked" in text or "busy" in text
        code = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(
            getattr(exc, "orig", None), "sqlstate", None
        )
        return code in {"40001", "40P01"}  # serialization_failure, deadlock_detected

    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction (``BEGIN IMMEDIATE`` on SQLite when writing), retrying on lock errors."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._engine.connect() as conn:
                    if not write:
                        conn.execution_options(cosell_read_only=True)
                    with conn.begin():
                        return work(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == WRITE_ATTEMPTS or not self._retryable(exc):
                    raise
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                log.warning("State DB busy (%s); retrying the transaction in %.2fs", exc.orig, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, work: Callable[[Connection], T]) -> T:
        return self._run(work, write=False)

    def _lock(self, conn: Connection, name: str) -> None:
        """Serialise with other writers of ``name`` (PostgreSQL; SQLite already holds the write lock)."""
        if self._dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(name)})

    def _by_code_point(self, column: Any) -> Any:
        """``column`` for ORDER BY: PostgreSQL compares text by code point (``COLLATE "C"``), as
        SQLite and Python do, whatever the database's collation."""
        return column.collate("C") if self._dialect == "postgresql" else column

    def _insert(self, table: sa.Table) -> Any:
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int:
        """The schema version of the database (0 when it has never been migrated)."""

        def work(conn: Connection) -> int:
            if not sa.inspect(conn).has_table(schema_version_t.name):
                return 0
            return int(conn.execute(sa.select(sa.func.max(schema_version_t.c.version))).scalar() or 0)

        return self._read(work)

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe to call from several processes at once."""
        current = self.schema_version()
        if current >= SCHEMA_VERSION:
            if current > SCHEMA_VERSION:
                log.warning("State DB schema version %s is newer than this code's (%s)", current, SCHEMA_VERSION)
            return current

        def work(conn: Connection) -> int:
            self._lock(conn, _MIGRATION_LOCK_KEY)
            metadata.create_all(conn, tables=[schema_version_t], checkfirst=True)
            version = int(conn.execute(sa.select(sa.func.max(schema_version_t.c.version))).scalar() or 0)
            for step in MIGRATIONS:
                if step.version <= version:
                    continue
                log.info("Migrating the state DB to version %s: %s", step.version, step.description)
                step.apply(conn)
                conn.execute(
                    schema_version_t.insert().values(
                        version=step.version, description=step.description, applied_at=_now()
                    )
                )
                version = step.version
            return version

        return self._run(work)

    # ------------------------------------------------------------------ links

    @staticmethod
    def hash_values(values: Mapping[str, Any]) -> str:
        """sha256 of the canonical JSON of ``values`` (sorted keys, compact separators, ``default=str``)."""
        return hashlib.sha256(_canonical_json(dict(values)).encode()).hexdigest()

    def get_links(
        self,
        crm: str,
        referral_ids: Iterable[str] | None = None,
        crm_ids: Iterable[str] | None = None,
        *,
        columnar: bool = False,
    ) -> pd.DataFrame:
        """The links of ``crm``: all of them, or those matching ``referral_ids`` OR ``crm_ids``.

        Columns: referral_id, crm_id, base (dict), base_hash, synced_at (UTC), run_id. With
        ``columnar``, the bases come as one ``base.<field>`` column per field instead of a dict
        per link, decoded from their stored JSON in one pass (see :func:`_base_columns`).
        """
        _check(crm, CRMS, "crm")
        refs = None if referral_ids is None else _ids(referral_ids)
        cids = None if crm_ids is None else _ids(crm_ids)
        cols = [
            sa.type_coerce(links_t.c.base, sa.Text).label("base") if columnar and name == "base" else links_t.c[name]
            for name in LINK_COLUMNS
        ]

        def work(conn: Connection) -> list[dict[str, Any]]:
            base = sa.select(*cols).where(links_t.c.crm == crm)
            if refs is None and cids is None:
                ordered = base.order_by(self._by_code_point(links_t.c.referral_id))
                return [dict(r._mapping) for r in conn.execute(ordered)]
            found: dict[str, dict[str, Any]] = {}
            for column, ids in ((links_t.c.referral_id, refs), (links_t.c.crm_id, cids)):
                for chunk in _chunks(ids or []):
                    for r in conn.execute(base.where(column.in_(chunk))):
                        found[r.referral_id] = dict(r._mapping)
            return [found[k] for k in sorted(found)]

        rows = self._read(work)
        if not columnar:
            return _frame(rows, LINK_COLUMNS, times=["synced_at"])
        others = [c for c in LINK_COLUMNS if c != "base"]
        frame = _frame(rows, others, times=["synced_at"])
        for name, column in _base_columns([row["base"] for row in rows]).items():
            frame[f"base.{name}"] = column
        return frame

    def _prepare_links(self, crm: str, links: pd.DataFrame, run_id: str) -> list[dict[str, Any]]:
        _check(crm, CRMS, "crm")
        missing = {"referral_id", "crm_id", "base"} - set(links.columns)
        if missing:
            raise ValueError(f"links lack the column(s) {sorted(missing)}")
        now = _now()
        by_ref: dict[str, dict[str, Any]] = {}
        for row in _records(links):
            referral_id = _req_str(row["referral_id"], "referral_id")
            crm_id = _req_str(row["crm_id"], f"crm_id of referral {referral_id!r}")
            base = row["base"]
            if not isinstance(base, Mapping):
                raise ValueError(f"base of referral {referral_id!r} must be a dict, not {type(base).__name__}")
            base = dict(base)
            given_hash = row.get("base_hash")
            base_hash = self.hash_values(base) if _missing(given_hash) or given_hash == "" else str(given_hash)
            by_ref[referral_id] = {  # the last row of a referral wins, as successive upserts would
                "crm": crm,
                "referral_id": referral_id,
                "crm_id": crm_id,
                "base": base,
                "base_hash": base_hash,
                "synced_at": now,
                "run_id": run_id,
            }
        owner: dict[str, str] = {}
        for row in by_ref.values():
            other = owner.setdefault(row["crm_id"], row["referral_id"])
            if other != row["referral_id"]:
                raise LinkConflictError(crm, row["crm_id"], other, row["referral_id"])
        return list(by_ref.values())

    def _write_links(self, conn: Connection, crm: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        self._lock(conn, f"cosell_state:links:{crm}")
        new_crm_id = {r["referral_id"]: r["crm_id"] for r in rows}
        new_owner = {r["crm_id"]: r["referral_id"] for r in rows}
        key = sa.select(links_t.c.referral_id, links_t.c.crm_id).where(links_t.c.crm == crm)
        # A CRM record already linked to another referral conflicts, unless that referral
        # is re-linked elsewhere by this same batch (a swap).
        for chunk in _chunks(list(new_owner)):
            for existing_ref, crm_id in conn.execute(key.where(links_t.c.crm_id.in_(chunk))):
                wanted_ref = new_owner[crm_id]
                released = existing_ref in new_crm_id and new_crm_id[existing_ref] != crm_id
                if existing_ref != wanted_ref and not released:
                    raise LinkConflictError(crm, crm_id, existing_ref, wanted_ref)
        # Links whose CRM record changes are removed first, so the unique index on
        # (crm, crm_id) never sees a transient duplicate.
        moving: list[str] = []
        for chunk in _chunks(list(new_crm_id)):
            for ref, crm_id in conn.execute(key.where(links_t.c.referral_id.in_(chunk))):
                if new_crm_id[ref] != crm_id:
                    moving.append(ref)
        for chunk in _chunks(moving):
            conn.execute(links_t.delete().where(links_t.c.crm == crm, links_t.c.referral_id.in_(chunk)))
        stmt = self._insert(links_t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[links_t.c.crm, links_t.c.referral_id],
            set_={
                "crm_id": stmt.excluded.crm_id,
                "base": stmt.excluded.base,
                "base_hash": stmt.excluded.base_hash,
                "synced_at": stmt.excluded.synced_at,
                "run_id": stmt.excluded.run_id,
            },
        )
        conn.execute(stmt, rows)
        return len(rows)

    def upsert_links(self, crm: str, links: pd.DataFrame, run_id: str) -> int:
        """Insert or update links on (crm, referral_id); returns the rows written.

        Raises :class:`LinkConflictError` (a ``ValueError``) when a CRM record would be
        linked to a second referral; nothing is written then.
        """
        rows = self._prepare_links(crm, links, run_id)
        if not rows:
            return 0
        return self._run(lambda conn: self._write_links(conn, crm, rows))

    def delete_links(self, crm: str, referral_ids: Iterable[str]) -> int:
        _check(crm, CRMS, "crm")
        refs = _ids(referral_ids)

        def work(conn: Connection) -> int:
            deleted = 0
            for chunk in _chunks(refs):
                result = conn.execute(links_t.delete().where(links_t.c.crm == crm, links_t.c.referral_id.in_(chunk)))
                deleted += result.rowcount
            return deleted

        return self._run(work) if refs else 0

    # ------------------------------------------------------------------ watermarks

    def get_watermark(self, dag_id: str, side: str) -> datetime | None:
        _check(side, SIDES, "side")
        query = sa.select(watermarks_t.c.value).where(watermarks_t.c.dag_id == dag_id, watermarks_t.c.side == side)
        return self._read(lambda conn: conn.execute(query).scalar())

    def _write_watermark(
        self, conn: Connection, dag_id: str, side: str, value: datetime, run_id: str, allow_backwards: bool
    ) -> datetime:
        now = _now()
        stmt = self._insert(watermarks_t).values(dag_id=dag_id, side=side, value=value, run_id=run_id, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[watermarks_t.c.dag_id, watermarks_t.c.side],
            set_={"value": stmt.excluded.value, "run_id": stmt.excluded.run_id, "updated_at": stmt.excluded.updated_at},
            where=None if allow_backwards else watermarks_t.c.value < stmt.excluded.value,
        )
        conn.execute(stmt)
        query = sa.select(watermarks_t.c.value).where(watermarks_t.c.dag_id == dag_id, watermarks_t.c.side == side)
        return conn.execute(query).scalar_one()

    def set_watermark(
        self, dag_id: str, side: str, value: datetime, run_id: str, *, allow_backwards: bool = False
    ) -> datetime:
        """Store the watermark; it never moves backwards unless ``allow_backwards``. Returns the stored value."""
        _check(side, SIDES, "side")
        value = _as_utc(value, f"watermark {dag_id}/{side}")
        return self._run(lambda conn: self._write_watermark(conn, dag_id, side, value, run_id, allow_backwards))

    # ------------------------------------------------------------------ audit

    def _prepare_audit(
        self, entries: pd.DataFrame | Sequence[Mapping[str, Any]] | None, defaults: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        now = _now()
        rows: list[dict[str, Any]] = []
        for i, entry in enumerate(_records(entries)):
            if defaults:
                entry = {**defaults, **{k: v for k, v in entry.items() if not _missing(v)}}
            at = entry.get("at")
            detail = entry.get("detail")
            if not _missing(detail) and not isinstance(detail, str):
                detail = _canonical_json(detail) if isinstance(detail, Mapping | list | tuple) else str(detail)
            rows.append(
                {
                    "at": now if _missing(at) else _as_utc(at, f"audit entry {i} 'at'"),
                    "dag_id": _req_str(entry.get("dag_id"), f"audit entry {i} dag_id"),
                    "run_id": _req_str(entry.get("run_id"), f"audit entry {i} run_id"),
                    "crm": _check(_req_str(entry.get("crm"), f"audit entry {i} crm"), CRMS, f"audit entry {i} crm"),
                    "direction": _check(
                        _req_str(entry.get("direction"), f"audit entry {i} direction"),
                        DIRECTIONS,
                        f"audit entry {i} direction",
                    ),
                    "referral_id": _opt_str(entry.get("referral_id")),
                    "crm_id": _opt_str(entry.get("crm_id")),
                    "action": _check(
                        _req_str(entry.get("action"), f"audit entry {i} action"), ACTIONS, f"audit entry {i} action"
                    ),
                    "field": _opt_str(entry.get("field")),
                    "old_value": _json_text(entry.get("old_value")),
                    "new_value": _json_text(entry.get("new_value")),
                    "detail": _opt_str(detail),
                }
            )
        return rows

    @staticmethod
    def _write_audit(conn: Connection, rows: list[dict[str, Any]]) -> int:
        if rows:
            conn.execute(audit_t.insert(), rows)  # one executemany
        return len(rows)

    def append_audit(self, entries: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Append audit entries in one bulk insert; returns the number of rows."""
        rows = self._prepare_audit(entries)
        return self._run(lambda conn: self._write_audit(conn, rows)) if rows else 0

    def audit(
        self,
        *,
        crm: str | None = None,
        referral_id: str | None = None,
        run_id: str | None = None,
        action: str | None = None,
        limit: int | None = 1000,
    ) -> pd.DataFrame:
        """Audit entries, newest first, with old/new values decoded from JSON."""
        query = sa.select(*[audit_t.c[name] for name in AUDIT_COLUMNS])
        for column, value in (("crm", crm), ("referral_id", referral_id), ("run_id", run_id), ("action", action)):
            if value is not None:
                query = query.where(audit_t.c[column] == value)
        query = query.order_by(audit_t.c.at.desc(), audit_t.c.id.desc())
        if limit is not None:
            query = query.limit(limit)

        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = []
            for r in conn.execute(query):
                row = dict(r._mapping)
                row["old_value"] = _json_value(row["old_value"])
                row["new_value"] = _json_value(row["new_value"])
                rows.append(row)
            return rows

        frame = _frame(self._read(work), AUDIT_COLUMNS, times=["at"])
        frame["id"] = frame["id"].astype("int64")
        return frame

    # ------------------------------------------------------------------ dead letter

    def record_failures(
        self, crm: str, direction: str, failures: Sequence[Mapping[str, Any]], run_id: str
    ) -> pd.DataFrame:
        """Record rejected rows; a row seen before gets one more attempt (first_seen kept).

        Returns record_key, attempts, first_seen and exhausted (attempts >= max_attempts).
        A key listed twice in one call counts as one attempt (the last error wins).
        """
        _check(crm, CRMS, "crm")
        _check(direction, DIRECTIONS, "direction")
        now = _now()
        by_key: dict[str, dict[str, Any]] = {}
        for i, failure in enumerate(_records(failures)):
            key = _req_str(failure.get("record_key"), f"failure {i} record_key")
            payload = failure.get("payload")
            payload = {} if _missing(payload) else payload
            if not isinstance(payload, Mapping):
                raise ValueError(f"payload of failure {key!r} must be a dict, not {type(payload).__name__}")
            error = "" if _missing(failure.get("error")) else str(failure.get("error"))
            by_key[key] = {
                "crm": crm,
                "direction": direction,
                "record_key": key,
                "payload": dict(payload),
                "attempts": 1,
                "first_seen": now,
                "last_seen": now,
                "last_error": error[:MAX_ERROR_CHARS],
                "error_code": _opt_str(failure.get("error_code")),
                "last_run_id": run_id,
            }
        rows = list(by_key.values())
        if not rows:
            return _frame([], FAILURE_COLUMNS, times=["first_seen"]).astype({"attempts": "int64", "exhausted": bool})
        t = dead_letter_t
        stmt = self._insert(t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.crm, t.c.direction, t.c.record_key],
            set_={
                "attempts": t.c.attempts + 1,
                "payload": stmt.excluded.payload,
                "last_seen": stmt.excluded.last_seen,
                "last_error": stmt.excluded.last_error,
                "error_code": stmt.excluded.error_code,
                "last_run_id": stmt.excluded.last_run_id,
            },
        )

        def work(conn: Connection) -> list[dict[str, Any]]:
            conn.execute(stmt, rows)
            found: dict[str, dict[str, Any]] = {}
            query = sa.select(t.c.record_key, t.c.attempts, t.c.first_seen).where(
                t.c.crm == crm, t.c.direction == direction
            )
            for chunk in _chunks(list(by_key)):
                for r in conn.execute(query.where(t.c.record_key.in_(chunk))):
                    found[r.record_key] = dict(r._mapping)
            return [found[k] for k in by_key]

        result = self._run(work)
        for row in result:
            row["exhausted"] = row["attempts"] >= self.max_attempts
        return _frame(result, FAILURE_COLUMNS, times=["first_seen"]).astype({"attempts": "int64", "exhausted": bool})

    @staticmethod
    def _delete_failures(conn: Connection, crm: str, direction: str, keys: list[str]) -> int:
        deleted = 0
        t = dead_letter_t
        for chunk in _chunks(keys):
            result = conn.execute(
                t.delete().where(t.c.crm == crm, t.c.direction == direction, t.c.record_key.in_(chunk))
            )
            deleted += result.rowcount
        return deleted

    def clear_failures(self, crm: str, direction: str, record_keys: Iterable[str]) -> int:
        """Forget failures whose record has since succeeded; returns the rows removed."""
        _check(crm, CRMS, "crm")
        _check(direction, DIRECTIONS, "direction")
        keys = _ids(record_keys)
        return self._run(lambda conn: self._delete_failures(conn, crm, direction, keys)) if keys else 0

    def _failures(self, query: sa.Select) -> list[dict[str, Any]]:
        rows = [dict(r._mapping) for r in self._read(lambda conn: list(conn.execute(query)))]
        for row in rows:
            row["exhausted"] = row["attempts"] >= self.max_attempts
        return rows

    def retryable_failures(self, crm: str, direction: str) -> pd.DataFrame:
        """Failures still worth retrying (attempts < max_attempts), oldest first."""
        _check(crm, CRMS, "crm")
        _check(direction, DIRECTIONS, "direction")
        t = dead_letter_t
        query = (
            sa.select(*[t.c[name] for name in RETRYABLE_COLUMNS])
            .where(t.c.crm == crm, t.c.direction == direction, t.c.attempts < self.max_attempts)
            .order_by(t.c.first_seen, self._by_code_point(t.c.record_key))
        )
        frame = _frame(self._failures(query), RETRYABLE_COLUMNS, times=["first_seen", "last_seen"])
        return frame.astype({"attempts": "int64"})

    def dead_letter(self, crm: str | None = None, *, include_retryable: bool = True) -> pd.DataFrame:
        """Every failure, exhausted ones included (they stay visible until cleared)."""
        t = dead_letter_t
        query = sa.select(*[t.c[name] for name in DEAD_LETTER_COLUMNS if name != "exhausted"])
        if crm is not None:
            query = query.where(t.c.crm == _check(crm, CRMS, "crm"))
        if not include_retryable:
            query = query.where(t.c.attempts >= self.max_attempts)
        query = query.order_by(
            self._by_code_point(t.c.crm),
            self._by_code_point(t.c.direction),
            t.c.first_seen,
            self._by_code_point(t.c.record_key),
        )
        frame = _frame(self._failures(query), DEAD_LETTER_COLUMNS, times=["first_seen", "last_seen"])
        return frame.astype({"attempts": "int64", "exhausted": bool})

    # ------------------------------------------------------------------ a run's commit

    def commit_run(
        self,
        *,
        dag_id: str,
        run_id: str,
        crm: str,
        links: pd.DataFrame | None = None,
        audit: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
        watermarks: Mapping[str, datetime] | None = None,
        cleared_failures: Mapping[str, Iterable[str]] | None = None,
        move_watermarks: bool = True,
        lease_epoch: int | None = None,
    ) -> None:
        """Commit a run's state in ONE transaction: everything lands, or nothing does.

        ``links`` are upserted, ``audit`` appended (dag_id, run_id and crm default to this
        run's), ``cleared_failures`` (direction -> record keys) removed from the dead letter,
        and, when ``move_watermarks``, ``watermarks`` (side -> value) moved forward (never back).
        With ``lease_epoch``, the run must still hold ``crm``'s lease under that epoch, checked
        in this same transaction (:class:`LeaseLostError` otherwise, and nothing lands).
        """
        _check(crm, CRMS, "crm")
        link_rows = self._prepare_links(crm, links, run_id) if links is not None and len(links) else []
        audit_rows = self._prepare_audit(audit, {"dag_id": dag_id, "run_id": run_id, "crm": crm})
        marks = {
            _check(side, SIDES, "side"): _as_utc(value, f"watermark {dag_id}/{side}")
            for side, value in (watermarks or {}).items()
        }
        cleared = {
            _check(direction, DIRECTIONS, "direction"): _ids(keys)
            for direction, keys in (cleared_failures or {}).items()
        }

        def work(conn: Connection) -> None:
            if lease_epoch is not None:
                self._hold_lease(conn, crm, dag_id, run_id, int(lease_epoch), None)
            self._write_links(conn, crm, link_rows)
            self._write_audit(conn, audit_rows)
            for direction, keys in cleared.items():
                self._delete_failures(conn, crm, direction, keys)
            if move_watermarks:
                for side, value in marks.items():
                    self._write_watermark(conn, dag_id, side, value, run_id, False)

        self._run(work)

    # ------------------------------------------------------------------ run leases

    @staticmethod
    def _lease_row(conn: Connection, crm: str) -> Lease | None:
        row = conn.execute(sa.select(leases_t).where(leases_t.c.crm == crm)).first()
        return None if row is None else Lease(**dict(row._mapping))

    def get_lease(self, crm: str) -> Lease | None:
        """The lease row of ``crm`` (live or not), or None when no run ever took it."""
        _check(crm, CRMS, "crm")
        return self._read(lambda conn: self._lease_row(conn, crm))

    def acquire_leases(self, holders: Mapping[str, str], run_id: str, ttl: timedelta) -> dict[str, Lease]:
        """Take the lease of every CRM in ``holders`` (crm -> dag_id) for ``run_id``: all or none.

        Re-entrant: the holder gets its lease back (renewed, same epoch) even after it expired
        or was released, as long as no other run took it since. An expired or released lease
        passes to the caller with the next epoch. A live lease of another run raises
        :class:`LeaseHeldError` and nothing changes.
        """
        run_id = _req_str(run_id, "run_id")
        wanted = {_check(crm, CRMS, "crm"): _req_str(dag_id, "dag_id") for crm, dag_id in holders.items()}
        if ttl <= timedelta(0):
            raise ValueError("the lease ttl must be positive")

        def work(conn: Connection) -> dict[str, Lease]:
            now = _now()
            taken: dict[str, Lease] = {}
            for crm in sorted(wanted):  # one order everywhere: no lock cycles between two callers
                dag_id = wanted[crm]
                self._lock(conn, _LEASE_LOCK_KEY.format(crm=crm))
                current = self._lease_row(conn, crm)
                values = {"dag_id": dag_id, "run_id": run_id, "expires_at": now + ttl, "released_at": None}
                if current is None:
                    values |= {"crm": crm, "epoch": 1, "acquired_at": now}
                    conn.execute(leases_t.insert().values(**values))
                elif (current.dag_id, current.run_id) == (dag_id, run_id):
                    values |= {"epoch": current.epoch, "acquired_at": current.acquired_at}
                elif current.live(now):
                    raise LeaseHeldError(current)
                else:
                    if current.released_at is None:
                        log.warning(
                            "The %s lease of %s expired at %s: %s run %s takes it over",
                            crm, current.holder(), current.expires_at.isoformat(), dag_id, run_id,
                        )  # fmt: skip
                    values |= {"epoch": current.epoch + 1, "acquired_at": now}
                if current is not None:
                    conn.execute(sa.update(leases_t).where(leases_t.c.crm == crm).values(**values))
                taken[crm] = Lease(crm=crm, **{k: v for k, v in values.items() if k != "crm"})
            return taken

        return self._run(work)

    def acquire_lease(self, crm: str, dag_id: str, run_id: str, ttl: timedelta) -> Lease:
        """Take ``crm``'s lease for ``dag_id``/``run_id`` (see :meth:`acquire_leases`)."""
        return self.acquire_leases({crm: dag_id}, run_id, ttl)[crm]

    def _hold_lease(
        self,
        conn: Connection,
        crm: str,
        dag_id: str,
        run_id: str,
        epoch: int,
        ttl: timedelta | None,
        revive: bool = True,
    ) -> Lease:
        self._lock(conn, _LEASE_LOCK_KEY.format(crm=crm))
        current = self._lease_row(conn, crm)
        if current is None or (current.dag_id, current.run_id, current.epoch) != (dag_id, run_id, epoch):
            raise LeaseLostError(crm, dag_id, run_id, epoch, current)
        if ttl is None or (current.released_at is not None and not revive):
            return current
        now = _now()
        conn.execute(sa.update(leases_t).where(leases_t.c.crm == crm).values(expires_at=now + ttl, released_at=None))
        return Lease(**{**current.__dict__, "expires_at": now + ttl, "released_at": None})

    def renew_lease(
        self, crm: str, dag_id: str, run_id: str, epoch: int, ttl: timedelta, *, revive: bool = True
    ) -> Lease:
        """Extend the lease ``dag_id``/``run_id`` holds under ``epoch`` by ``ttl`` from now.

        Raises :class:`LeaseLostError` when another run took it since. An expired or released
        lease nobody else took is still this run's: renewing takes it back, unless ``revive``
        is false, when a released lease is left released.
        """
        _check(crm, CRMS, "crm")
        if ttl <= timedelta(0):
            raise ValueError("the lease ttl must be positive")
        return self._run(lambda conn: self._hold_lease(conn, crm, dag_id, run_id, int(epoch), ttl, revive))

    def release_lease(self, crm: str, dag_id: str, run_id: str) -> bool:
        """Release ``crm``'s lease if ``dag_id``/``run_id`` holds it; whether it did."""
        _check(crm, CRMS, "crm")

        def work(conn: Connection) -> bool:
            self._lock(conn, _LEASE_LOCK_KEY.format(crm=crm))
            now = _now()
            stmt = (
                sa.update(leases_t)
                .where(
                    leases_t.c.crm == crm,
                    leases_t.c.dag_id == dag_id,
                    leases_t.c.run_id == run_id,
                    leases_t.c.released_at.is_(None),
                )
                .values(
                    released_at=now,
                    expires_at=sa.case((leases_t.c.expires_at > now, now), else_=leases_t.c.expires_at),
                )
            )
            return conn.execute(stmt).rowcount == 1

        return self._run(work)

    # ------------------------------------------------------------------ runs registry

    def record_run(self, *, dag_id: str, run_id: str, crm: str, summary: Mapping[str, Any]) -> None:
        """Record (or replace) a run's summary, stamped with its finish time."""
        _check(crm, CRMS, "crm")
        stmt = self._insert(runs_t).values(
            dag_id=dag_id, run_id=run_id, crm=crm, summary=dict(summary), finished_at=_now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[runs_t.c.dag_id, runs_t.c.run_id],
            set_={"crm": stmt.excluded.crm, "summary": stmt.excluded.summary, "finished_at": stmt.excluded.finished_at},
        )
        self._run(lambda conn: conn.execute(stmt))

    def get_run(self, dag_id: str, run_id: str) -> dict | None:
        """One recorded run (dag_id, run_id, crm, summary, finished_at), or None."""
        query = sa.select(runs_t).where(runs_t.c.dag_id == dag_id, runs_t.c.run_id == run_id)
        row = self._read(lambda conn: conn.execute(query).first())
        return None if row is None else dict(row._mapping)

    def last_run(self, dag_id: str) -> dict | None:
        """The most recently finished run of ``dag_id``: dag_id, run_id, crm, summary (dict), finished_at."""
        query = (
            sa.select(runs_t)
            .where(runs_t.c.dag_id == dag_id)
            .order_by(runs_t.c.finished_at.desc(), self._by_code_point(runs_t.c.run_id).desc())
            .limit(1)
        )
        row = self._read(lambda conn: conn.execute(query).first())
        return None if row is None else dict(row._mapping)

    # ------------------------------------------------------------------ webhook inbox

    @staticmethod
    def _prepare_inbox(event: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        dedup_key = _req_str(event.get("dedup_key"), "inbox event dedup_key")
        if len(dedup_key) > 64:
            raise ValueError(f"inbox event dedup_key must be at most 64 characters, got {len(dedup_key)}")
        referral_id = _req_str(event.get("referral_id"), "inbox event referral_id")
        if len(referral_id) > _ID:
            raise ValueError(f"inbox event referral_id must be at most {_ID} characters")
        event_name = _req_str(event.get("event_name"), "inbox event event_name")
        if len(event_name) > 64:
            raise ValueError("inbox event event_name must be at most 64 characters")
        change_date = event.get("change_date")
        received_at = event.get("received_at")
        return {
            "dedup_key": dedup_key,
            "event_name": event_name,
            "referral_id": referral_id,
            "resource_uri": _req_str(event.get("resource_uri"), "inbox event resource_uri"),
            "change_date": None if _missing(change_date) else _as_utc(change_date, "inbox event change_date"),
            "received_at": now if _missing(received_at) else _as_utc(received_at, "inbox event received_at"),
            "status": "pending",
            "attempts": 0,
        }

    def inbox_add(self, events: Iterable[Mapping[str, Any]]) -> list[bool]:
        """Store webhook events durably, once each; one transaction for all of them.

        Each event holds ``dedup_key`` (unique; at most 64 characters), ``event_name``,
        ``referral_id``, ``resource_uri`` and optionally ``change_date`` and ``received_at``
        (aware datetimes; ``received_at`` defaults to now). The answer says, per event, whether
        it was newly inserted (``False``: its dedup key was already there, e.g. a redelivery).
        """
        now = _now()
        rows = [self._prepare_inbox(event, now) for event in events]
        if not rows:
            return []

        def work(conn: Connection) -> list[bool]:
            inserted = []
            for row in rows:
                stmt = self._insert(inbox_t).values(**row).on_conflict_do_nothing(index_elements=[inbox_t.c.dedup_key])
                inserted.append(conn.execute(stmt).rowcount == 1)
            return inserted

        return self._run(work)

    @staticmethod
    def _inbox_rows(conn: Connection, query: sa.Select) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in conn.execute(query.order_by(inbox_t.c.id))]

    def inbox_pending(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Pending inbox rows, oldest first (every column of :data:`INBOX_COLUMNS`)."""
        query = sa.select(*(inbox_t.c[name] for name in INBOX_COLUMNS)).where(inbox_t.c.status == "pending")
        if limit is not None:
            query = query.limit(int(limit))
        return self._read(lambda conn: self._inbox_rows(conn, query))

    def inbox_claim(
        self, run_id: str, limit: int | None = None, *, stale_after: timedelta = INBOX_STALE_CLAIM
    ) -> list[dict[str, Any]]:
        """Claim inbox rows for ``run_id`` atomically and return them, oldest first.

        Claimed are pending rows, rows ``run_id`` already holds (a retried task gets them
        again) and rows whose claim is older than ``stale_after`` (their run died). Each
        claim counts one attempt. Two concurrent callers never get the same row.
        """
        run_id = _req_str(run_id, "run_id")
        cutoff = _now() - stale_after
        c = inbox_t.c

        def work(conn: Connection) -> list[dict[str, Any]]:
            self._lock(conn, _INBOX_LOCK_KEY)
            now = _now()
            claimable = sa.or_(
                c.status == "pending",
                sa.and_(c.status == "claimed", sa.or_(c.claimed_by == run_id, c.claimed_at < cutoff)),
            )
            query = sa.select(c.id).where(claimable).order_by(c.id)
            if limit is not None:
                query = query.limit(int(limit))
            ids = [row.id for row in conn.execute(query)]
            rows: list[dict[str, Any]] = []
            for chunk in _chunks(ids):
                conn.execute(
                    sa.update(inbox_t)
                    .where(c.id.in_(chunk))
                    .values(status="claimed", claimed_by=run_id, claimed_at=now, attempts=c.attempts + 1)
                )
                rows.extend(self._inbox_rows(conn, sa.select(*(c[n] for n in INBOX_COLUMNS)).where(c.id.in_(chunk))))
            return rows

        return self._run(work)

    def inbox_done(self, run_id: str, ids: Iterable[int] | None = None) -> int:
        """Mark rows claimed by ``run_id`` done (``ids``, or all it holds); the number of rows marked."""
        run_id = _req_str(run_id, "run_id")
        wanted = None if ids is None else list(dict.fromkeys(int(i) for i in ids))
        c = inbox_t.c

        def work(conn: Connection) -> int:
            now = _now()
            base = (
                sa.update(inbox_t)
                .where(c.status == "claimed", c.claimed_by == run_id)
                .values(status="done", done_at=now)
            )
            if wanted is None:
                return conn.execute(base).rowcount
            return sum(conn.execute(base.where(c.id.in_(chunk))).rowcount for chunk in _chunks(wanted))

        return self._run(work)

    def inbox_release(self, run_id: str) -> int:
        """Hand the rows ``run_id`` still holds back to pending (after a failed run); the number released."""
        run_id = _req_str(run_id, "run_id")
        c = inbox_t.c
        stmt = (
            sa.update(inbox_t)
            .where(c.status == "claimed", c.claimed_by == run_id)
            .values(status="pending", claimed_by=None, claimed_at=None)
        )
        return self._run(lambda conn: conn.execute(stmt).rowcount)

    def inbox_newest_pending(self) -> tuple[int, datetime | None]:
        """(number of pending rows, the newest pending row's ``received_at``)."""
        c = inbox_t.c
        query = sa.select(sa.func.count(), sa.func.max(c.received_at)).where(c.status == "pending")
        count, newest = self._read(lambda conn: conn.execute(query).one())
        return int(count), None if newest is None else _as_utc(newest, "received_at")

    def inbox_counts(self) -> dict[str, int]:
        """The number of inbox rows per status: ``{"pending": n, "claimed": n, "done": n}``."""
        query = sa.select(inbox_t.c.status, sa.func.count()).group_by(inbox_t.c.status)
        counts = dict.fromkeys(INBOX_STATUSES, 0)
        for status, count in self._read(lambda conn: conn.execute(query).all()):
            counts[status] = int(count)
        return counts


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
