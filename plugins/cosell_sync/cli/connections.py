"""Where a connection lives, and how the CLI changes its extras.

Airflow looks a connection up in the secrets backends in order: a configured backend (Vault,
AWS Secrets Manager, ...), then ``AIRFLOW_CONN_<ID>`` environment variables, then the metadata
DB. Only the metadata DB can be written from here; for the others the CLI writes the updated
``AIRFLOW_CONN_<ID>`` line to a new file (mode 0600, since it holds credentials) for the user
to put where the connection comes from.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosell_sync.errors import ConfigurationError

METADATA_DB = "the Airflow metadata DB"


@dataclass(frozen=True)
class StoredConnection:
    conn_id: str
    conn: Any  # airflow.models.connection.Connection
    source: str  # METADATA_DB, "environment variable AIRFLOW_CONN_<ID>" or "a secrets backend"

    @property
    def env_var(self) -> str:
        return f"AIRFLOW_CONN_{self.conn_id.upper()}"

    @property
    def writable(self) -> bool:
        return self.source == METADATA_DB


def find_connection(conn_id: str) -> StoredConnection:
    """The connection Airflow would use for ``conn_id``, and where it comes from."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise ConfigurationError(
            f"No connection '{conn_id}': add it (Admin > Connections, `airflow connections add`, or an "
            f"AIRFLOW_CONN_{conn_id.upper()} environment variable) first."
        ) from None
    if os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}"):
        return StoredConnection(conn_id, conn, f"environment variable AIRFLOW_CONN_{conn_id.upper()}")
    if _db_row(conn_id) is not None:
        return StoredConnection(conn_id, conn, METADATA_DB)
    return StoredConnection(conn_id, conn, "a secrets backend")


def _db_row(conn_id: str) -> Any:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with create_session() as session:
            row = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
            if row is not None:
                session.expunge(row)
            return row
    except SQLAlchemyError:  # no metadata DB here (not migrated, unreachable): the row is not in it
        return None


def update_extra_in_db(conn_id: str, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into the extras of the connection's metadata DB row (encrypted as
    Airflow stores them when a Fernet key is configured)."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
        if row is None:
            raise ConfigurationError(f"Connection '{conn_id}' is no longer in {METADATA_DB}.")
        extra = dict(row.extra_dejson or {})
        extra.update(changes)
        row.set_extra(json.dumps(extra))


def connection_json(conn: Any, extra: dict[str, Any]) -> str:
    """The connection in Airflow's JSON form (what ``AIRFLOW_CONN_<ID>`` takes), with ``extra``."""
    doc: dict[str, Any] = {"conn_type": conn.conn_type}
    for name in ("host", "login", "password", "schema", "port"):
        value = getattr(conn, name, None)
        if value not in (None, ""):
            doc[name] = value
    doc["extra"] = extra
    return json.dumps(doc)


def write_env_file(path: Path, env_var: str, value: str) -> Path:
    """``export <env_var>=<value>`` in a NEW file created with mode 0600 (never overwritten)."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists; name a new file with --env-file.") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(f"export {env_var}={shlex.quote(value)}\n")
    return path
