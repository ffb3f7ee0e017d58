"""The sync's state database: links, watermarks, audit, dead letter, runs, inbox, run leases (no Airflow imports).

One module per concern (``db``, ``schema``, ``links``, ``watermarks``, ``audit``, ``dead_letter``,
``runs``, ``inbox``, ``leases``); :class:`StateStore` is the facade the rest of the code uses.
"""

from cosell_sync.state.db import default_state_url, sqlalchemy_url_from_connection
from cosell_sync.state.inbox import INBOX_COLUMNS, INBOX_STATUSES
from cosell_sync.state.leases import Lease, LeaseHeldError, LeaseLostError
from cosell_sync.state.links import LinkConflictError
from cosell_sync.state.schema import MIGRATIONS, SCHEMA_VERSION, Migration
from cosell_sync.state.store import StateStore
from cosell_sync.state.values import ACTIONS, CRMS, DIRECTIONS, SIDES

__all__ = [
    "ACTIONS",
    "CRMS",
    "DIRECTIONS",
    "INBOX_COLUMNS",
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
