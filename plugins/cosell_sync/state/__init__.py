"""The sync's state database: links, watermarks, audit, dead letter, runs, inbox, run leases (no Airflow imports)."""

from cosell_sync.state.store import (
    ACTIONS,
    CRMS,
    DIRECTIONS,
    INBOX_STATUSES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SIDES,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LinkConflictError,
    Migration,
    StateStore,
    default_state_url,
    sqlalchemy_url_from_connection,
)

__all__ = [
    "ACTIONS",
    "CRMS",
    "DIRECTIONS",
    "INBOX_STATUSES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SIDES",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "LinkConflictError",
    "Migration",
    "StateStore",
    "default_state_url",
    "sqlalchemy_url_from_connection",
]
